"""Adaptation quality: LoRA against full fine-tuning on real data, same data and budget, one run.

    python benchmarks/quality.py                         # SST-2 and CoNLL-2003 with minilm-l6 (CPU: long)
    python benchmarks/quality.py --tasks sst2 --sst2-train 20000

For each task it trains, from the same pre-trained minilm-l6 (all-MiniLM-L6-v2), with the same data,
epochs, batch size, seed and sequence length:
  lora-cli   what `lorakit train --task ...` does by default (cli/train.py TASK_DEFAULTS: r=4 on every
             linear layer, + the pooler for seq-cls, its learning rate and dropout): the adapter under 1%
  lora-qv    LoRA r=8 on query and value (the LoRA paper's choice; PEFT's default for BERT)
  lora-all   LoRA r=8 on every linear layer of the encoder
  full       full fine-tuning of every weight
The batch size is the CLI default of the task (16 for SST-2, 32 for CoNLL) for every method.
Each run is a child process, so its peak memory (max RSS) is its own. Prints one table: the task's
score (SST-2 dev accuracy, CoNLL-2003 test entity F1), trainable parameters, peak memory, wall time
and the size of what must be saved, with ratios against full fine-tuning. Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TASKS = {
    "sst2": {"task": "seq-cls", "data": SHARED / "sst2" / "train.tsv", "eval": SHARED / "sst2" / "dev.tsv",
             "metric": "accuracy", "what": "SST-2 dev accuracy"},
    "conll": {"task": "token-cls", "data": SHARED / "conll2003" / "train.txt", "eval": SHARED / "conll2003" / "test.txt",
              "metric": "f1", "what": "CoNLL-2003 test entity F1"},
}
# Learning rates: LoRA's usual 10-20x full fine-tuning's (LoRA paper, RoBERTa: 4e-4..5e-4 vs 1e-5..3e-5).
METHODS = {
    "lora-cli": {},  # the CLI's task defaults, filled in by `options_for`
    "lora-qv": {"targets": ["query", "value"], "r": 8, "alpha": 16, "lr": 2e-3},
    "lora-all": {"targets": "all-linear", "r": 8, "alpha": 16, "lr": 2e-3},
    "full": {"lr": 1e-4},
}
COMMON = {"model": "minilm-l6", "epochs": 1.0, "batch_size": 32, "seq_len": 128, "seed": 42, "dropout": 0.0,
          "warmup_ratio": 0.06, "lr_schedule": "linear", "device": "cpu", "dtype": "float32", "save_every": 0,
          "eval_every": 0, "log_every": 50, "group_by_length": True}


def subset(path: Path, limit: int, seed: int, folder: Path) -> Path:
    """The header and `limit` random rows of a TSV file (all of it when limit <= 0)."""
    lines = path.read_text().splitlines()
    if limit <= 0 or limit >= len(lines) - 1:
        return path
    rows = random.Random(seed).sample(lines[1:], limit)
    out = folder / f"{path.stem}-{limit}.tsv"
    out.write_text("\n".join([lines[0]] + rows) + "\n")
    return out


def child(task_name: str, method: str, data: str, out: str) -> dict:
    """Train and score one (task, method) in this process; returns the figures."""
    from lorakit.train.config import TrainConfig

    spec = TASKS[task_name]
    config = TrainConfig(**options_for(spec["task"], method), task=spec["task"], data=data,
                         eval_data=str(spec["eval"]), out=out)
    start = time.perf_counter()
    figures = full_finetune(config) if method == "full" else _lora(config)
    figures["wall_seconds"] = time.perf_counter() - start
    figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures["score"] = figures[f"eval_{spec['metric']}_after"]
    figures["batch_size"] = config.batch_size
    return figures


def options_for(task: str, method: str) -> dict:
    """TrainConfig options of one method: COMMON with the task's CLI batch size, then the method's own;
    lora-cli takes the CLI's task defaults as they are (only the model, epochs and budget fixed)."""
    from lorakit.cli.train import TASK_DEFAULTS

    defaults = TASK_DEFAULTS[task]
    common = {**COMMON, "batch_size": defaults["batch_size"]}
    if method == "lora-cli":
        fixed = {k: COMMON[k] for k in ("model", "epochs", "seed", "device", "dtype", "save_every", "eval_every")}
        return {**defaults, **fixed}
    return {**common, **METHODS[method]}


