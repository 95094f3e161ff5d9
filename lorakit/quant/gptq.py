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


class _Enough(Exception):
    """Raised inside a calibration forward once every hooked layer has had its inputs."""


@torch.no_grad()
def input_moments(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """H = Σ x xᵀ (fp32) of each named linear layer's inputs over the calibration `batches` (the model's
    forward keyword arguments, e.g. input_ids and attention_mask): one pass of the model as it is now
    (quantize_model calibrates group by group, so later layers see the earlier ones quantized).

    Only real tokens count: where the batch has an attention_mask and a layer's input has its shape, the
    padding positions are left out. The first batch runs the whole forward; later ones stop once the layer
    called last on the first batch has been called as often as then (no LM head, no layers after the group).
    Layers called one after another on the same input tensor (an attention's q, k and v; an MLP's gate and
    up) get one matrix between them, accumulated once: the same values, a third of the work for q, k, v.
    Which layers share is settled on the first batch; a later batch that gives them different inputs
    is refused (no model seen so far does that)."""
    moments = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in layers.items()}
    shares: dict[str, str] = {}  # layer -> the layer whose matrix it shares (settled on the first batch)
    state = {"first": True, "input": None, "owner": None, "mask": None, "real": None, "last": None, "calls": 0,
             "expected": 0}
    first_counts: dict[str, int] = {}

    def hook(name):
        def accumulate(module, args):
            x, first = args[0], state["first"]
            if first and state["input"] is x and name not in shares:
                shares[name] = shares.get(state["owner"], state["owner"])
                moments[name] = moments[shares[name]]
            elif name in shares:
                if state["input"] is not x:
                    raise RuntimeError(f"GPTQ calibration: {name} shared its input with {shares[name]} on the "
                                       f"first batch but not on a later one; calibrate this model with "
                                       f"--quantize-calibration 0 (round to nearest)")
            else:
                mask, real = state["mask"], state["real"]
                rows = x.reshape(-1, x.shape[-1])
                if mask is not None and x.shape[:-1] == mask.shape:
                    rows = rows.index_select(0, real)
                rows = rows.float()  # (real tokens, in)
                moments[name].addmm_(rows.t(), rows)
                state["input"], state["owner"] = x, name
            if first:
                state["last"] = name
                first_counts[name] = first_counts.get(name, 0) + 1
            elif name == state["last"]:
                state["calls"] += 1
                if state["calls"] == state["expected"]:
                    raise _Enough  # every layer before it has run: the rest of the forward is not needed
        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    training = model.training
    model.eval()  # no dropout in the statistics
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            real = None if mask is None else mask.flatten().nonzero().squeeze(1)  # found once per batch
            state.update(input=None, owner=None, calls=0, mask=mask, real=real)
            try:
                model(**batch)
            except _Enough:
                pass
            if state["first"]:  # later batches stop once the first batch's last layer has had all its calls
                state.update(first=False, expected=first_counts.get(state["last"], 0))
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
    # column j of W is row j here: the loop below takes one tensor operation per step where it can
    w, s = w.t().contiguous(), s.t().contiguous()  # (in, out)
    midpoints = (levels[1:] + levels[:-1]) / 2  # the nearest of the sorted levels: bucketize by the midpoints
    pivots = u.diagonal().tolist()
    codes = torch.empty(in_f, out_f, dtype=torch.long, device=weight.device)
    for start in range(0, in_f, COLUMNS_PER_PASS):
        stop = min(start + COLUMNS_PER_PASS, in_f)
        errors = torch.empty(stop - start, out_f, device=weight.device)
        for j in range(start, stop):
            w_j, s_j = w[j], s[j]  # (out,)
            code = torch.bucketize(w_j / s_j, midpoints)
            error = torch.sub(w_j, levels[code] * s_j, out=errors[j - start]).div_(pivots[j])
            w[j + 1:stop].addr_(u[j, j + 1:stop], error, alpha=-1)
            codes[j] = code
        w[stop:].addmm_(u[start:stop, stop:].t(), errors, alpha=-1)
    return codes.t()[:, torch.argsort(order)].to(torch.uint8)  # back to the weight's layout and column order


@torch.no_grad()
def requantize_nf4_(weight, codes: torch.Tensor) -> None:
    """Write `codes` (out, in) into a torchao NF4Tensor's packed data (two codes a byte, the first high)."""
    flat = codes.reshape(-1)
    weight.quantized_data.copy_((flat[0::2] << 4) | flat[1::2])
