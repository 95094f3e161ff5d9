"""The CPU RMSNorm of lorakit's fast path against transformers' LlamaRMSNorm: forward + backward, fp32 and bf16.

    OMP_NUM_THREADS=1 python benchmarks/cpu_norm.py            # smollm2-135m's shape: 975 tokens x 576
    OMP_NUM_THREADS=1 python benchmarks/cpu_norm.py --tokens 2048 --hidden 4096

Times are the calling thread's CPU time (time.thread_time), the 20th percentile of `--repeats` calls, so that
other work on the machine moves them less than wall-clock times (run with OMP_NUM_THREADS=1: with more threads the
others' time is not counted). Prints each side's milliseconds, the ratio, and the largest differences of the outputs
and input gradients (lorakit's norm computes in fp32 and rounds where transformers rounds).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorakit.fast.kernels.rms_norm import rms_norm_torch  # noqa: E402


def cpu_ms(fn, repeats: int) -> float:
    """A low percentile (the 20th) of `repeats` calls' thread CPU time, in ms, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return sorted(times)[len(times) // 5] * 1e3


def main() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=975)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    print(f"RMSNorm forward + backward, {args.tokens} tokens x {args.hidden}, {torch.get_num_threads()} thread(s), "
          f"thread CPU time (20th percentile of {args.repeats})")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        norm = LlamaRMSNorm(args.hidden, eps=1e-5).requires_grad_(False)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        norm.to(dtype)
        x = (torch.randn(1, args.tokens, args.hidden) * 3).to(dtype).requires_grad_()
        dy = torch.randn(1, args.tokens, args.hidden).to(dtype)
        sides = {"transformers": lambda: norm(x), "lorakit": lambda: rms_norm_torch(x, norm.weight, 1e-5)}
        ms = {name: cpu_ms(lambda f=f: f().backward(dy), args.repeats) for name, f in sides.items()}
        outs = {}
        for name, f in sides.items():
            x.grad = None
            y = f()
            y.backward(dy)
            outs[name] = (y.detach().float(), x.grad.float())
        dy_max = (outs["lorakit"][0] - outs["transformers"][0]).abs().max().item()
        dx_max = (outs["lorakit"][1] - outs["transformers"][1]).abs().max().item()
        print(f"{str(dtype):15} transformers {ms['transformers']:7.3f} ms   lorakit {ms['lorakit']:7.3f} ms   "
              f"{ms['transformers'] / ms['lorakit']:.2f}x   max |dy| {dy_max:.2e}, max |dx| {dx_max:.2e} "
              f"(of {outs['transformers'][1].abs().max().item():.2e})")


if __name__ == "__main__":
    main()
