"""LoftQ init (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"), with PEFT's semantics.

A quantized base Q alone loses W - Q. LoftQ picks Q and the adapter together: alternately
    Q = dequant(quant(W - s·B A))        (s: the adapter's scaling)
    s·B A = the rank-r truncated SVD of W - Q
for `loftq_iter` steps, starting from B A = 0. The base layer's weight becomes Q (dense, holding exactly the
quantized values, as PEFT leaves it), so base + adapter starts at Q + s·B A ≈ W, closer than Q alone.

Quantizers: 4 bits is NF4 through lorakit's own quantizer (lorakit.quant.nf4, which needs torchao: the
`qlora` extra), imported only when LoftQ runs; 8 bits is int8 with one absmax per row (bitsandbytes'
vectorwise int8, which PEFT uses), plain torch.

Difference from PEFT (documented): PEFT's factors fit W - Q without the scaling, so they compensate only
when lora_alpha equals r (scaling 1, PEFT's default); lorakit divides them by the scaling, so
Q + s·B A ≈ W for any lora_alpha. Both are the same where scaling is 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from .layer import LoraLayer


def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (rows, cols) quantized to int8 with one absmax per row, and back (bitsandbytes' vectorwise int8)."""
    absmax = weight.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)  # (rows, 1)
    return torch.round(weight * (127.0 / absmax)).clamp(-127, 127) * (absmax / 127.0)


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (rows, cols) quantized to NF4 by lorakit's quantizer, and back, in float32."""
    from ..quant.nf4 import quantize_weight  # (torchao: the qlora extra; ConfigError naming it if missing)

    return quantize_weight(weight, torch.float32).get_original_weight().float()


ROUNDTRIPS = {4: nf4_roundtrip, 8: int8_roundtrip}
"""loftq_bits -> quantize-then-dequantize of a 2-D float32 matrix."""


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, rank: int, scaling: float, bits: int = 4, steps: int = 1,
                  roundtrip=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating fit of `weight` (out, in).

    Args:
        weight: the dense weight W (out, in); roundtrip: a function quantizing and dequantizing a (out, in)
            float32 matrix (default: ROUNDTRIPS[bits]; lorakit layers pass one in the base weight's layout).
    Returns:
        (Q (out, in), A (r, in), B (out, r)), float32, with Q the dequantized values of quant(W - s·B A) and
        s·B A the rank-r truncated SVD of W - Q.
    """
    if bits not in ROUNDTRIPS:
        raise ConfigError([f"loftq_bits must be 4 (NF4) or 8 (int8), got {bits!r}"], where="loftq_config")
    if steps < 1:
        raise ConfigError([f"loftq_iter must be a positive integer, got {steps!r}"], where="loftq_config")
    if rank > min(weight.shape):
        raise ConfigError([f"LoftQ: rank {rank} exceeds the weight's smaller side {min(weight.shape)} "
                           f"(shape {tuple(weight.shape)}); lower r (or rank_pattern) for this layer"], where="loftq")
    roundtrip = roundtrip or ROUNDTRIPS[bits]
    W = weight.detach().float()  # (out, in)
    target = W  # what is quantized: W minus the current adapter
    for step in range(steps):
        Q = roundtrip(target)  # (out, in)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = torch.sqrt(S[:rank] / scaling)  # (r,): s·B A = U_r diag(S_r) Vh_r
        A = root[:, None] * Vh[:rank]  # (r, in)
        B = U[:, :rank] * root[None, :]  # (out, r)
        if step + 1 < steps:
            target = W - scaling * (B @ A)
    return Q, A, B


@torch.no_grad()
def init_loftq(layer: "LoraLayer", name: str, loftq_config: dict) -> None:
    """Initialise adapter `name` of `layer` by LoftQ; the layer's base weight becomes Q (in its own dtype).

    Raises:
        ConfigError: the base is already quantized (LoftQ needs the dense W), the layer is not a matrix LoRA
            (embedding or linear-like), or its weight cannot be quantized to NF4 (shape).
    """
    where = f"LoftQ on {type(layer.base_layer).__name__}"
    weight = layer.base_weight()
    if callable(getattr(weight, "get_original_weight", None)):
        raise ConfigError([f"{where}: the base weight is already quantized, and LoftQ needs the dense weight; load "
                           "the model unquantized (no --quantize): LoftQ quantizes the base itself"], where="loftq")
    A, B = layer.factor_matrices(name)
    W = layer.weight_matrix().reshape(B.shape[0], -1)  # (out, in_flat)
    if getattr(layer, "grouped", False) or A.shape[1] != W.shape[1]:
        raise ConfigError([f"{where}: init_lora_weights='loftq' needs a LoRA update of W's shape; use another "
                           "init for this layer, or exclude it from target_modules"], where="loftq")
    bits = loftq_config.get("loftq_bits", 4)

    def roundtrip(matrix: torch.Tensor) -> torch.Tensor:  # quantized in the weight's own layout, as PEFT
        stored = layer._to_weight_layout(matrix)
        stored2d = stored.reshape(stored.shape[0], -1)
        if bits == 4:
            from ..quant.nf4 import why_not_quantizable

            problem = why_not_quantizable(stored2d)
            if problem:
                raise ConfigError([f"{where}: NF4 cannot hold this weight: {problem}; exclude the layer from "
                                   "target_modules or use loftq_bits=8"], where="loftq")
        return layer._to_weight_layout(ROUNDTRIPS[bits](stored2d).reshape(stored.shape))

    Q, A0, B0 = loftq_factors(W, layer.r[name], layer.scaling[name], bits,
                              loftq_config.get("loftq_iter", 1), roundtrip)
    A.copy_(A0.to(A.dtype))
    B.copy_(B0.to(B.dtype))
    layer._write_weight(Q)


@torch.no_grad()
def loftq_before_quantization(model: "torch.nn.Module", config, steps: int = 1) -> dict:
    """QLoRA started by LoftQ (`lorakit train --quantize nf4 --init-lora-weights loftq`), on the dense model before it
    is quantized: each nn.Linear `config` targets gets LoftQ's NF4 fit, its weight becoming Q (dense, holding NF4's
    values, which the quantization that follows keeps up to the rounding of its 8-bit scales) and its (A, B)
    returned by module name, for `start_from_loftq` to put into the adapter made after quantization. Other targets
    keep the usual init."""
    from torch import nn

    from .inject import find_targets
    from .spectrum import layer_scaling

    factors = {}
    for name in find_targets(model, config):
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            continue
        Q, A, B = loftq_factors(module.weight, config.rank_for(name), layer_scaling(config, name), bits=4, steps=steps)
        module.weight.copy_(Q.to(module.weight.dtype))
        factors[name] = (A, B)
    return factors


@torch.no_grad()
def start_from_loftq(model: "torch.nn.Module", factors: dict, adapter: str = "default") -> None:
    """Copy `loftq_before_quantization`'s (A, B) into adapter `adapter` of the LoRA model made from that model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, (A, B) in factors.items():
        a, b = base.get_submodule(name).factor_matrices(adapter)
        a.copy_(A.to(a.dtype))
        b.copy_(B.to(b.dtype))
