"""AdamW (torch's, or torchao's 8-bit) over the trainable parameters (with LoRA+ groups) and the warmup +
decay schedule."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lorakit.train.config import TrainConfig

# Parameters named like this are LoRA "B" matrices: LoRA+ trains them with lr x ratio.
LORA_B_MARKERS = ("lora_B", "lora_embedding_B")
# Parameters named like this (or with fewer than 2 dims) get no weight decay.
NO_DECAY_MARKERS = ("bias", "norm", "lora_magnitude_vector", "trainable_tokens_delta")  # token rows are values, not deltas


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter with `requires_grad`, in `named_parameters` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _is_lora_b(name: str) -> bool:
    return any(marker in name for marker in LORA_B_MARKERS)


def _decays(name: str, param: nn.Parameter) -> bool:
    return param.ndim >= 2 and not any(marker in name.lower() for marker in NO_DECAY_MARKERS)


def build_param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Split trainable parameters into AdamW groups.

    Groups (empty ones are dropped): `decay` / `no_decay` at the base lr, and with LoRA+
    (`config.lora_plus_ratio`) `lora_B` / `lora_B_no_decay` at lr x ratio. Each group carries a
    `name` and the parameter names (`param_names`) so a test or a log can tell them apart.
    """
    ratio = config.lora_plus_ratio
    groups: dict[str, dict] = {}
    for name, param in trainable_parameters(model):
        fast = ratio is not None and _is_lora_b(name)
        decay = _decays(name, param)
        if fast:
            key = "lora_B" if decay else "lora_B_no_decay"
        else:
            key = "decay" if decay else "no_decay"
        group = groups.setdefault(key, {
            "name": key, "params": [], "param_names": [],
            "lr": config.lr * (ratio if fast else 1.0),
            "weight_decay": config.weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters (nothing has requires_grad=True)")
    order = ["decay", "no_decay", "lora_B", "lora_B_no_decay"]
    return [groups[k] for k in order if k in groups]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only, grouped as `build_param_groups` says: torch's, or with
    `config.optimizer == "adamw8bit"` torchao's AdamW8bit (8-bit block-wise moments)."""
    groups = build_param_groups(model, config)
    if config.optimizer == "adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    # On a CPU torch's fused kernel (one pass over each tensor's values, moments and gradient) updates the LoRA
    # tensors in about a third of foreach's time, whose CPU version is a loop of single-tensor ops; on a GPU,
    # foreach: one multi-tensor update for all the small tensors
    on_cpu = all(p.device.type == "cpu" for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                             **({"fused": True} if on_cpu else {"foreach": True}))


def warmup_steps_for(config: TrainConfig, total_steps: int) -> int:
    """Warmup length: `warmup_steps` when set, else ceil(warmup_ratio x total_steps)."""
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return min(math.ceil(config.warmup_ratio * total_steps), total_steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warmup: step k < warmup uses (k + 1) / warmup, so the first step already learns and the last
    warmup step reaches the peak. Then `progress` runs from 0 (first step after warmup) towards 1
    (one step past the end): cosine = (1 + cos(pi * progress)) / 2, linear = 1 - progress,
    constant = 1. The final step therefore has a small but non-zero lr.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_factor` to every group's own peak lr (so LoRA+ keeps its ratio)."""
    warmup = warmup_steps_for(config, total_steps)
    schedule = config.lr_schedule

    def factor(step: int) -> float:  # a plain function: LambdaLR then saves no lambda state
        return lr_factor(step, total_steps, warmup, schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def schedule_fn(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The lr (not the factor) of the base group at each 0-based step, for plots and tests."""
    warmup = warmup_steps_for(config, total_steps)
    return lambda step: config.lr * lr_factor(step, total_steps, warmup, config.lr_schedule)