def _lora(config) -> dict:
    from lorakit.cli.train import run_train

    figures = run_train(config)
    return {**figures, "saved_bytes": figures["adapter_bytes"]}


def full_finetune(config) -> dict:
    """Every weight trainable, through the same data pipeline, Trainer and metrics as `lorakit train`."""
    from lorakit.cli.train_data import label_arguments, read_task_records, task_data
    from lorakit.models import load_model
    from lorakit.train import Trainer, seed_everything

    seed_everything(config.seed)
    task = read_task_records(config)
    loaded = load_model(config.model, task=config.task, device=config.device, dtype=config.dtype,
                        **label_arguments(task))
    model, tokenizer = loaded.model, loaded.tokenizer
    for p in model.parameters():
        p.requires_grad_(True)
    data = task_data(task, config, tokenizer)
    result = Trainer(model, data["train"], data["collate"], config, Path(config.out)).fit()
    metrics = task["recipe"].evaluate(model, tokenizer, task["eval"], config.seq_len, 128, task["labels"])
    model.save_pretrained(Path(config.out) / "model")
    saved = sum(f.stat().st_size for f in (Path(config.out) / "model").iterdir() if f.suffix == ".safetensors")
    trainable = sum(p.numel() for p in model.parameters())
    return {**result.summary_figures(), **{f"eval_{k}_after": v for k, v in metrics.items()},
            "trainable_params": trainable, "total_params": trainable, "saved_bytes": saved,
            "train_examples": len(data["train"])}


def table(task_name: str, results: dict[str, dict]) -> str:
    spec, full = TASKS[task_name], results.get("full")
    lines = [f"\n{spec['what']} — minilm-l6, {COMMON['epochs']:g} epoch, batch {next(iter(results.values())).get('batch_size', '?')}, "
             f"{results[next(iter(results))].get('train_examples', '?')} training examples",
             f"{'method':<10}{'score':>8}{'vs full':>9}{'trainable':>12}{'peak RSS':>11}{'vs full':>9}"
             f"{'train s':>9}{'vs full':>9}{'saved MB':>10}{'vs full':>9}"]
    for method, r in results.items():
        def ratio(key: str) -> str:
            return f"{r[key] / full[key]:>9.3f}" if full else f"{'':>9}"
        diff = f"{100 * (r['score'] - full['score']):>+9.2f}" if full else f"{'':>9}"
        lines.append(f"{method:<10}{100 * r['score']:>8.2f}{diff}{r['trainable_params']:>12,}"
                     f"{r['peak_rss_bytes'] / 2**30:>9.2f}GB{ratio('peak_rss_bytes')}{r['train_seconds']:>9.0f}"
                     f"{ratio('train_seconds')}{r['saved_bytes'] / 1e6:>10.2f}{ratio('saved_bytes')}")
    lines.append("score in points (x100); 'vs full' for score = difference in points, otherwise a ratio")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,conll")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sst2-train", type=int, default=0, help="random SST-2 training rows (0 = all 67,349)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--jobs", type=int, default=1,
                        help="methods trained side by side (each child then uses cpu_count / jobs threads)")
    parser.add_argument("--child", nargs=4, metavar=("TASK", "METHOD", "DATA", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task_name, method, data, out_json = args.child
        figures = child(task_name, method, data, str(Path(out_json).with_suffix("")))
        Path(out_json).write_text(json.dumps(figures, indent=1))
        return
    if not SHARED.is_dir():
        print(f"benchmarks/quality.py: skipped, {SHARED} (the shared data sets) is not there")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for task_name in args.tasks.split(","):
            data = TASKS[task_name]["data"]
            if task_name == "sst2":
                data = subset(data, args.sst2_train, COMMON["seed"], Path(tmp))
            methods = args.methods.split(",")
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
            for start in range(0, len(methods), args.jobs):
                children = []
                for method in methods[start:start + args.jobs]:
                    print(f"== {task_name} / {method}", flush=True)
                    children.append(subprocess.Popen([sys.executable, __file__, "--child", task_name, method, str(data),
                                                      str(out / f"{task_name}-{method}.json")], env=env))
                if any(child.wait() for child in children):
                    raise SystemExit(f"benchmarks/quality.py: a {task_name} run failed (see above)")
            results = {m: json.loads((out / f"{task_name}-{m}.json").read_text()) for m in methods}
            report = table(task_name, results)
            print(report, flush=True)
            (out / f"{task_name}.txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
