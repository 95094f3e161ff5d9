"""Faults: kill -9 at random moments (also mid-checkpoint), SIGTERM, a full disk, an unwritable folder.

The kill test runs `lorakit train` in forked child processes (a real process, killed for real, but
without paying the interpreter start-up each time) and resumes each time with --resume; the final
adapter must equal the one of an uninterrupted run. benchmarks/faults.py does the same with 20 kills
of `python -m lorakit train` subprocesses.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from lorakit.train import Trainer, latest_good_checkpoint, read_metrics, verify_checkpoint
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.storage import RunFolderError
from tests.test_train_fixtures import (collate, fast_config, one_torch_thread,  # noqa: F401 (fixture)
                                       random_examples, tiny_lora_model, trainable_snapshot,
                                       write_chat_data, write_tiny_model_dir)

MAX_STEPS = 24


def fault_args(model: str, data: str, out: Path, max_steps: int = MAX_STEPS) -> list[str]:
    """A run that checkpoints every step (so kills often land in a write) with dropout on (so the
    result depends on the restored RNG states)."""
    return ["train", "--model", model, "--data", data, "--out", str(out), "--max-steps", str(max_steps),
            "--batch-size", "4", "--seq-len", "64", "--lr", "5e-3", "--dropout", "0.1", "--device", "cpu",
            "--save-every", "1", "--keep-checkpoints", "2", "--eval-every", "0", "--log-every", "1",
            "--seed", "5"]


# --- the kill loop (also used by benchmarks/faults.py) ---------------------------------------

def newest_step(out: Path) -> int:
    """The newest `step-N` folder's N (0 if none); not verified."""
    found = list_checkpoints(out / "checkpoints")
    return found[-1][0] if found else 0


def write_in_progress(out: Path) -> bool:
    """True when a checkpoint write was cut short: a temporary or moved-aside folder is left."""
    root = out / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".step-") for p in root.iterdir())


def interrupt_at_random(start: Callable[[], object], alive: Callable[[object], bool], out: Path,
                        sig: int, rng: random.Random, max_steps: int, timeout: float = 120) -> dict:
    """Start a session, let it pass a random step past its resume point, wait a random fraction of a
    step, send `sig`; return what happened."""
    resume_point = newest_step(out)
    target = min(resume_point + rng.randint(1, 3), max_steps - 1)
    handle, started = start(), time.monotonic()
    while newest_step(out) < target and alive(handle):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no checkpoint step-{target} in {out} after {timeout:.0f}s")
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.08))  # somewhere in the next step: forward, backward or the write
    was_alive = alive(handle)
    if was_alive:
        os.kill(handle.pid, sig)
    return {"signal": signal.Signals(sig).name, "resumed_from": resume_point, "killed": was_alive,
            "handle": handle}


