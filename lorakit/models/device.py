"""Turn the user's `--device` / `--dtype` words into torch objects, with clear errors.

"auto" picks the fastest safe choice for the machine: CUDA, else Apple MPS, else CPU; bf16 on a
CUDA GPU that supports it, fp32 everywhere else (fp16 needs loss scaling to train safely, so it is
never chosen silently). Training goes further on a CPU that computes bf16 natively: see
`lorakit.train.runtime.training_dtype`.
"""
from __future__ import annotations

import logging
import re

import torch

from lorakit.errors import ConfigError

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")

#: Accepted dtype words -> torch dtype ("auto" is resolved per device by `resolve_dtype`).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for `device`.

    Args:
        device: "auto" (CUDA if available, else MPS, else CPU), "cpu", "cuda", "cuda:N", "mps",
            or a `torch.device`.

    Returns:
        A `torch.device` that exists on this machine.

    Raises:
        ConfigError: the word is not a device, or names hardware this machine lacks.
    """
    if isinstance(device, torch.device):
        device = str(device)
    word = str(device).strip().lower()
    if word == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if word == "cpu":
        return torch.device("cpu")
    if word == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' was requested but Apple MPS is not available here; "
                              "use 'cpu' or 'auto'", where="device")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", word)
    if match is None:
        raise ConfigError(f"unknown device {device!r}; choose one of: {', '.join(DEVICE_CHOICES)}",
                          where="device")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available here "
                          "(no GPU, or a CPU-only torch build); use 'cpu' or 'auto'", where="device")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)", where="device")
    return torch.device(word)


def _device_type(device: str | torch.device) -> str:
    if isinstance(device, torch.device):
        return device.type
    word = str(device).strip().lower()
    if word == "auto":
        return resolve_device("auto").type
    try:
        return torch.device(word).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; choose one of: {', '.join(DEVICE_CHOICES)}",
                          where="device") from None


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Return the torch dtype for `dtype` on `device`.

    Args:
        dtype: "auto" (bf16 on a CUDA GPU that supports it, fp32 otherwise), "fp32"/"float32",
            "bf16"/"bfloat16", "fp16"/"float16", or a floating-point `torch.dtype`.
        device: where the model will run (a word or a `torch.device`).

    Returns:
        A floating-point `torch.dtype`.

    Raises:
        ConfigError: the word is not a dtype, or bf16 was asked of a GPU without bf16 support.
    """
    device_type = _device_type(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ConfigError(f"unsupported dtype {dtype}; choose one of: {', '.join(DTYPE_CHOICES)}",
                              where="dtype")
        resolved = dtype
    else:
        word = str(dtype).strip().lower().removeprefix("torch.")
        if word == "auto":
            if device_type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float32
        if word not in DTYPE_NAMES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_CHOICES)}",
                              where="dtype")
        resolved = DTYPE_NAMES[word]
    if resolved is torch.bfloat16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype bf16 was requested but this GPU does not support bfloat16; "
                          "use 'fp16' or 'fp32'", where="dtype")
    if resolved is torch.float16 and device_type == "cpu":
        logger.warning("fp16 on CPU is slow and some operations lack fp16 kernels; "
                       "bf16 or fp32 is the better choice on CPU")
    return resolved


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 since Cooper Lake and Zen 4, AMX since
    Sapphire Rapids), as torch's own dispatch sees it; False where torch cannot tell."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        supported = getattr(torch.cpu, probe, None)
        if callable(supported) and supported():
            return True
    return False


def cpu_matmul_rates(rows: int = 256, inner: int = 576, out: int = 1536, rounds: int = 5) -> dict[str, float]:
    """GFLOP/s of a (rows x inner) @ (inner x out) matmul in fp32 and in bf16 on this CPU, the best of
    `rounds` alternated rounds (alternated, so a busy spell slows both alike; the best, so it slows neither).
    About 0.1-0.3 s."""
    import time

    flops = 2 * rows * inner * out * 3
    best = {"float32": 0.0, "bfloat16": 0.0}
    operands = {name: (torch.randn(rows, inner).to(getattr(torch, name)),
                       torch.randn(inner, out).to(getattr(torch, name))) for name in best}
    for name, (a, b) in operands.items():
        a @ b  # warm the kernels
    for _ in range(rounds):
        for name, (a, b) in operands.items():
            started = time.perf_counter()
            for _ in range(3):
                a @ b
            best[name] = max(best[name], flops / (time.perf_counter() - started) / 1e9)
    return best
