"""TrainConfig: defaults are valid, validation lists every problem at once, CLI help comes from
the field docstrings, and nothing the caller passed in is modified."""
from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from lorakit.errors import ConfigError
from lorakit.train import TrainConfig, write_resolved_config


def test_defaults_are_valid_and_match_the_spec():
    config = TrainConfig().validate()
    assert (config.model, config.lr, config.r, config.alpha, config.dropout) == ("smollm2-135m", 2e-4, 16, 32, 0.05)
    assert config.data is None and config.targets is None and config.max_steps == -1
    assert config.max_grad_norm == 1.0 and config.nan_policy == "stop" and config.lr_schedule == "cosine"


def test_validation_lists_every_problem_at_once():
    bad = TrainConfig(lr=-1.0, r=0, batch_size=0, grad_accum=0, dropout=1.5, lr_schedule="wavy",
                      task="poetry", nan_policy="ignore", targets="(unclosed", warmup_ratio=2.0,
                      keep_checkpoints=0, max_steps=0,
                      init_lora_weights="random", lora_plus_ratio=-2.0)
    with pytest.raises(ConfigError) as caught:
        bad.validate()
    problems = caught.value.problems
    for field in ("lr", "r", "batch_size", "grad_accum", "dropout", "lr_schedule", "task",
                  "nan_policy", "targets", "warmup_ratio", "keep_checkpoints",
                  "max_steps", "init_lora_weights", "lora_plus_ratio"):
        assert any(p.startswith(field) for p in problems), (field, problems)
    assert len(problems) == 14
    assert "lr_schedule must be one of cosine, linear, constant; got 'wavy'" in str(caught.value)


def test_types_are_checked_too():
    with pytest.raises(ConfigError) as caught:
        TrainConfig(batch_size=2.5, epochs=float("nan"), seed=-1, targets=["q_proj", ""]).validate()
    assert len(caught.value.problems) == 4


@pytest.mark.parametrize("targets", [None, "all-linear", ["q_proj", "v_proj"], r".*\.(q|v)_proj"])
def test_target_forms_accepted(targets):
    TrainConfig(targets=targets).validate()


def test_from_dict_reports_unknown_keys_and_copies():
    values = {"lr": 1e-3, "targets": ["q_proj"]}
    config = TrainConfig.from_dict(values)
    config.targets.append("v_proj")
    assert values["targets"] == ["q_proj"]
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1, "epoch": 2})
    assert caught.value.problems == ["unknown option 'epoch'", "unknown option 'learning_rate'"]


def test_lora_kwargs_use_peft_names_and_copy_targets():
    config = TrainConfig(r=8, alpha=16, targets=["q_proj"], task="seq-cls", use_rslora=True)
    kwargs = config.lora_kwargs()
    assert kwargs == {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "lora_dropout": 0.05,
                      "use_rslora": True, "init_lora_weights": True, "task_type": "SEQ_CLS"}
    kwargs["target_modules"].append("k_proj")
    assert config.targets == ["q_proj"]


def test_run_dir_naming():
    now = datetime(2025, 1, 2, 3, 4, 5)
    assert TrainConfig().run_dir(now) == Path("runs/20250102-030405")
    assert TrainConfig(name="legal").run_dir(now) == Path("runs/legal")
    assert TrainConfig(out="x/y", name="legal").run_dir(now) == Path("x/y")


def test_every_field_has_a_docstring_that_becomes_cli_help():
    jsonargparse = pytest.importorskip("jsonargparse")
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(TrainConfig, "train")
    help_text = " ".join(parser.format_help().split())
    assert "LoRA+: the learning rate of the lora_B matrices is lr x this ratio" in help_text
    assert "Peak learning rate of AdamW." in help_text
    for field in dataclasses.fields(TrainConfig):
        assert f"--train.{field.name}" in help_text
    parsed = parser.parse_args(["--train.targets", "[q_proj,v_proj]", "--train.resume", "true",
                                "--train.max_grad_norm", "null"])
    config = TrainConfig(**vars(parsed.train))
    assert config.targets == ["q_proj", "v_proj"] and config.resume is True
    assert config.max_grad_norm is None
    config.validate()


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = TrainConfig(targets=["q_proj"], lr=1e-3, resume="runs/old")
    path = write_resolved_config(tmp_path, config)
    assert TrainConfig.from_dict(yaml.safe_load(path.read_text())) == config


def test_fsdp_refuses_what_it_cannot_shard():
    with pytest.raises(ConfigError) as info:
        TrainConfig(fsdp=True, quantize="nf4", dtype="float16", device="cuda").validate()
    assert "fsdp cannot shard quantized" in str(info.value)
    assert "fsdp with dtype float16" in str(info.value)
    TrainConfig(fsdp=True, dtype="bfloat16").validate()
