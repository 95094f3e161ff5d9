"""kill -9 at 20 random moments of a `python -m lorakit train` run, each time resumed with --resume;
the final adapter must equal the one of an uninterrupted run.

    .venv/bin/python benchmarks/faults.py [--kills 20] [--seed 0] [--distributed]

Each kill lands 1-3 steps after the session's resume point, at a random moment within the step
(forward, backward, optimizer, or the checkpoint write: the run checkpoints every step). A kill that
interrupted a write shows as "mid-write" (it left a temporary folder behind). With --distributed the
run is `torchrun --nproc-per-node 2` (gloo, CPU) and the kill -9 hits rank 1; torchrun then ends the
other rank, as it does with any failed worker. Prints one line per kill and a verdict; exits 1 if the
adapters differ.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_train_faults import (adapter_difference, fault_args, interrupt_at_random,  # noqa: E402
                                     newest_step, write_in_progress)
from tests.test_train_fixtures import write_chat_data, write_tiny_model_dir  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distributed", action="store_true", help="torchrun, 2 processes (gloo)")
    opts = parser.parse_args()
    max_steps = 3 * opts.kills + 4
    with tempfile.TemporaryDirectory(prefix="lorakit-faults-") as tmp:
        root = Path(tmp)
        model, data = write_tiny_model_dir(root / "model"), write_chat_data(root / "train.jsonl", 22)
        straight = fault_args(model, data, root / "straight", max_steps)
        began = time.perf_counter()
        if subprocess.run(command(straight, opts.distributed), env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT, capture_output=True).returncode != 0:
            print("the uninterrupted run failed")
            return 1
        print(f"uninterrupted run: {max_steps} steps in {time.perf_counter() - began:.0f}s")
        out, rng = root / "killed", random.Random(opts.seed)
        args = [*fault_args(model, data, out, max_steps), "--resume"]
        mid_write = 0
        for i in range(1, opts.kills + 1):
            event = interrupt_at_random(lambda: Victim(start(args, opts.distributed, root / "log.txt"),
                                                       opts.distributed),
                                        lambda v: v.process.poll() is None, out, signal.SIGKILL, rng,
                                        max_steps, timeout=300)
            event["handle"].process.wait(120)
            torn = write_in_progress(out)
            mid_write += torn
            print(f"kill {i:2d}: resumed from step {event['resumed_from']:3d}, killed "
                  f"{'yes' if event['killed'] else 'no (already done)'}, newest checkpoint "
                  f"step-{newest_step(out)}{', mid-write' if torn else ''}", flush=True)
        final = start(args, opts.distributed, root / "log.txt")
        if final.wait(600) != 0:
            print("the final resumed run failed:\n" + (root / "log.txt").read_text()[-3000:])
            return 1
        diff = adapter_difference(root / "straight" / "adapter", out / "adapter")
        print(f"{opts.kills} kill -9s ({mid_write} during a checkpoint write), then --resume to step "
              f"{max_steps}: final adapter max abs difference vs the uninterrupted run = {diff:.3g} "
              f"({'identical' if diff == 0 else 'DIFFERENT'}); {time.perf_counter() - began:.0f}s in all")
        return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
