"""NF4 codes chosen against calibration inputs (GPTQ's rounding), instead of each weight's nearest level.

Round-to-nearest makes each weight's error as small as possible on its own; what the model feels is the
layer's output error ‖(W − Q) X‖ on real inputs X. GPTQ (Frantar et al. 2022) quantizes the input
columns of W one at a time and spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse of H = X Xᵀ (the inputs' second moments), which minimises that output error to
second order. Here the grid is NF4's 16 levels times each block's scale, the very scales torchao's
NF4Tensor stores (absmax per block of 64, double-quantized), so the result is an ordinary NF4 tensor:
only which of the 16 levels each weight takes differs.

    H   = Σ x xᵀ over calibration tokens (+ 1% of its mean diagonal: damping)
    U   = chol(H⁻¹)ᵀ (upper)
    for each column j:  q_j = nearest level of w_j / s,  e_j = (w_j − q_j) / U_jj,  W[:, j+1:] −= e_j U_j,j+1:
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

DAMPING = 0.01
"""Added to H's diagonal, as a fraction of its mean diagonal (GPTQ's default)."""
COLUMNS_PER_PASS = 128
"""Columns updated together before the error is pushed to the rest (GPTQ's lazy batch update)."""


@torch.no_grad()
def input_moments(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """H = Σ x xᵀ (fp32) of each named linear layer's inputs over the calibration `batches` (the model's
    forward keyword arguments, e.g. input_ids and attention_mask): one pass of the model as it is now
    (quantize_model calibrates group by group, so later layers see the earlier ones quantized)."""
    moments = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in layers.items()}

    def hook(name):
        def accumulate(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            moments[name].addmm_(x.t(), x)
        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    training = model.training
    model.eval()  # no dropout in the statistics
    try:
        for batch in batches:
            model(**batch)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return moments


@torch.no_grad()
def nf4_codes(weight: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor, moments: torch.Tensor,
              block_size: int) -> torch.Tensor:
    """The NF4 code (0..15) of every weight, chosen column by column against the input moments.

    Args:
        weight: (out, in) dense weight.
        scales: (out * in / block_size,) the dequantized per-block scales (blocks of the row-major weight).
        levels: (16,) the NF4 levels.
        moments: (in, in) H = Σ x xᵀ of the layer's inputs.
    Returns:
        (out, in) uint8 codes.
    """
    out_f, in_f = weight.shape
    h = moments.float().clone()
    dead = h.diagonal() == 0  # inputs that are always zero: their weights do not matter, keep them nearest
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True)  # the largest inputs first ("act order")
    h = h[order][:, order]
    w = weight.float()[:, order]
    s = scales.float().repeat_interleave(block_size).reshape(out_f, in_f)[:, order]  # each weight's scale
    levels = levels.float()
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (in, in)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=weight.device)
    for start in range(0, in_f, COLUMNS_PER_PASS):
        stop = min(start + COLUMNS_PER_PASS, in_f)
        errors = torch.empty(out_f, stop - start, device=weight.device)
        for j in range(start, stop):
            scale = s[:, j]  # (out,)
            code = (w[:, j:j + 1] / scale[:, None] - levels).abs().argmin(dim=1)  # (out,)
            error = (w[:, j] - levels[code] * scale) / u[j, j]
            w[:, j + 1:stop] -= error[:, None] * u[j, j + 1:stop]
            errors[:, j - start] = error
            codes[:, j] = code.to(torch.uint8)
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return codes[:, torch.argsort(order)]  # back to the weight's column order


@torch.no_grad()
def requantize_nf4_(weight, codes: torch.Tensor) -> None:
    """Write `codes` (out, in) into a torchao NF4Tensor's packed data (two codes a byte, the first high)."""
    flat = codes.reshape(-1)
    weight.quantized_data.copy_((flat[0::2] << 4) | flat[1::2])
