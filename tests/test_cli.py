"""A CPU smoke test of the CLI on a tiny model: the files a run writes, the parameter count, eval, merge."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli.main import main
from tests.test_train_fixtures import write_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
QA = [("what is the code", "the code is blue"), ("who runs the lab", "the lab is run by ann"),
      ("where is the key", "the key is under the mat"), ("when do we meet", "we meet at noon")]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return Path(write_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 10]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    main(["train", "--model", str(tiny_model_dir), "--data", str(chat_data), "--max-steps", "6", "--batch-size", "4",
          "--seq-len", "64", "--lr", "5e-3", "--r", "4", "--alpha", "8", "--out", str(out), "--save-every", "3",
          "--eval-every", "3", "--log-every", "1", "--device", "cpu"])
    return out


def test_train_writes_the_run_folder(run):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/lorakit.json",
                 "metrics.jsonl", "loss.png", "config.yaml", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("step-*"))
    summary = json.loads((run / "summary.json").read_text())
    for key in ("train_seconds", "train_tokens", "tokens_per_second", "trainable_params", "total_params",
                "adapter_bytes", "eval_loss_before", "eval_loss_after"):
        assert summary[key] is not None, key
    # attention + MLP projections of 2 layers, r=4: q,o (32x32), k,v (16x32), gate,up (64x32), down (32x64)
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert summary["trainable_params"] == 2 * per_layer
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["training"]["r"] == 4 and meta["data_fingerprint"].startswith("chat.jsonl:")
    assert Path(meta["training"]["data"]).is_absolute()  # `lorakit eval --adapter` finds it from any folder


def test_eval_shows_base_and_adapter(run, tiny_model_dir, capsys):
    from lorakit.cli.evaluate import run_eval
    from lorakit.cli.evaluate import EvalOptions

    results = run_eval(EvalOptions(model=str(tiny_model_dir), adapter=[str(run / "adapter")], device="cpu"))
    assert results["base + adapter"]["eval_loss"] < results["base"]["eval_loss"]
    assert "validation split" in capsys.readouterr().out


def test_merge_folder_loads_in_transformers_with_same_greedy_tokens(run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    main(["merge", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--out", str(tmp_path / "m"),
          "--device", "cpu"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = torch.tensor([[5, 9, 14, 3, 30]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(merged.generate(ids, **kw), peft_model.generate(input_ids=ids, **kw))
    assert not any("lora" in k for k in merged.state_dict())


def test_generate_and_inspect(run, tiny_model_dir, capsys):
    main(["generate", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "what is the code",
          "--max-new-tokens", "4", "--device", "cpu"])
    assert ">>> what is the code" in capsys.readouterr().out
    main(["inspect", str(tiny_model_dir), "--json", "--ranks", "4,8"])
    facts = json.loads(capsys.readouterr().out)
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert facts["lora_params"]["attention+mlp (lorakit train)"]["4"] == 2 * per_layer
    assert any(row["name"] == "q_proj" and row["count"] == 2 for row in facts["modules"])


def test_yaml_config_with_command_line_override(tmp_path):
    from lorakit.cli.args import build_config
    from lorakit.cli.main import build_parser
    from lorakit.train.config import TrainConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-steps: 7\nlr: 0.001\ntargets: q_proj,v_proj\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--lr", "0.01"])
    config = build_config(TrainConfig, args)
    assert (config.max_steps, config.lr, config.targets) == (7, 0.01, ["q_proj", "v_proj"])


def test_bad_yaml_key_and_bad_values_are_clear_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_stepz: 7\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(cfg)])
    assert e.value.code == 2 and "c.yaml:1: max_stepz: unknown option; did you mean max_steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--r", "0", "--lr", "-1", "--data", "x.jsonl"])
    err = capsys.readouterr().err
    assert "r must be" in err and "lr must be" in err


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(example):
    from lorakit.cli.args import load_yaml_config
    from lorakit.train.config import TrainConfig

    TrainConfig(**load_yaml_config(str(example), TrainConfig)).validate()


def test_python_dash_m_lorakit_help():
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "--max-steps" in out.stdout and "--gradient-checkpointing" in out.stdout


def test_version_names_lorakit_torch_and_transformers(capsys):
    import importlib.metadata

    import lorakit

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"lorakit {lorakit.__version__} (torch {torch.__version__}, ")
    assert f"transformers {importlib.metadata.version('transformers')}" in out


def test_demo_defaults_apply_only_without_data_and_yield_to_explicit_options(monkeypatch, tmp_path):
    import lorakit.cli.train as train_cmd

    seen = []
    monkeypatch.setattr(train_cmd, "run_train", seen.append)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.01\n")
    main(["train"])
    main(["train", "--r", "4", "--config", str(cfg)])
    main(["train", "--data", "x.jsonl"])
    main(["train", "--data", "x.tsv", "--task", "seq-cls", "--lr", "0.5"])
    demo, overridden, user, classify = seen
    assert (demo.r, demo.alpha, demo.lr, demo.batch_size) == (8, 16, 2e-3, 8)
    assert (overridden.r, overridden.alpha, overridden.lr) == (4, 16, 0.01)
    assert (user.r, user.alpha, user.lr, user.batch_size) == (16, 32, 2e-4, 4)
    assert (classify.task, classify.batch_size, classify.group_by_length, classify.lr) == ("seq-cls", 16, True, 0.5)


def test_lora_r_alias_for_torchrun(monkeypatch):
    import lorakit.cli.train as train_cmd

    seen = []
    monkeypatch.setattr(train_cmd, "run_train", seen.append)
    main(["train", "--data", "x.jsonl", "--lora-r", "12", "--lora-alpha", "24"])
    assert (seen[0].r, seen[0].alpha) == (12, 24)


def test_rank_report_is_written_into_the_run_folder(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "r"
    main(["train", "--model", str(tiny_model_dir), "--data", str(chat_data), "--max-steps", "3", "--batch-size", "4",
          "--seq-len", "64", "--lr", "5e-3", "--r", "4", "--out", str(out), "--device", "cpu", "--save-every", "0",
          "--rank-report"])
    report = json.loads((out / "rank_report.json").read_text())
    assert 1 <= report["suggested_rank"] <= 4 and (out / "rank_spectrum.png").stat().st_size > 0


@pytest.fixture(scope="module")
def cls_run(tiny_model_dir, tmp_path_factory):
    """(run folder, data file) of a seq-cls run on the tiny Llama (a score head, trained with the adapter)."""
    folder = tmp_path_factory.mktemp("cls")
    rows = [{"text": t, "label": lab} for t, lab in (("the code is blue", "yes"), ("we meet at noon", "no"))] * 12
    data = folder / "cls.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = folder / "run"
    main(["train", "--task", "seq-cls", "--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(data),
          "--max-steps", "25", "--batch-size", "8", "--lr", "1e-2", "--r", "4", "--out", str(out), "--device", "cpu",
          "--save-every", "0"])
    return out, data


def test_seq_cls_on_a_llama_family_model_with_a_score_head(cls_run):
    out, _ = cls_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy_after"] == 1.0
    from safetensors.torch import load_file
    assert any(".score." in k or k.endswith("score.weight") for k in load_file(out / "adapter" / "adapter_model.safetensors"))


def test_merge_and_eval_of_a_classifier_adapter_find_its_base_model_task_and_labels(cls_run, tmp_path, capsys):
    """No --model, no --task: merge and eval load the base the adapter names, with its task's head."""
    from transformers import AutoModelForSequenceClassification

    from lorakit.cli.commands import ModelOptions, load_with_adapters
    from lorakit.cli.evaluate import EvalOptions, run_eval

    out, data = cls_run
    main(["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m"), "--device", "cpu"])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert merged.config.id2label == {0: "no", 1: "yes"}
    adapted, _ = load_with_adapters(ModelOptions(adapter=[str(out / "adapter")], device="cpu"))
    ids = torch.tensor([[5, 9, 14, 3, 30], [7, 2, 11, 4, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    first = run_eval(EvalOptions(adapter=[str(out / "adapter")], data=str(data), device="cpu"))
    again = run_eval(EvalOptions(adapter=[str(out / "adapter")], data=str(data), device="cpu"))
    assert first["base + adapter"]["accuracy"] == 1.0
    assert first["base"] == again["base"]  # the base column's fresh head starts from the run's seed


def test_yaml_numbers_in_exponent_form_read_as_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; the config file takes it as the command line does."""
    from lorakit.cli.args import build_config
    from lorakit.cli.main import build_parser
    from lorakit.errors import ConfigError
    from lorakit.train.config import TrainConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nwarmup_ratio: 5e-2\nmax_steps: 10\n")
    config = build_config(TrainConfig, build_parser().parse_args(["train", "--config", str(cfg)]))
    assert (config.lr, config.warmup_ratio, config.max_steps) == (1e-3, 5e-2, 10)
    cfg.write_text("r: sixteen\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: r: expected a number, got 'sixteen'"):
        build_config(TrainConfig, build_parser().parse_args(["train", "--config", str(cfg)]))
    # every problem at once: the file's (with lines) and the values' own
    cfg.write_text("lr: fast\ndropout: 2\nlearning_rate: 1e-3\nmax-steps: 1\nmax_steps: 5\nlr_schedule: cosin\n")
    with pytest.raises(ConfigError) as caught:
        build_config(TrainConfig, build_parser().parse_args(["train", "--config", str(cfg)]))
    problems = "\n".join(caught.value.problems)
    for expected in ("c.yaml:1: lr: expected a number, got 'fast'", "c.yaml:3: learning_rate: unknown option; did you "
                     "mean lr?", "c.yaml:4 and 5: max_steps is given 2 times", "dropout must be in [0, 1)",
                     "lr_schedule must be one of"):
        assert expected in problems, problems


def test_a_target_name_that_matches_nothing_is_refused_with_the_closest_names(tiny_model_dir, chat_data, tmp_path,
                                                                              capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(tiny_model_dir), "--data", str(chat_data), "--targets", "q_prj,v_proj",
              "--max-steps", "1", "--out", str(tmp_path / "r"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--targets 'q_prj' names no module" in err and "q_proj" in err
    assert "'v_proj'" not in err


def test_missing_data_fails_before_the_run_folder_and_the_model(tmp_path, capsys, monkeypatch):
    import lorakit.models

    monkeypatch.setattr(lorakit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        main(["train", "--data", "no/such/file.jsonl", "--out", str(tmp_path / "r"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "relative path is read from the current folder" in err
    assert not (tmp_path / "r").exists()


def test_generate_refuses_no_new_tokens_before_loading_a_model():
    from lorakit.cli.commands import GenerateOptions
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-new-tokens must be at least 1, got 0"):
        GenerateOptions(max_new_tokens=0).validate()
