"""The CPU speed bar of issue #5, in one command: `lorakit train` against PEFT's training loop, alternated.

    python benchmarks/cpu_acceptance.py               # 3 pairs, about 20 minutes on 2 cores
    python benchmarks/cpu_acceptance.py --pairs 5 --json results.json

The bar: the CLI command below reports (summary.json `tokens_per_second`) at least 1.3x PEFT's tokens/s on
the same machine, where PEFT's figure is `benchmarks/throughput.py`'s peft method (smollm2-135m, fp32, batch
4 x 256 packed demo chats, LoRA r=16 alpha 32 on the 7 projections, dropout 0, AdamW; 2 warm-up + 8 measured
steps):

    lorakit train --model smollm2-135m --batch-size 4 --seq-len 256 --packing --r 16 --alpha 32 --dropout 0
        --dtype float32 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --out DIR

A shared or throttled machine moves by ±15% between runs of the same code, more than the margin being
measured, so the two commands run alternately in a balanced order (PEFT, CLI, CLI, PEFT, PEFT, CLI, ...): a
drift over the series moves both sides alike. Prints each run, the ratio of the means, each CLI run
against the PEFT run next to it, and the fp32 matmul rate before and after (how fast the machine was).
The CLI's figure covers all of its training time, which includes what PEFT's loop does not do: the
demo's KL term on its rehearsal chats (and the base model's states for them, in the first epoch), two
checkpoints and logging; its first step is counted too, where the benchmark leaves two warm-up steps out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import peak_flops  # noqa: E402  (this folder's sibling script)

BAR = 1.3
CLI_ARGS = ["train", "--model", "smollm2-135m", "--batch-size", "4", "--seq-len", "256", "--packing", "--r", "16",
            "--alpha", "32", "--dropout", "0", "--dtype", "float32",
            "--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]


def run_peft(folder: Path, steps: int) -> float:
    """tokens/s of throughput.py's peft method (its own child process, as `--methods peft` runs it)."""
    out = folder / "peft.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--config", "cpu", "--steps", str(steps),
                    "--warmup", "2", "--child", "peft", str(out)], check=True, cwd=ROOT)
    return json.loads(out.read_text())["tokens_per_second"]


def run_cli(folder: Path, max_steps: int) -> tuple[float, float]:
    """(tokens/s, training seconds) from the CLI's summary.json."""
    extra = ["--max-steps", str(max_steps)] if max_steps > 0 else []
    subprocess.run([sys.executable, "-m", "lorakit", *CLI_ARGS, "--out", str(folder / "run"), *extra],
                   check=True, cwd=ROOT)
    summary = json.loads((folder / "run" / "summary.json").read_text())
    return summary["tokens_per_second"], summary["train_seconds"]


def balanced_order(pairs: int) -> list[str]:
    """PEFT, CLI, CLI, PEFT, PEFT, CLI, ...: each side leads every other pair."""
    return [side for i in range(pairs) for side in (("peft", "cli") if i % 2 == 0 else ("cli", "peft"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="PEFT/CLI pairs to run (default 3)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--max-steps", type=int, default=-1,
                        help="cut the CLI run short (a quick check of this script; not the acceptance command)")
    parser.add_argument("--peft-steps", type=int, default=8, help="PEFT's measured steps (default 8, as throughput.py)")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")

    rate_before, _ = peak_flops("cpu")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-acceptance-") as tmp:
        for i, side in enumerate(balanced_order(args.pairs)):
            folder = Path(tmp) / f"{i + 1}-{side}"
            folder.mkdir()
            print(f"== run {i + 1} of {2 * args.pairs}: {side}", flush=True)
            if side == "peft":
                runs.append({"side": side, "tokens_per_second": run_peft(folder, args.peft_steps)})
            else:
                rate, seconds = run_cli(folder, args.max_steps)
                runs.append({"side": side, "tokens_per_second": rate, "train_seconds": seconds})
            print(f"   {side}: {runs[-1]['tokens_per_second']:.1f} tokens/s", flush=True)
    rate_after, _ = peak_flops("cpu")
    report(runs, rate_before, rate_after, args)


def report(runs: list[dict], rate_before: float, rate_after: float, args) -> None:
    peft = [r["tokens_per_second"] for r in runs if r["side"] == "peft"]
    cli = [r["tokens_per_second"] for r in runs if r["side"] == "cli"]
    pair_ratios = [_pair(runs[k:k + 2]) for k in range(0, len(runs), 2)]
    ratio = statistics.mean(cli) / statistics.mean(peft)
    print(f"\nCPU acceptance: `lorakit {' '.join(CLI_ARGS)}` against throughput.py's peft method"
          + (f" (CLI cut to --max-steps {args.max_steps}: NOT the acceptance command)" if args.max_steps > 0 else ""))
    print(f"fp32 matmul before {rate_before / 1e9:.0f}, after {rate_after / 1e9:.0f} GFLOP/s (2048^3, measured here)")
    print(f"{'run':>4} {'side':<5}{'tokens/s':>10}{'train s':>9}")
    for i, r in enumerate(runs):
        seconds = f"{r['train_seconds']:>9.1f}" if "train_seconds" in r else f"{'':>9}"
        print(f"{i + 1:>4} {r['side']:<5}{r['tokens_per_second']:>10.1f}{seconds}")
    print(f"PEFT mean {statistics.mean(peft):.1f}, CLI mean {statistics.mean(cli):.1f} tokens/s: CLI / PEFT = "
          f"{ratio:.2f}x (bar {BAR}x: {'met' if ratio >= BAR else 'NOT met'})")
    print("each pair, CLI / PEFT: " + ", ".join(f"{p:.2f}" for p in pair_ratios)
          + f" ({sum(p >= BAR for p in pair_ratios)} of {len(pair_ratios)} at or over {BAR})")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratio_of_means": ratio, "pair_ratios": pair_ratios,
                                         "matmul_gflops_before": rate_before / 1e9,
                                         "matmul_gflops_after": rate_after / 1e9}, indent=1))


def _pair(pair: list[dict]) -> float:
    """CLI / PEFT within one pair of runs."""
    by_side = {r["side"]: r["tokens_per_second"] for r in pair}
    return by_side["cli"] / by_side["peft"]


if __name__ == "__main__":
    main()
