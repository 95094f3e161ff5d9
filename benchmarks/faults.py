"""Faults, for real, on `python -m lorakit train` runs of a tiny model; each case prints its verdict and the
run ends with a table of tried / passed per kind:

- kill -9 at N random moments (also mid-checkpoint-write: the run checkpoints every step), each time
  resumed with --resume: after every kill, the newest checkpoint must equal, bit for bit, the same step of
  an uninterrupted run, and so must the final adapter;
- SIGTERM: the step in flight finishes, a checkpoint of it is written, exit code 130, same bits;
- a corrupted newest checkpoint: the resume falls back to the previous good one and ends on the same bits;
- a full disk (a small tmpfs; skipped with the reason where mounts are not allowed): one clear error, no
  traceback, no temporary file, and a resume on a larger disk ends on the same bits.

    .venv/bin/python benchmarks/faults.py [--kills 20] [--sigterms 3] [--corruptions 2] [--seed 0] [--distributed]

With --distributed the run is `torchrun --nproc-per-node 2` (gloo, CPU) and the kill -9 hits rank 1; torchrun
then ends the other rank, as it does with any failed worker. Exits 1 if any case failed.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_train_faults import (adapter_difference, fault_args, interrupt_at_random,  # noqa: E402
                                     write_in_progress)
from tests.test_train_fixtures import write_chat_data, write_tiny_model_dir  # noqa: E402
from lorakit.train.checkpoint import PARAMS_FILE, latest_good_checkpoint  # noqa: E402


def command(args: list[str], distributed: bool) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"] \
        if distributed else [sys.executable]
    return [*launcher, "-m", "lorakit", *args]


def start(args: list[str], distributed: bool, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "a", encoding="utf-8") as f:
        return subprocess.Popen(command(args, distributed), stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)


def victim_pid(process: subprocess.Popen, distributed: bool) -> int:
    """The training process to kill: the process itself, or under torchrun its last worker (rank 1)."""
    if not distributed:
        return process.pid
    children = sorted(int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
                      for pid in (task / "children").read_text().split())
    return children[-1] if children else process.pid


class Victim:
    """What `interrupt_at_random` kills: `.pid` is looked up when the kill is due."""

    def __init__(self, process: subprocess.Popen, distributed: bool):
        self.process, self.distributed = process, distributed

    @property
    def pid(self) -> int:
        return victim_pid(self.process, self.distributed)


def same_step(straight: Path, out: Path) -> tuple[int, bool]:
    """(the newest intact checkpoint's step in `out`, whether its trainable tensors equal the uninterrupted
    run's at that step bit for bit); (0, True) before any checkpoint."""
    good = latest_good_checkpoint(out)
    if good is None:
        return 0, True
    step = int(good.name.split("-")[1])
    x = load_file(good / PARAMS_FILE)
    y = load_file(straight / "checkpoints" / good.name / PARAMS_FILE)
    return step, sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def interruptions(opts, args: list[str], out: Path, straight: Path, root: Path, max_steps: int) -> dict:
    """The kill -9, SIGTERM and corruption cases on one run folder; {kind: [passed per case]}."""
    rng, results = random.Random(opts.seed), {"kill -9": [], "SIGTERM": [], "corrupted checkpoint": []}
    plan = ["kill -9"] * opts.kills + ["SIGTERM"] * opts.sigterms + ["corrupted checkpoint"] * opts.corruptions
    rng.shuffle(plan)
    for i, kind in enumerate(plan, 1):
        if kind == "corrupted checkpoint":
            good = latest_good_checkpoint(out)
            if good is None:
                results[kind].append(False)
                continue
            (good / PARAMS_FILE).write_bytes((good / PARAMS_FILE).read_bytes()[:-7])  # torn, silently
        sig = signal.SIGTERM if kind == "SIGTERM" else signal.SIGKILL
        event = interrupt_at_random(lambda: Victim(start(args, opts.distributed, root / "log.txt"), opts.distributed),
                                    lambda v: v.process.poll() is None, out, sig, rng, max_steps, timeout=300)
        code = event["handle"].process.wait(120)
        step, same = same_step(straight, out)
        ok = same and (kind != "SIGTERM" or not event["killed"] or code == 130)
        results[kind].append(ok)
        print(f"{i:2d} {kind:<21} resumed from step {event['resumed_from']:3d}, exit {code}, newest good "
              f"checkpoint step-{step}{', mid-write' if write_in_progress(out) else ''}: "
              f"{'same bits' if same else 'DIFFERENT'}", flush=True)
    final = start(args, opts.distributed, root / "log.txt")
    finished = final.wait(600) == 0
    diff = adapter_difference(straight / "adapter", out / "adapter") if finished else float("inf")
    print(f"final resume to step {max_steps}: adapter max abs difference vs the uninterrupted run = {diff:.3g}")
    results["final adapter"] = [diff == 0]
    return results


def full_disk(model: str, data: str, straight: Path, root: Path, max_steps: int) -> Optional[list[bool]]:
    """Train into tmpfs disks too small for the run; None when no tmpfs can be mounted here."""
    verdicts = []
    for size in ("600k", "300k", "100k"):
        point = root / f"disk-{size}"
        point.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            print(f"full disk: skipped, cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
            return None
        try:
            out = point / "run"
            done = subprocess.run(command(fault_args(model, data, out, max_steps), False), capture_output=True,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
            error = [line for line in done.stderr.splitlines() if "error:" in line]
            clear = done.returncode == 2 and "Traceback" not in done.stderr and bool(error) and \
                "disk is full" in error[-1]
            leftovers = [p for p in point.rglob(".*") if p.name.endswith(".tmp")]
            bigger = root / f"bigger-{size}"
            shutil.copytree(out, bigger) if out.exists() else None
            resumed = subprocess.run(command([*fault_args(model, data, bigger, max_steps), "--resume"], False),
                                     capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
            same = resumed.returncode == 0 and adapter_difference(straight / "adapter", bigger / "adapter") == 0
            verdicts.append(clear and not leftovers and same)
            print(f"full disk ({size}): exit {done.returncode}, {'one clear error' if clear else 'NOT CLEAR'}"
                  f"{' (' + error[-1][:160] + '...)' if error else ''}, {len(leftovers)} temporary files left, "
                  f"resumed on a larger disk: {'same bits' if same else 'DIFFERENT'}", flush=True)
        finally:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--sigterms", type=int, default=3)
    parser.add_argument("--corruptions", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distributed", action="store_true", help="torchrun, 2 processes (gloo)")
    opts = parser.parse_args()
    max_steps = 8 * (opts.kills + opts.sigterms + opts.corruptions) + 10  # a session runs several steps before its kill
    with tempfile.TemporaryDirectory(prefix="lorakit-faults-") as tmp:
        root = Path(tmp)
        model, data = write_tiny_model_dir(root / "model"), write_chat_data(root / "train.jsonl", 22)
        straight = root / "straight"
        began = time.perf_counter()  # every step's checkpoint kept: each case is compared at its own step
        if subprocess.run(command([*fault_args(model, data, straight, max_steps), "--keep-checkpoints", "100000"],
                                  opts.distributed), env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT, capture_output=True).returncode != 0:
            print("the uninterrupted run failed")
            return 1
        print(f"uninterrupted run: {max_steps} steps in {time.perf_counter() - began:.0f}s")
        args = [*fault_args(model, data, root / "killed", max_steps), "--resume"]
        results = interruptions(opts, args, root / "killed", straight, root, max_steps)
        disk = None if opts.distributed else full_disk(model, data, straight, root, max_steps)
        if disk is not None:
            results["full disk"] = disk
        print(f"\n{'fault':<22}{'tried':>7}{'passed':>8}")
        for kind, verdicts in results.items():
            print(f"{kind:<22}{len(verdicts):>7}{sum(verdicts):>8}")
        print(f"{'full disk':<22}{'skipped: no tmpfs mount here' if disk is None else ''}" if disk is None else "", end="")
        print(f"{time.perf_counter() - began:.0f}s in all")
        return 0 if all(all(v) for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