def adapter_difference(a: Path, b: Path) -> float:
    """Max abs difference between two adapter folders' tensors (inf if their keys differ)."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    if sorted(x) != sorted(y):
        return float("inf")
    return max((x[k] - y[k]).abs().max().item() for k in x)


# --- forked children ------------------------------------------------------------------------

def _child(args: Sequence[str], log: str) -> None:
    # A fork copies tqdm's global write lock as it was: held, for good, if another thread of the parent
    # (tqdm's monitor, a loader's progress bar) had it at that instant. The child starts with fresh ones.
    from tqdm import std as tqdm_std

    tqdm_std.TqdmDefaultWriteLock.th_lock = tqdm_std.TRLock()
    tqdm_std.tqdm.set_lock(tqdm_std.TqdmDefaultWriteLock())
    with open(log, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        main(list(args))


def fork_training(args: Sequence[str], log: Path) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=_child, args=(list(args), str(log)))
    process.start()
    return process


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return write_tiny_model_dir(root / "model"), write_chat_data(root / "train.jsonl", 22), root


def test_sigkill_and_sigterm_at_random_points_resume_to_the_uninterrupted_adapter(tiny_run_inputs):
    model, data, root = tiny_run_inputs
    main(fault_args(model, data, root / "straight"))
    out, rng = root / "killed", random.Random(int(os.environ.get("LORAKIT_FAULT_SEED", "8")))
    args = [*fault_args(model, data, out), "--resume"]  # the first session finds nothing: fresh start
    events = []
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        event = interrupt_at_random(lambda: fork_training(args, root / "killed.log"),
                                    lambda p: p.is_alive(), out, sig, rng, MAX_STEPS)
        event["handle"].join(60)
        events.append({**event, "exitcode": event["handle"].exitcode, "newest": newest_step(out)})
    assert all(e["killed"] for e in events), events
    sigkilled, sigtermed = events[0], events[1]
    assert sigkilled["exitcode"] == -signal.SIGKILL
    # SIGTERM: the step in flight finishes, a checkpoint of it is written, exit code 130
    assert sigtermed["exitcode"] == 130, (root / "killed.log").read_text()[-2000:]
    final = fork_training(args, root / "killed.log")
    final.join(120)
    assert final.exitcode == 0, (root / "killed.log").read_text()[-3000:]
    assert adapter_difference(root / "straight" / "adapter", out / "adapter") == 0.0, events
    steps = [e["step"] for e in read_metrics(out / "metrics.jsonl") if e["event"] == "train"]
    assert steps == list(range(1, MAX_STEPS + 1))  # every step logged exactly once after resumes
    assert not write_in_progress(out)


def test_sigterm_writes_a_checkpoint_of_the_step_it_stopped_at(tiny_run_inputs):
    model, data, root = tiny_run_inputs
    out = root / "term"
    args = [*fault_args(model, data, out, max_steps=40), "--save-every", "100"]
    child = fork_training(args, out.with_suffix(".log"))
    while not (out / "metrics.jsonl").exists() or not any(
            e["event"] == "train" for e in read_metrics(out / "metrics.jsonl")):
        assert child.is_alive(), out.with_suffix(".log").read_text()[-2000:]
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGTERM)
    child.join(60)
    assert child.exitcode == 130
    events = read_metrics(out / "metrics.jsonl")
    stopped = [e for e in events if e["event"] == "stop"][0]
    assert stopped["reason"] == "SIGTERM received"
    assert 1 <= stopped["step"] < 40 and newest_step(out) == stopped["step"]
    assert verify_checkpoint(out / "checkpoints" / f"step-{stopped['step']}") == []


# --- disk and folder faults (in process) ------------------------------------------------------

def test_an_unwritable_output_folder_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "--out", str(blocker / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"cannot write to the run folder {blocker / 'run'}" in err and "ENOTDIR" in err
    assert "Choose another --out" in err


def train(run_dir, **overrides):
    model = tiny_lora_model(seed=4, dropout=0.1)
    config = fast_config(**{"max_steps": 6, "batch_size": 2, "save_every": 2, "keep_checkpoints": 3,
                            **overrides})
    return model, Trainer(model, random_examples(10, (5, 12), seed=6), collate, config, run_dir,
                          progress=False)


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_the_last_checkpoint_survives(
        tmp_path, monkeypatch):
    import lorakit.train.checkpoint as checkpoint_module

    real_save, calls = checkpoint_module.save_file, []

    def save_file_on_a_full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (step 4): the disk is full half-way through
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file_on_a_full_disk)
    _, trainer = train(tmp_path)
    with pytest.raises(RunFolderError, match=r"step-4: the disk is full \(ENOSPC\)\. The last complete "
                                             r"checkpoint \(.*step-2\) is untouched.*--resume"):
        trainer.fit()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]  # no partial folder
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-2") == []
    assert (tmp_path / "loss.png").exists()  # the plot is still drawn on the way out

    monkeypatch.setattr(checkpoint_module, "save_file", real_save)  # space freed: resume
    resumed_model, trainer = train(tmp_path, resume=True)
    assert trainer.fit().resumed_from_step == 2
    straight_model, trainer = train(tmp_path / "straight")
    trainer.fit()
    expected, got = trainable_snapshot(straight_model), trainable_snapshot(resumed_model)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


@pytest.mark.filterwarnings("ignore:resuming from")  # max_steps 4 -> 6
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    train(tmp_path, max_steps=4)[1].fit()
    checkpoints = tmp_path / "checkpoints"
    # as a kill -9 leaves them: step-4 moved aside for a rewrite that never landed, a half-written
    # temporary folder of step 5 beside it
    (checkpoints / "step-4").rename(checkpoints / ".step-4.old")
    partial = checkpoints / ".step-5.x1y2.tmp"
    partial.mkdir()
    shutil.copy(checkpoints / ".step-4.old" / "trainable.safetensors", partial)
    model, trainer = train(tmp_path, max_steps=6, resume=True)
    assert trainer.fit().resumed_from_step == 4  # the moved-aside copy was put back and used
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4", "step-6"]
    assert latest_good_checkpoint(tmp_path) == checkpoints / "step-6"
    assert json.loads((checkpoints / "step-6" / "trainer_state.json").read_text())["step"] == 6


def test_resume_with_only_the_run_folder_reads_its_options_and_a_refused_resume_leaves_its_record(tiny_run_inputs,
                                                                                                  capsys):
    import yaml

    model, data, root = tiny_run_inputs
    out = root / "reread"
    main(fault_args(model, data, out, max_steps=3))
    recorded = (out / "config.yaml").read_text()
    with pytest.raises(SystemExit):  # another rank: the checkpoint cannot be restored
        main(["train", "--out", str(out), "--resume", "--r", "2"])
    assert "does not fit this model's trainable parameters" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == recorded
    with open(out / "config.yaml", "a") as f:  # a key a later version dropped is left out, with a warning
        f.write("retired_option: 1\n")
    with pytest.warns(UserWarning, match="left out of .*retired_option: unknown option"):
        main(["train", "--out", str(out), "--resume", "--max-steps", "5"])  # model, data, seed ... from config.yaml
    options = yaml.safe_load((out / "config.yaml").read_text())
    assert options["model"] == model and options["max_steps"] == 5
    steps = [e["step"] for e in read_metrics(out / "metrics.jsonl") if e["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_a_fresh_run_into_a_used_folder_keeps_the_earlier_run_in_previous(tiny_run_inputs, tmp_path):
    model, data, _ = tiny_run_inputs
    out = tmp_path / "run"
    main(fault_args(model, data, out, max_steps=2))
    first = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    shutil.copy(data, out / "mine.jsonl")  # the user's own files in the run folder stay put
    main([*fault_args(model, str(out / "mine.jsonl"), out, max_steps=3)])
    assert (out / "previous" / "adapter" / "adapter_model.safetensors").read_bytes() == first
    assert (out / "mine.jsonl").is_file() and (out / "summary.json").is_file()
    assert json.loads((out / "previous" / "summary.json").read_text())["steps"] == 2
    second = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    for _ in range(2):  # runs failing at start-up do not displace the real earlier run kept in previous/
        with pytest.raises(SystemExit):
            main([*fault_args(model + "-missing", data, out, max_steps=2)])
    assert (out / "previous" / "adapter" / "adapter_model.safetensors").read_bytes() == second
