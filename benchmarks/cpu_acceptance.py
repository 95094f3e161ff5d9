"""The CPU speed bar (issues #5 and #28) in one command: `lorakit train` against PEFT's training loop, alternated.

    python benchmarks/cpu_acceptance.py               # 3 rounds of 4 runs, then the Alpaca loss curves
    python benchmarks/cpu_acceptance.py --rounds 5 --json results.json

Four sides, each round in a turned order (round i starts at side i, so over the rounds each side runs in each
place and a drift over the series moves every side alike):
  lorakit        `lorakit train` with `--dtype auto`: bf16 weights, fp32 LoRA factors on a CPU that multiplies bf16
                 natively and measures faster (see lorakit.train.runtime.training_dtype), fp32 elsewhere
  lorakit-fp32   the same command with `--dtype float32`
  peft           benchmarks/throughput.py's peft method: fp32, what a PEFT user runs by default
  peft-bf16      the same with the model loaded in bf16 under bf16 autocast (PEFT keeps its LoRA factors in fp32):
                 the strongest thing a PEFT user can do on the same CPU
Every side is smollm2-135m, batch 4 x 256 packed demo chats, LoRA r=16 alpha 32 on the 7 projections, dropout 0,
AdamW. The CLI's figure (summary.json `tokens_per_second`) covers all of its training time, which includes what
PEFT's loop does not do: the demo's KL term on its rehearsal chats, two checkpoints and logging; PEFT's leaves
two warm-up steps out. The bars: lorakit >= 2.0x peft and >= 1.3x peft-bf16 (ratio of the means).

Quality, printed too: the demo's held-out accuracy and retention of both CLI sides (same seed), and `--alpaca`
(default when ../shared/data is there) a 30-step run on Alpaca in fp32 and in auto, whose per-step train losses
must agree within ALPACA_TOLERANCE. The matmul rates (1024 x 576 x 1536, fp32 and bf16) before and after say how
fast the machine was.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorakit.models.device import cpu_matmul_rates  # noqa: E402

BARS = {"peft": 2.0, "peft-bf16": 1.3}
SIDES = ("lorakit", "lorakit-fp32", "peft", "peft-bf16")
CLI_ARGS = ["train", "--model", "smollm2-135m", "--batch-size", "4", "--seq-len", "256", "--packing", "--r", "16",
            "--alpha", "32", "--dropout", "0", "--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_small_2k.json"
# every side on all the cores: `lorakit train` would take fewer on a busy CPU (runtime.cpu_threads_for_load), which
# is right for a user and wrong for a comparison (run this alone)
THREADS = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
ALPACA_TOLERANCE = {"mean relative difference per step": 0.03, "last 10 steps' mean loss (relative)": 0.02}


def run_peft(folder: Path, steps: int, config: str) -> dict:
    """tokens/s of throughput.py's peft method (its own child process, as `--methods peft` runs it)."""
    out = folder / "peft.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--config", config, "--steps",
                    str(steps), "--warmup", "2", "--child", "peft", str(out)], check=True, cwd=ROOT, env=THREADS)
    return {"tokens_per_second": json.loads(out.read_text())["tokens_per_second"]}


def run_cli(folder: Path, dtype: str, max_steps: int, extra: tuple = ()) -> dict:
    """The CLI's summary.json figures (and its metrics.jsonl train losses)."""
    steps = ["--max-steps", str(max_steps)] if max_steps > 0 else []
    subprocess.run([sys.executable, "-m", "lorakit", *CLI_ARGS, "--dtype", dtype, "--out", str(folder / "run"),
                    *steps, *extra], check=True, cwd=ROOT, env=THREADS)
    summary = json.loads((folder / "run" / "summary.json").read_text())
    lines = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines() if line]
    losses = {line["step"]: line["loss"] for line in lines if "loss" in line and "eval_loss" not in line}
    keys = ("tokens_per_second", "train_seconds", "dtype", "heldout_accuracy_after", "retention")
    return {**{k: summary.get(k) for k in keys}, "losses": losses}


def round_order(i: int) -> list[str]:
    """Round i: SIDES turned by i (a Latin square: over four rounds each side runs once in each place)."""
    return list(SIDES[i % len(SIDES):] + SIDES[:i % len(SIDES)])


def run_side(side: str, folder: Path, args) -> dict:
    if side.startswith("peft"):
        return run_peft(folder, args.peft_steps, "cpu-bf16" if side == "peft-bf16" else "cpu")
    return run_cli(folder, "float32" if side == "lorakit-fp32" else "auto", args.max_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four sides (default 3)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--max-steps", type=int, default=-1,
                        help="cut the CLI runs short (a quick check of this script; not the acceptance command)")
    parser.add_argument("--peft-steps", type=int, default=8, help="PEFT's measured steps (default 8, as throughput.py)")
    parser.add_argument("--alpaca", action=argparse.BooleanOptionalAction, default=ALPACA.is_file(),
                        help="also compare 30-step Alpaca loss curves, fp32 against auto (default: when the data is there)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    rates_before = cpu_matmul_rates(rows=1024)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-acceptance-") as tmp:
        for i in range(args.rounds):
            for side in round_order(i):
                folder = Path(tmp) / f"{len(runs) + 1}-{side}"
                folder.mkdir()
                print(f"== round {i + 1} of {args.rounds}: {side}", flush=True)
                runs.append({"round": i, "side": side, **run_side(side, folder, args)})
                print(f"   {side}: {runs[-1]['tokens_per_second']:.1f} tokens/s", flush=True)
        alpaca = compare_alpaca(Path(tmp)) if args.alpaca else None
    rates_after = cpu_matmul_rates(rows=1024)
    report(runs, rates_before, rates_after, alpaca, args)


