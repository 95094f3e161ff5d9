"""`lorakit estimate`: GPU memory for full fine-tuning vs LoRA vs QLoRA, side by side, and what fits a GPU."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from ..errors import ConfigError
from .args import add_options, build_config
from .main import command

GPU_RESERVE = 0.10
"""Share of --gpu-memory kept free for the CUDA context, cuBLAS workspaces and allocator fragmentation."""
SEQ_STEP = 128
"""--gpu-memory searches sequence lengths in multiples of this."""
UNITS = {"": 1e9, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class EstimateOptions:
    """What to estimate: the model, the method and the batch."""

    model: str = "llama-3.1-8b"
    """A known family (llama-3.1-8b, llama-3.2-1b, qwen2.5-7b, mistral-7b, gemma-2-9b ...), an embedded name,
    a config.json or model folder, or a hub id (fetches config.json only)."""
    method: Literal["all", "full", "lora", "qlora"] = "all"
    """One method, or all three side by side."""
    r: int = 16
    """LoRA rank."""
    targets: Optional[Union[str, list[str]]] = None
    """Projections with LoRA: names (q_proj,v_proj), or all-linear; None = attention + MLP (lorakit train's default)."""
    seq_len: int = 2048
    """Tokens per row."""
    batch_size: int = 1
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (as lorakit train's): above 1, full fine-tuning's gradients are alive
    beside the next micro-batch's activations."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (transformers' per-layer checkpointing)."""
    optimizer: Literal["adamw", "adamw-fp32", "adamw8bit", "adamw4bit", "lion", "sgd-momentum", "sgd"] = "adamw"
    """adamw keeps its states in the parameter dtype (torch.optim.AdamW); adamw8bit / adamw4bit are
    torchao.optim's."""
    dropout: float = 0.05
    """LoRA dropout: with p > 0 each target keeps its own dropped copy of its input for backward."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Training dtype of weights and activations: bf16 (lorakit's CUDA default) or fp32."""
    gpu_memory: Optional[str] = None
    """GPU memory (24GB, 80GiB, 24 = GB): also print the largest batch and sequence length that fit."""
    json: bool = False
    """Print the figures as JSON (byte counts) instead of a table."""


def parse_size(text: str) -> float:
    """Bytes in '24GB', '80GiB', '16000MB' or '24' (GB). GB is 10^9 bytes, GiB 2^30."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ConfigError([f"--gpu-memory {text!r} is not a size; write e.g. 24GB, 80GiB or 16000MB"],
                          where="estimate options")
    return float(m.group(1)) * UNITS[m.group(2).lower()]


def run_estimate(opts: EstimateOptions) -> dict[str, Any]:
    """Estimate, print (table or JSON) and return the figures."""
    from ..estimate import METHODS, EstimateSettings, estimate, largest_fitting, resolve_shape

    if opts.method != "all" and opts.method not in METHODS:
        raise ConfigError([f"--method must be full, lora, qlora or all; got {opts.method!r}"], where="estimate options")
    shape = resolve_shape(opts.model)
    methods = list(METHODS) if opts.method == "all" else [opts.method]
    settings = {m: EstimateSettings(method=m, r=opts.r, targets=opts.targets or "attention+mlp",
                                    seq_len=opts.seq_len, batch_size=opts.batch_size, grad_accum=opts.grad_accum,
                                    gradient_checkpointing=opts.gradient_checkpointing, optimizer=opts.optimizer,
                                    dropout=opts.dropout, dtype=opts.dtype) for m in methods}
    results = {m: estimate(shape, s).as_dict() for m, s in settings.items()}
    budget = parse_size(opts.gpu_memory) if opts.gpu_memory else None
    if budget is not None:
        usable = budget * (1 - GPU_RESERVE)
        for m, s in settings.items():
            results[m]["fit"] = {"gpu_memory_bytes": int(budget), "usable_bytes": int(usable),
                                 "max_batch_size": largest_fitting(shape, s, usable, "batch_size"),
                                 "max_seq_len": largest_fitting(shape, s, usable, "seq_len", step=SEQ_STEP)}
    facts = {"model": shape.as_dict(), "settings": {k: v for k, v in vars(opts).items() if k != "json"},
             **(results[methods[0]] if len(methods) == 1 else {}), "estimates": results}
    if opts.json:
        print(json.dumps(facts, indent=2))
    else:
        _print_table(shape, opts, results)
    return facts


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _print_table(shape, opts: EstimateOptions, results: dict[str, dict]) -> None:
    methods = list(results)
    first = results[methods[0]]
    targets = ",".join(first["detail"]["targets"])
    print(f"{shape.name}: {_count(shape.total_params())} parameters; {shape.layers} layers, hidden {shape.hidden}, "
          f"{shape.heads}/{shape.kv_heads} heads, vocab {shape.vocab}{', tied' if shape.tied else ''}")
    print(f"batch {opts.batch_size} x seq_len {opts.seq_len}, {opts.dtype}, {opts.optimizer}, "
          f"gradient checkpointing {'on' if opts.gradient_checkpointing else 'off'}"
          + (f"; LoRA r={opts.r} on {targets}" if methods != ["full"] else "") + "\n")
    rows = [("trainable params", "trainable_params", _count), ("weights", "weights_bytes", _gb),
            ("gradients", "gradients_bytes", _gb), ("optimizer states", "optimizer_bytes", _gb),
            ("activations", "activations_bytes", _gb), ("workspace", "workspace_bytes", _gb),
            ("not alive at once", "overlap_bytes", _gb), ("total (peak)", "total_bytes", _gb)]
    print(f"{'':<18}" + "".join(f"{m:>14}" for m in methods))
    for label, key, fmt in rows:
        print(f"{label:<18}" + "".join(f"{fmt(results[m][key]):>14}" for m in methods))
    if "fit" in first:
        print(f"\nfits in {_gb(parse_size(opts.gpu_memory))} ({100 * (1 - GPU_RESERVE):.0f}% usable):")
        print(f"{'  max batch_size':<18}" + "".join(f"{results[m]['fit']['max_batch_size']:>14}" for m in methods)
              + f"   (at seq_len {opts.seq_len})")
        print(f"{'  max seq_len':<18}" + "".join(f"{results[m]['fit']['max_seq_len']:>14}" for m in methods)
              + f"   (at batch_size {opts.batch_size}; 0 = does not fit)")
    print("\nGB = 10^9 bytes, as torch.cuda.max_memory_allocated would count them; the CUDA context (~0.5 GB) "
          "comes on top. 'not alive at once': backward frees activations as it makes gradients, so the peak is "
          "less than the sum of the parts. The model behind the figures: lorakit/estimate/memory.py.")


def _estimate_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EstimateOptions)


@command("estimate", "memory for full fine-tuning vs LoRA vs QLoRA (weights, gradients, optimizer, "
                     "activations), and what fits a GPU")(_estimate_options)
def _estimate(args: argparse.Namespace) -> None:
    run_estimate(build_config(EstimateOptions, args, adapt_yaml=from_train_options))


def from_train_options(values: dict) -> dict:
    """A `lorakit train` YAML (an example, or a run's config.yaml) read as estimate options: its model, rank,
    targets, batch, optimizer, checkpointing, dtype and quantization; training-only keys are left out."""
    from ..train.config import TrainConfig

    train_only = {f.name for f in dataclasses.fields(TrainConfig)} - {f.name for f in dataclasses.fields(EstimateOptions)}
    if not set(values) & train_only:
        return values  # an estimate file: read as it is
    out = {k: v for k, v in values.items() if k not in train_only and k != "dtype"}
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(values.get("dtype"))  # auto: bf16 on a GPU
    if dtype:
        out["dtype"] = dtype
    if values.get("quantize") and "method" not in values:
        out["method"] = "qlora"
    return out
