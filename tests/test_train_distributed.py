"""Two processes (torchrun, gloo on CPU) train the same adapter as one process with the global batch.

`torchrun --nproc-per-node 2 -m lorakit train --batch-size 2` against `lorakit train --batch-size 4`:
the same seeded data order split between the ranks, the loss normalised over the label tokens of the
whole global window, the gradients summed over ranks, the same clipping. Dropout is 0 because the
masks are drawn per rank and cannot repeat the single process's draws.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from lorakit.train import read_metrics, verify_checkpoint
from tests.test_train_fixtures import (one_torch_thread, write_chat_data,  # noqa: F401 (fixture)
                                       write_tiny_model_dir)

ROOT = Path(__file__).resolve().parents[1]
MAX_ABS_DIFF = 1e-4  # fp32: the two runs differ only in summation order


def train_args(model: str, data: str, eval_data: str, out: Path) -> list[str]:
    # 26 examples in global micro-batches of 4: the 7th holds 2 rows, so rank 1 has none there;
    # 2 micro-batches a step: 4 steps an epoch, and 6 steps cross into the second epoch.
    # (No --r: torchrun's own parser would take it for an abbreviation of its --rdzv-* options.)
    return ["train", "--model", model, "--data", data, "--eval-data", eval_data, "--out", str(out),
            "--max-steps", "6", "--grad-accum", "2", "--seq-len", "64", "--lr", "5e-3",
            "--dropout", "0", "--max-grad-norm", "0.5", "--device", "cpu", "--save-every", "3",
            "--eval-every", "3", "--log-every", "1", "--seed", "3"]


def torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start `torchrun --standalone --nproc-per-node 2 -m lorakit ARGS` (output kept in cwd/<out>.log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "lorakit", *args]
    log = open(cwd / f"{Path(args[args.index('--out') + 1]).name}.log", "w", encoding="utf-8")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(process: subprocess.Popen, cwd: Path, name: str) -> None:
    try:
        code = process.wait(timeout=300)
    except subprocess.TimeoutExpired:  # SIGTERM: torchrun passes it on and ends its workers too
        process.terminate()
        process.wait(60)
        raise
    assert code == 0, (cwd / f"{name}.log").read_text()[-3000:]


def train_events(run: Path) -> dict[int, dict]:
    return {e["step"]: e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process, two processes, two processes with --fsdp): the torchrun jobs run side by side."""
    root = tmp_path_factory.mktemp("dist")
    model = write_tiny_model_dir(root / "model")
    data, eval_data = write_chat_data(root / "train.jsonl", 26), write_chat_data(root / "eval.jsonl", 4, 100)
    two = torchrun([*train_args(model, data, eval_data, root / "two"), "--batch-size", "2"], root)
    sharded = torchrun([*train_args(model, data, eval_data, root / "fsdp"), "--batch-size", "2", "--fsdp"],
                       root)
    main([*train_args(model, data, eval_data, root / "one"), "--batch-size", "4"])
    finished(two, root, "two")
    finished(sharded, root, "fsdp")
    return root / "one", root / "two", root / "fsdp"


def adapter_difference(a: Path, b: Path) -> float:
    x, y = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (a, b))
    assert sorted(x) == sorted(y) and len(x) > 0
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_two_processes_train_the_adapter_of_one_process_with_the_global_batch(runs):
    one, two, _ = runs
    diff = adapter_difference(one, two)
    assert diff < MAX_ABS_DIFF, f"max abs difference {diff:.3g}"
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # trained, not the zero init
    one_events, two_events = train_events(one), train_events(two)
    assert sorted(two_events) == [1, 2, 3, 4, 5, 6]  # rank 0 alone wrote, each step once
    for step, event in one_events.items():
        assert two_events[step]["loss"] == pytest.approx(event["loss"], abs=1e-5)
        assert two_events[step]["grad_norm"] == pytest.approx(event["grad_norm"], rel=1e-4)
        assert (two_events[step]["tokens"], two_events[step]["label_tokens"]) == \
            (event["tokens"], event["label_tokens"])  # counted over both ranks
    evals = [[e["eval_loss"] for e in read_metrics(r / "metrics.jsonl") if e["event"] == "eval"]
             for r in (one, two)]
    assert evals[1] == pytest.approx(evals[0], abs=1e-5) and len(evals[0]) == 2


def test_rank_0_writes_resumable_checkpoints_with_every_ranks_rng(runs):
    _, two, _ = runs
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == ["step-3", "step-6"]
    for name in names:
        assert verify_checkpoint(two / "checkpoints" / name) == []
    state = json.loads((two / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6
    rng = torch.load(two / "checkpoints" / "step-6" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])  # own dropout streams
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_tokens"] == train_events(two)[6]["tokens"]
    assert not list(two.glob(".lorakit-write-test-*"))


def test_fsdp_shards_the_model_and_trains_the_same_adapter(runs):
    one, _, sharded = runs
    diff = adapter_difference(one, sharded)
    assert diff < MAX_ABS_DIFF, f"max abs difference {diff:.3g}"
    losses = [{s: e["loss"] for s, e in train_events(r).items()} for r in (one, sharded)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    checkpoint = sharded / "checkpoints" / "step-6"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    params = load_file(checkpoint / "trainable.safetensors")
    assert saved["layout"] == "fsdp"  # full tensors gathered from the shards, keyed by name
    moments = {name.removeprefix("model."): state["exp_avg"] for name, state in saved["optimizer"]["state"].items()}
    assert sorted(moments) == sorted(params)
    assert all(moments[n].shape == params[n].shape for n in params)  # whole, not one rank's shard


def test_a_two_process_checkpoint_resumes_in_one_process_and_says_whether_the_global_batch_changed(runs, tmp_path):
    import shutil

    _, two, _ = runs
    copy = tmp_path / "two"
    shutil.copytree(two, copy)
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), this run has 1: .*global batch is the same \(8\)"):
        main(["train", "--out", str(copy), "--resume", str(copy / "checkpoints" / "step-3"), "--batch-size", "4"])
    assert train_events(copy)[6]["loss"] == pytest.approx(train_events(two)[6]["loss"], abs=1e-5)