def compare_alpaca(tmp: Path) -> dict:
    """30 steps on Alpaca in fp32 and in auto, same seed: per-step train losses side by side."""
    curves = {}
    for dtype in ("float32", "auto"):
        folder = tmp / f"alpaca-{dtype}"
        folder.mkdir()
        print(f"== Alpaca, 30 steps, --dtype {dtype}", flush=True)
        curves[dtype] = run_cli(folder, dtype, 30, ("--data", str(ALPACA), "--log-every", "1", "--eval-every", "0"))
    fp32, auto = curves["float32"]["losses"], curves["auto"]["losses"]
    steps = sorted(set(fp32) & set(auto))
    relative = [abs(auto[s] - fp32[s]) / abs(fp32[s]) for s in steps]
    last = steps[-10:]
    tail = abs(statistics.mean(auto[s] for s in last) / statistics.mean(fp32[s] for s in last) - 1)
    return {"steps": steps, "fp32": [fp32[s] for s in steps], "auto": [auto[s] for s in steps],
            "auto_dtype": curves["auto"]["dtype"],
            "measured": {"mean relative difference per step": statistics.mean(relative),
                         "last 10 steps' mean loss (relative)": tail},
            "max_relative": max(relative)}


def report(runs: list[dict], before: dict, after: dict, alpaca, args) -> None:
    means = {side: statistics.mean(r["tokens_per_second"] for r in runs if r["side"] == side) for side in SIDES}
    print(f"\nCPU acceptance: `lorakit {' '.join(CLI_ARGS)}` (--dtype auto and float32) against throughput.py's peft"
          f" method in fp32 and in bf16 autocast"
          + (f" (CLI cut to --max-steps {args.max_steps}: NOT the acceptance command)" if args.max_steps > 0 else ""))
    print(f"matmul 1024x576x1536 GFLOP/s: fp32 {before['float32']:.0f} -> {after['float32']:.0f}, "
          f"bf16 {before['bfloat16']:.0f} -> {after['bfloat16']:.0f} (before -> after, measured here)")
    print(f"{'run':>4} {'round':>5} {'side':<13}{'tokens/s':>10}{'train s':>9}{'dtype':>10}{'held-out':>9}{'retention':>10}")
    for i, r in enumerate(runs):
        cli = r["side"].startswith("lorakit")
        extra = f"{r['train_seconds']:>9.1f}{r['dtype']:>10}{_num(r['heldout_accuracy_after']):>9}" \
                f"{_num(r['retention']):>10}" if cli else ""
        print(f"{i + 1:>4} {r['round'] + 1:>5} {r['side']:<13}{r['tokens_per_second']:>10.1f}{extra}")
    print("means: " + ", ".join(f"{side} {means[side]:.1f}" for side in SIDES) + " tokens/s")
    for other, bar in BARS.items():
        ratio = means["lorakit"] / means[other]
        per_round = [_ratio(runs, i, other) for i in range(args.rounds)]
        print(f"lorakit / {other} = {ratio:.2f}x (bar {bar}x: {'met' if ratio >= bar else 'NOT met'}); each round: "
              + ", ".join(f"{p:.2f}" for p in per_round))
    print(f"lorakit / lorakit-fp32 = {means['lorakit'] / means['lorakit-fp32']:.2f}x (each round: "
          + ", ".join(f"{_ratio(runs, i, 'lorakit-fp32'):.2f}" for i in range(args.rounds)) + ")")
    if alpaca:
        print(f"\nAlpaca 30 steps, train loss per step, fp32 against auto ({alpaca['auto_dtype']}):")
        print("step  " + " ".join(f"{s:>6}" for s in alpaca["steps"]))
        print("fp32  " + " ".join(f"{v:>6.3f}" for v in alpaca["fp32"]))
        print("auto  " + " ".join(f"{v:>6.3f}" for v in alpaca["auto"]))
        for name, tolerance in ALPACA_TOLERANCE.items():
            value = alpaca["measured"][name]
            print(f"{name}: {value:.4f} (tolerance {tolerance}: {'within' if value <= tolerance else 'OUTSIDE'})")
        print(f"largest relative difference of one step: {alpaca['max_relative']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "means": means, "matmul_before": before,
                                         "matmul_after": after, "alpaca": alpaca}, indent=1))


def _ratio(runs: list[dict], round_index: int, other: str) -> float:
    by_side = {r["side"]: r["tokens_per_second"] for r in runs if r["round"] == round_index}
    return by_side["lorakit"] / by_side[other]


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
