"""Where the Triton kernels run: on CUDA tensors, when Triton is installed."""
from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_runs(t: torch.Tensor) -> bool:
    """True when the kernels take tensor `t` (CUDA, with Triton). Elsewhere the plain code runs. (The
    tests also run the kernels on CPU tensors, under Triton's interpreter, by calling them directly.)"""
    return HAS_TRITON and t.is_cuda
