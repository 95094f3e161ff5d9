"""NF4 (QLoRA's 4-bit NormalFloat) weights with double-quantized scales, through torchao's NF4Tensor.

Why torchao and not bitsandbytes: torchao's `NF4Tensor` (`torchao.quantization.NF4Tensor` / `to_nf4`, the
implementation torchtune's QLoRA uses) is pure PyTorch, so the same code runs and is tested on CPU and
CUDA; bitsandbytes' 4-bit kernels are CUDA-only and would leave the CPU path untested. torchao is imported
here, lazily, never by lorakit's core.

The format (Dettmers et al. 2023, "QLoRA"): weights are cut into blocks of 64 values; each value is
stored as a 4-bit index into the 16 NF4 levels (quantiles of a unit normal), scaled by the block's
absmax. Double quantization: the absmax scales, minus their mean, are themselves quantized to int8 in
blocks of `scaler_block_size` (256 when the block count allows it) with one float factor per block.
Bytes per weight: 0.5 + 1/64 + (factor bytes) / (64 · scaler_block_size) ≈ 0.516.

How it computes: the layer stays a plain `nn.Linear` whose `weight` is an `NF4Tensor` parameter
(requires_grad=False). torchao routes `F.linear(x, nf4_weight)` to its `LinearNF4` autograd function,
which dequantizes the weight to x's dtype for the matmul in forward and again in backward, saving only
the 4-bit weight for backward, never a dense copy. On CUDA (with Triton) the layer's forward does the
same with lorakit's dequantization kernel (`lorakit.fast.kernels.nf4`: the same values, but only the
dense weight is allocated, where torchao's makes ~15 bytes of temporaries per value). Because the module
is still an `nn.Linear`, lorakit's injection finds and wraps it unchanged, and LoRA's A and B stay dense.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..fast.kernels.nf4 import nf4_dequantize
from ..fast.kernels.runtime import triton_runs

BLOCK_SIZE = 64
"""Values per absmax block (QLoRA's and torchao's default)."""
SCALER_BLOCK_SIZE = 256
"""Scales per int8 block of the double quantization, when the layer's block count allows it."""


def _torchao_nf4():
    """(NF4Tensor, to_nf4) from torchao, or a ConfigError saying how to install it."""
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError as err:
        raise ConfigError([f"QLoRA (quantize='nf4') needs torchao: pip install 'lorakit[qlora]' (or pip install "
                           f"torchao); importing it failed: {err}"], where="quantize") from None
    return NF4Tensor, to_nf4


def is_nf4(weight: torch.Tensor) -> bool:
    """True for a torchao NF4Tensor (checked by class name first, so torchao is imported only when needed)."""
    if "NF4" not in type(weight).__name__:
        return False
    NF4Tensor, _ = _torchao_nf4()
    return isinstance(weight, NF4Tensor)


def scaler_block_size(numel: int) -> Optional[int]:
    """The double-quantization block for a weight of `numel` values, or None when it cannot be quantized.

    torchao needs numel divisible by BLOCK_SIZE and the number of blocks divisible by the scaler block.
    256 is QLoRA's choice; shapes such as SmolLM2's (192, 576) k_proj (1,728 blocks) need a smaller
    one, so the largest divisor of the block count up to 256 is taken (at least 2 scales a block).
    """
    if numel % BLOCK_SIZE:
        return None
    n_blocks = numel // BLOCK_SIZE
    for size in range(min(SCALER_BLOCK_SIZE, n_blocks), 1, -1):
        if n_blocks % size == 0:
            return size
    return None


def why_not_quantizable(weight: torch.Tensor) -> Optional[str]:
    """None when `weight` can become NF4, else the reason in words."""
    if weight.dim() != 2:
        return f"weight has {weight.dim()} dimensions; NF4 needs a 2-D matrix"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.numel() % BLOCK_SIZE:
        return f"{weight.numel()} values is not a multiple of the NF4 block size {BLOCK_SIZE}"
    if scaler_block_size(weight.numel()) is None:
        return f"{weight.numel()} values make a single block of {BLOCK_SIZE}; too small to double-quantize"
    return None


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """`weight` (out, in) as an NF4Tensor that dequantizes to `compute_dtype`.

    Raises:
        ValueError: the weight cannot be quantized (see `why_not_quantizable`), or quantizing gave
            non-finite values (e.g. an all-zero block).
    """
    _, to_nf4 = _torchao_nf4()
    problem = why_not_quantizable(weight)
    if problem:
        raise ValueError(problem)
    dense = weight.detach().to(compute_dtype).contiguous()
    q = to_nf4(dense, BLOCK_SIZE, scaler_block_size(dense.numel()))
    if not torch.isfinite(q.get_original_weight()).all():
        raise ValueError("NF4 quantization gave non-finite values (a block of zeros or a constant block)")
    return q


def quantize_linear_(module: nn.Linear, compute_dtype: torch.dtype) -> None:
    """Replace `module.weight` by its frozen NF4 version, in place; the bias stays dense."""
    nf4 = quantize_weight(module.weight, compute_dtype)
    module.weight = nn.Parameter(nf4, requires_grad=False)
    if module.bias is not None:
        module.bias.data = module.bias.data.to(compute_dtype)
    module.forward = functools.partial(_nf4_linear_forward, module)  # (a partial pickles; a bound method would not)


@torch.no_grad()
def dequantize_linear_(module: nn.Linear, dtype: Optional[torch.dtype] = None) -> None:
    """Replace an NF4 `module.weight` by a dense frozen weight in `dtype` (default: its compute dtype)."""
    weight = module.weight
    dense = weight.get_original_weight()
    module.weight = nn.Parameter(dense.to(dtype or dense.dtype), requires_grad=weight.requires_grad)
    module.__dict__.pop("forward", None)  # nn.Linear's own forward again


def _nf4_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if triton_runs(x) and is_nf4(self.weight):
        return _NF4Linear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)  # torchao's LinearNF4


class _NF4Linear(torch.autograd.Function):
    """x Wᵀ + b for a frozen NF4 W, dequantized by lorakit's kernel in forward and again in backward
    (only the 4-bit weight is kept between them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, nf4_dequantize(weight).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad_out @ nf4_dequantize(weight).to(grad_out.dtype), None, None


def nf4_bytes(weight: torch.Tensor) -> int:
    """Bytes an NF4Tensor really holds: the packed 4-bit data, int8 scales and the per-block factors."""
    parts = (weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
             weight.nf4)
    return sum(p.numel() * p.element_size() for p in parts)
