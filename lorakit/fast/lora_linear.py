"""The LoRA linear layer as one autograd function: y = x Wᵀ + b + s·(d Aᵀ) Bᵀ, d = dropout(x) (or x).

Autograd over the plain layer keeps the branch as separate ops: a scaled copy of the update, an add,
and in the backward a second add of the input gradients. Here the base matmul accumulates onto the
rank-r product inside the matmul (addmm), and the backward computes only what LoRA trains, smallest products
first (W and b are frozen: no weight gradient, and no (out x in) matrix is ever formed):

    g  = s · dy B                 (tokens, r)
    dB = dyᵀ (s · d Aᵀ)           (out, r)     s · d Aᵀ is kept from the forward
    dA = gᵀ d                     (r, in)
    dx = dy W + g A               (tokens, in) with no dropout; with dropout, dd = g A goes back
                                               through the dropout mask to x
"""
from __future__ import annotations

from typing import Optional

import torch


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling · (a @ b) as one matmul: addmm with beta 0 ignores its input (so an unfilled one will do)
    and applies alpha inside the product, so the scale costs no extra kernel."""
    return torch.addmm(a.new_empty(()).expand(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scaling)


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropped: Optional[torch.Tensor]) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        branch_in = flat if dropped is None else dropped.reshape(flat.shape)
        low = _scaled_mm(branch_in, lora_a.t(), scaling)  # (tokens, r) = s·d Aᵀ
        # the rank-r product first, then the base matmul accumulates onto it: one pass over the output
        # fewer than adding the small product to a finished base output
        out = low @ lora_b.t() if bias is None else torch.addmm(bias, low, lora_b.t())
        out.addmm_(flat, weight.t())  # (tokens, out)
        ctx.save_for_backward(branch_in, low, weight, lora_a, lora_b)
        ctx.scaling, ctx.in_shape, ctx.dropout = scaling, x.shape, dropped is not None
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        branch_in, low, weight, lora_a, lora_b = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        g = _scaled_mm(dy, lora_b, ctx.scaling)  # (tokens, r)
        grad_x = grad_a = grad_b = grad_dropped = None
        if ctx.needs_input_grad[0]:
            if ctx.dropout:
                grad_x = dy @ weight
                grad_dropped = (g @ lora_a).reshape(ctx.in_shape)
            else:
                grad_x = (g @ lora_a).addmm_(dy, weight)  # the small product first, as in the forward
            grad_x = grad_x.reshape(ctx.in_shape)
        if ctx.needs_input_grad[3]:
            grad_a = g.t() @ branch_in  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_b = dy.t() @ low  # (out, r); low already holds the scaling
        return grad_x, None, None, grad_a, grad_b, None, grad_dropped


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropped: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x Wᵀ + b + scaling · (d Aᵀ) Bᵀ for x (..., in), W (out, in), A (r, in), B (out, r), where d is
    `dropped` (x after the adapter's dropout, same shape) or x itself. Gradients reach x, A and B (W and b
    must be frozen: they get none)."""
    return _LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropped)
