"""Training on a CPU that other work is using: torch threads = all cores (torch's default) against one thread
per core the load leaves free (what `lorakit train` now picks, `lorakit.train.runtime.cpu_threads_for_load`).

    .venv/bin/python benchmarks/busy_cpu.py [--busy 2] [--steps 6] [--rounds 2]

The other work is `--busy` processes spinning in pure Python (one core each). The training is LoRA (r=8,
attention + MLP) on the embedded SmolLM2-135M, batches of 8 x 128 random tokens, forward + backward + AdamW;
each setting runs `--steps` steps after one warm-up step, alternated over `--rounds`, in child processes (the
thread count is fixed at start). Prints seconds per step of each, and their ratio. Run it alone.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spin(stop) -> None:
    while not stop.is_set():
        pass


def train_steps(threads: int, steps: int, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import load_model

    model = get_peft_model(load_model("smollm2-135m").model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms up
            times.append(time.perf_counter() - started)
    queue.put(statistics.mean(times))


def measure(threads: int, steps: int) -> float:
    queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=train_steps, args=(threads, steps, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside the training")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    chosen = max(1, cores - opts.busy)
    stop = mp.Event()
    spinners = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(opts.busy)]
    for s in spinners:
        s.start()
    time.sleep(2)
    print(f"{cores} cores, {opts.busy} busy processes beside the training; load average now "
          f"{os.getloadavg()[0]:.1f}")
    results: dict[int, list[float]] = {cores: [], chosen: []}
    try:
        for round_ in range(opts.rounds):
            for threads in (cores, chosen):
                results[threads].append(measure(threads, opts.steps))
                print(f"round {round_ + 1}: {threads} thread(s): {results[threads][-1]:.2f} s/step", flush=True)
    finally:
        stop.set()
        for s in spinners:
            s.join(5)
    default, picked = statistics.mean(results[cores]), statistics.mean(results[chosen])
    print(f"\n{'torch threads':<34}{'s/step':>10}")
    print(f"{cores} (torch's default: every core){'':<3}{default:>10.2f}")
    print(f"{chosen} (one per core the load leaves){'':<1}{picked:>10.2f}")
    print(f"speed-up of lorakit's choice: {default / picked:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
