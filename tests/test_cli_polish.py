"""Command-line polish: no option abbreviations, the command's own usage on a bad option, "did you mean" for a
mistyped command, thousands separators, no perplexity for classifiers, layers in model order."""
from __future__ import annotations

import re

import pytest
import torch

from lorakit import LoraConfig
from lorakit.cli.main import build_parser, main
from lorakit.lora.spectrum import adapter_spectra
from lorakit.train import Trainer
from tests.test_train_fixtures import collate, fast_config, random_examples, tiny_lora_model


def test_an_option_prefix_is_not_taken_for_the_option():
    with pytest.raises(SystemExit):  # argparse took --max-step as --max-steps
        build_parser().parse_args(["train", "--max-step", "3"])
    assert build_parser().parse_args(["train", "--max-steps", "3"]).max_steps == 3


def test_no_parser_takes_abbreviations():
    import argparse

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    found = list(parsers(build_parser()))
    assert len(found) > 10 and [p.prog for p in found if p.allow_abbrev] == []


def test_an_unknown_option_shows_the_commands_usage_and_the_closest_option(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--max-step", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("usage: lorakit train")  # not the top-level "usage: lorakit [-h] COMMAND ..."
    assert "--max-steps" in err.split("usage:")[1]  # the command's options are listed
    assert "lorakit train: error: unrecognized arguments: --max-step 3; did you mean --max-steps?" in err


def test_a_mistyped_command_gets_did_you_mean(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["trian", "--max-steps", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "unknown command 'trian'; did you mean train?" in err


def test_record_counts_have_thousands_separators(tmp_path, capsys):
    from lorakit.cli.train_data import read_task_records

    path = tmp_path / "big.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"text number {i}\t{i % 2}\n" for i in range(2500)))
    read_task_records(fast_config(task="seq-cls", data=str(path)))
    out = capsys.readouterr().out
    assert re.search(r"training data: \d,\d{3} classification records", out), out


def test_a_classifier_run_reports_no_perplexity(tmp_path):
    data = random_examples(8)
    config = fast_config(task="seq-cls", max_steps=1)
    trainer = Trainer(tiny_lora_model(), data, collate, config, tmp_path, eval_data=data[:4], progress=False,
                      count_loss_units=lambda batch: len(batch["input_ids"]))
    assert "eval_perplexity" not in trainer.evaluate()
    assert "final_eval_perplexity" not in trainer.fit().summary_figures()
    causal = Trainer(tiny_lora_model(), data, collate, fast_config(max_steps=1), tmp_path / "lm",
                     eval_data=data[:4], progress=False)
    assert causal.evaluate()["eval_perplexity"] > 1


def test_layers_are_reported_in_model_order_not_text_order():
    prefix = "base_model.model.model.layers"
    tensors = {}
    for layer in range(12):
        tensors[f"{prefix}.{layer}.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 8)
        tensors[f"{prefix}.{layer}.self_attn.q_proj.lora_B.weight"] = torch.randn(8, 2)
    tensors = dict(sorted(tensors.items()))  # as a safetensors file stores them: 0, 1, 10, 11, 2, ...
    spectra = adapter_spectra(LoraConfig(r=2, lora_alpha=4), tensors)
    assert [int(s.module.split(".")[2]) for s in spectra] == list(range(12))
