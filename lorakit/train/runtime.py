"""Run-time settings around the loop: seeding, autocast, gradient checkpointing, the model's device."""
from __future__ import annotations

import contextlib
import functools
import os
import random
import time
import warnings
from typing import ContextManager, Optional, Union

import numpy as np
import torch
from torch import nn

from lorakit.fast import recompute


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def autocast_dtype(device: torch.device, dtype: str,
                   weights: Optional[torch.dtype] = None) -> Optional[torch.dtype]:
    """The autocast dtype for `--dtype` on `device`, or None for plain fp32 (no autocast).

    auto: bf16 on a CUDA GPU with bf16; on a CPU, bf16 when the frozen `weights` are bf16 (what `lorakit train`
    loads on a CPU that multiplies bf16 natively: see `training_dtype`), else fp32; bfloat16 / float16: that
    dtype; float32: no autocast.
    """
    if dtype == "auto" and device.type == "cpu":
        return torch.bfloat16 if weights == torch.bfloat16 else None
    word = training_dtype(dtype, device)[0]
    return None if word == "float32" else getattr(torch, word)


def frozen_weights_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first frozen floating-point parameter (None if it has none)."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            return param.dtype
    return None


def training_dtype(dtype: str, device: Union[str, torch.device], cpu_bf16: bool = True) -> tuple[str, str]:
    """(the dtype word training uses for `--dtype` on `device`, why): "auto" becomes bfloat16 on a CUDA GPU
    with bf16 and on a CPU that multiplies bf16 natively and measurably faster than fp32 (frozen weights in
    bf16, LoRA factors and optimizer state in fp32, matmuls in bf16 under autocast), float32 elsewhere.
    LORAKIT_CPU_BF16=0 (or 1) turns the CPU choice off (or on) whatever the CPU. Asked once per process.
    cpu_bf16=False keeps a CPU run in fp32 (QLoRA and FSDP, whose bf16 paths on CPU were not measured)."""
    if dtype != "auto":
        return dtype, f"{dtype} (--dtype)"
    kind = torch.device(device).type if not isinstance(device, str) or device != "auto" else \
        ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cpu":  # the loader's own rule for "auto": bf16 on a CUDA GPU that has it, fp32 elsewhere
        from lorakit.models.device import resolve_dtype

        word = str(resolve_dtype("auto", kind)).removeprefix("torch.")
        return word, f"{word} ({kind}{' with bf16' if word == 'bfloat16' else ''})"
    if not cpu_bf16:
        return "float32", "float32 (--dtype auto keeps QLoRA and FSDP runs on CPU in fp32)"
    return _cpu_choice()


@functools.lru_cache(maxsize=1)
def _cpu_choice() -> tuple[str, str]:
    from lorakit.models.device import cpu_matmul_rates, cpu_native_bf16

    forced = os.environ.get("LORAKIT_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        word = "bfloat16" if forced == "1" else "float32"
        return word, f"{word} (LORAKIT_CPU_BF16={forced})"
    if not cpu_native_bf16():
        return "float32", "float32 (this CPU has no native bf16: --dtype bfloat16 would be slower)"
    rates = cpu_matmul_rates()
    speedup = rates["bfloat16"] / rates["float32"]
    measured = f"bf16 matmuls {rates['bfloat16']:.0f} vs fp32 {rates['float32']:.0f} GFLOP/s here"
    if speedup < CPU_BF16_MIN_SPEEDUP:
        return "float32", f"float32 (native bf16, but {measured}: not worth it; --dtype bfloat16 to use it)"
    return "bfloat16", f"bfloat16 weights, fp32 LoRA factors (native bf16 CPU: {measured}; --dtype float32 for fp32)"


CPU_BF16_MIN_SPEEDUP = 1.5
"""How much faster a bf16 matmul must measure than fp32 for `--dtype auto` to train in bf16 on a CPU."""


def keep_trainable_in_fp32(model: nn.Module) -> int:
    """Master copies: every trainable parameter in fp32 (LoRA factors, a trained head, token rows), the frozen
    weights as loaded; autocast casts the factors for each matmul, and the optimizer steps on fp32 (its state
    too). Returns how many parameters changed dtype."""
    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            changed += 1
    return changed


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """`torch.autocast` for `dtype`, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 and fp32 have the range to do without)."""
    enabled = dtype == torch.float16
    return torch.amp.GradScaler(device.type if enabled else "cpu", enabled=enabled)


def enable_gradient_checkpointing(model: nn.Module) -> bool:
    """Turn on non-reentrant activation checkpointing if the model supports it.

    Uses `activation_checkpointing_enable` (transformers 5) when present, else the older
    `gradient_checkpointing_enable`, both with use_reentrant=False and lorakit's lean recompute (a
    Llama-family layer's recompute skips its down_proj base matmul; see lorakit.fast.recompute).

    With frozen input embeddings the first checkpointed block would get inputs that need no grad,
    so `enable_input_require_grads` is called then (as PEFT's prepare_model_for_kbit_training does).
    Returns whether checkpointing was enabled.
    """
    kwargs = dict(recompute.CHECKPOINT_KWARGS)
    recompute.mark_recompute_outputs(model)
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        warnings.warn(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                      "training without gradient checkpointing", stacklevel=2)
        return False
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    frozen = embeddings is not None and not any(p.requires_grad for p in embeddings.parameters())
    if frozen and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return True


def cpu_threads_for_load(cores: Optional[int] = None, load: Optional[float] = None) -> tuple[int, Optional[str]]:
    """(torch threads to use on the CPU, a line saying why, or None when all cores are free).

    Torch's CPU threads spin at every barrier: on cores that other processes also want, they wait on each
    other far more than they compute (10x slower and worse on two busy cores). So take one thread per core
    the other work leaves free, at least one. `load`: cores in use by other work; default measured now (the
    CPU time all processes took over a quarter second: the load average lags a minute behind, and would still
    count a run that just ended). The user's own choice (OMP_NUM_THREADS, or torch.set_num_threads called
    before) is left alone."""
    if "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() != _default_threads():
        return torch.get_num_threads(), None
    cores = cores or _default_threads()
    if load is None:
        load = _cores_in_use()
        if load is None:
            return torch.get_num_threads(), None
    free = max(1, int(cores - load + 0.5))
    if free >= min(cores, torch.get_num_threads()):
        return torch.get_num_threads(), None
    return free, (f"the CPU is busy (other work is using {load:.1f} of {cores} cores): training on {free} "
                  f"thread{'s' if free > 1 else ''} so they do not fight it for cores (OMP_NUM_THREADS=N chooses)")


def _cores_in_use(seconds: float = 0.25) -> Optional[float]:
    """How many cores' worth of CPU time the machine's processes took over `seconds` (Linux /proc/stat),
    None where that cannot be read. Scaled to the cores this process may use."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]) - idle, sum(values[:8])

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


def _default_threads() -> int:
    """What torch picks when nobody chose: one thread per core it may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
