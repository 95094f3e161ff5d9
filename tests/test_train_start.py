"""A run's start: data is read and checked before any model loads, a failed start leaves no folder behind,
the run's options are on disk from its first moment, and --resume with nothing to resume from says so."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorakit.cli.main import main
from lorakit.train.checkpoint import list_checkpoints
from tests.test_train_fixtures import one_torch_thread, write_chat_data, write_tiny_model_dir  # noqa: F401


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    return write_tiny_model_dir(root / "model"), write_chat_data(root / "train.jsonl", 12)


def _args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", data, "--out", str(out), "--max-steps", "3", "--batch-size", "4",
            "--seq-len", "64", "--device", "cpu", "--log-every", "1", "--eval-every", "0", "--seed", "3", *extra]


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_a_broken_data_file_fails_before_the_model_loads_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import lorakit.models

    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "cut off\n')
    loads = []
    monkeypatch.setattr(lorakit.models, "load_model", lambda *a, **k: loads.append(1))
    out = tmp_path / "runs" / "broken"
    assert _exit_code(["train", "--data", str(data), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "broken.jsonl:2" in err
    assert loads == []  # the model was never loaded
    assert not out.exists() and not out.parent.exists()  # both folders this run made are gone


def test_a_failed_start_in_an_existing_folder_keeps_what_it_held(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "fine"}\n{"txet": "typo"}\n')
    assert _exit_code(["train", "--data", str(data), "--out", str(out), "--device", "cpu"]) == 2
    assert (out / "notes.txt").read_text() == "the user's"


def test_the_options_are_on_disk_before_the_model_loads(tiny, tmp_path, monkeypatch):
    """A kill at any moment of a start leaves config.yaml, so `--resume` continues the right job."""
    import lorakit.models

    model, data = tiny
    out = tmp_path / "run"
    seen = []

    def load_model(*args, **kwargs):
        seen.append((out / "config.yaml").read_text())
        raise KeyboardInterrupt  # as if killed while loading

    monkeypatch.setattr(lorakit.models, "load_model", load_model)
    assert _exit_code(_args(model, data, out)) == 130
    assert seen and f"model: {model}" in seen[0] and f"data: {data}" in seen[0]


def test_resume_with_nothing_to_resume_from_is_an_error(tmp_path, capsys):
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert _exit_code(["train", "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "no run to resume" in err and str(out) in err
    assert not (tmp_path / "missing").exists()


def test_resume_without_config_yaml_takes_the_options_of_the_newest_checkpoint(tiny, tmp_path, one_torch_thread):
    model, data = tiny
    out = tmp_path / "run"
    main(_args(model, data, out, "--save-every", "1", "--max-steps", "2"))
    (out / "config.yaml").unlink()  # as a run killed before it wrote them would have it (older versions)
    shutil.rmtree(out / "adapter")
    main(["train", "--out", str(out), "--resume", "--max-steps", "3"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert [s for s, _ in list_checkpoints(out / "checkpoints")][-1] == 3
    assert f"model: {model}" in (out / "config.yaml").read_text()  # the checkpoint's model, not the demo's


def test_the_validation_split_is_evaluated_once_at_the_end(tiny, tmp_path, monkeypatch, one_torch_thread):
    """The Trainer's final evaluation is the 'after' score: the same data is not evaluated a second time."""
    import lorakit.evaluate
    from lorakit.train import Trainer

    model, data = tiny
    passes = []
    trainer_evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a: passes.append("trainer") or trainer_evaluate(self, *a))
    score_evaluate = lorakit.evaluate.eval_loss
    monkeypatch.setattr(lorakit.evaluate, "eval_loss", lambda *a, **k: passes.append("score") or score_evaluate(*a, **k))
    out = tmp_path / "run"
    main(_args(model, data, out))
    assert passes == ["score", "trainer"]  # before training, then at the last step: not again after
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] == summary["final_eval_loss"]
    after = json.loads((out / "scores_after.json").read_text())
    assert after["eval_loss"] == summary["final_eval_loss"]


@pytest.mark.parametrize("cores, load, threads", [(2, 0.1, None), (2, 2.0, 1), (8, 3.2, 5), (4, 9.0, 1)])
def test_a_busy_cpu_gets_one_thread_per_free_core(monkeypatch, cores, load, threads):
    import torch

    from lorakit.train import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "_default_threads", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    chosen, reason = runtime.cpu_threads_for_load(load=load)
    if threads is None:
        assert chosen == cores and reason is None
    else:
        assert chosen == threads and f"using {load:.1f} of {cores} cores" in reason


def test_a_thread_count_the_user_chose_is_kept(monkeypatch):
    from lorakit.train import runtime

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.cpu_threads_for_load(cores=2, load=5.0)[1] is None


def test_cores_in_use_sees_a_spinning_process():
    import multiprocessing

    from lorakit.train import runtime

    idle = runtime._cores_in_use()
    if idle is None:
        pytest.skip("/proc/stat cannot be read here")
    stop = multiprocessing.get_context("fork").Event()
    spinner = multiprocessing.get_context("fork").Process(target=_spin, args=(stop,))
    spinner.start()
    try:
        import time

        time.sleep(0.3)
        busy = runtime._cores_in_use()
    finally:
        stop.set()
        spinner.join(5)
    assert busy >= 0.7  # one core's worth, whatever else runs beside the test


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def test_resume_without_a_run_folder_is_an_error_not_a_new_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(["train", "--resume"]) == 2
    assert "--resume continues the run in a folder: name it with --out" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_progress_bars_follow_tqdm_disable():
    """(tqdm reads TQDM_* variables when it is imported: a fresh process.)"""
    import os
    import subprocess
    import sys

    code = "from lorakit.progress import progress_bar\nwith progress_bar(3, 'scoring') as bar: bar.update(3)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    hidden = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"}).stderr
    assert "scoring" in shown and "scoring" not in hidden


def test_a_task_recipe_shows_a_bar_under_a_phase_and_none_outside(capsys):
    """Scoring a task (the recipes' batch loops) shows a bar when its caller names the phase."""
    import torch

    from lorakit.progress import phase
    from lorakit.tasks.classification import predict
    from tests.test_data_helpers import tiny_tokenizer

    class Classifier(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            logits = torch.zeros(input_ids.shape[0], 2)
            return type("Out", (), {"logits": logits, "loss": torch.tensor(0.5)})()

    examples = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 0} for _ in range(5)]
    predict(Classifier(), tiny_tokenizer(), examples, 2)
    assert "scoring before training" not in capsys.readouterr().err
    with phase("scoring before training"):
        predict(Classifier(), tiny_tokenizer(), examples, 2)
    assert "scoring before training" in capsys.readouterr().err


def test_temporaries_left_by_a_killed_write_are_removed_at_the_next_start(tiny, tmp_path, one_torch_thread):
    """A kill -9 in the middle of the adapter's (or any run file's) atomic write leaves `.NAME.XXXX.tmp`;
    the next start of that run removes them."""
    model, data = tiny
    out = tmp_path / "run"
    main(_args(model, data, out, "--save-every", "1", "--max-steps", "2"))
    stale = [out / "adapter" / ".adapter_model.safetensors.k1ll3d.tmp", out / ".summary.json.x9y8z7.tmp"]
    for path in stale:
        path.write_bytes(b"")
    main(["train", "--out", str(out), "--resume", "--max-steps", "3"])
    assert not any(p.exists() for p in stale)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
