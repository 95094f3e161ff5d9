"""The LoRA linear layer as one autograd function: y = x Wᵀ + b + s·(d Aᵀ) Bᵀ, d = dropout(x) (or x).

Autograd over the plain layer keeps the branch as separate ops: a scaled copy of the update, an add,
and in the backward a second add of the input gradients. Here the base matmul accumulates onto the
rank-r product inside the matmul (addmm), and the backward computes only what LoRA trains, smallest products
first (W and b are frozen: no weight gradient, and no (out x in) matrix is ever formed):

    low = d (s·A)ᵀ                (tokens, r)  kept for dB
    y   = x Wᵀ + b + low Bᵀ       (tokens, out)
    g   = dy B                    (tokens, r)
    dB  = dyᵀ low                 (out, r)
    dA  = s · gᵀ d                (r, in)
    dx  = dy W + g (s·A)          (tokens, in) with no dropout; with dropout, dd = g (s·A) goes back
                                               through the dropout mask to x

The products use s·A and B in x's dtype (`compute_factors`; fp32 factors under bf16 autocast are cast as
autocast would), which a layer can keep from one call to the next while its factors do not change.
"""
from __future__ import annotations

from typing import Optional

import torch


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling · (a @ b) as one matmul: addmm with beta 0 ignores its input (so an unfilled one will do)
    and applies alpha inside the product, so the scale costs no extra kernel."""
    return torch.addmm(a.new_empty(()).expand(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scaling)


def compute_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·A, B) in `dtype`, outside autograd: the operands the fused functions multiply by."""
    with torch.no_grad():
        return (lora_a * scaling).to(dtype), lora_b.to(dtype)


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropped: Optional[torch.Tensor], output_unused: bool,
                factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = factors  # s·A, B in x's dtype; lora_a and lora_b only receive their gradients
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        branch_in = flat if dropped is None else dropped.reshape(flat.shape)
        low = branch_in @ a.t()  # (tokens, r)
        ctx.save_for_backward(branch_in, low, weight, a, b)
        ctx.scaling, ctx.in_shape, ctx.dropout, ctx.factor_dtype = scaling, x.shape, dropped is not None, lora_a.dtype
        if output_unused:  # a checkpoint recompute that only wants the saved tensors back
            return x.new_empty(()).expand(*x.shape[:-1], weight.shape[0])
        # the rank-r product first, then the base matmul accumulates onto it: one pass over the output
        # fewer than adding the small product to a finished base output
        out = low @ b.t() if bias is None else torch.addmm(bias, low, b.t())
        out.addmm_(flat, weight.t())  # (tokens, out)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        branch_in, low, weight, a, b = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        g = dy @ b  # (tokens, r)
        grad_x = grad_a = grad_b = grad_dropped = None
        if ctx.needs_input_grad[0]:
            if ctx.dropout:
                grad_x = dy @ weight
                grad_dropped = (g @ a).reshape(ctx.in_shape)
            else:
                grad_x = (g @ a).addmm_(dy, weight)  # the small product first, as in the forward
            grad_x = grad_x.reshape(ctx.in_shape)
        if ctx.needs_input_grad[3]:  # in the factors' own dtype, as autograd's cast back would give them
            grad_a = _scaled_mm(g.t(), branch_in, ctx.scaling).to(ctx.factor_dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_b = (dy.t() @ low).to(ctx.factor_dtype)  # (out, r); low already holds the scaling
        return grad_x, None, None, grad_a, grad_b, None, grad_dropped, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropped: Optional[torch.Tensor] = None,
                output_unused: bool = False,
                factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """x Wᵀ + b + scaling · (d Aᵀ) Bᵀ for x (..., in), W (out, in), A (r, in), B (out, r), where d is
    `dropped` (x after the adapter's dropout, same shape) or x itself. Gradients reach x, A and B (W and b
    must be frozen: they get none). A and B may be in another dtype than x (fp32 factors under bf16
    autocast): the products use `factors` (compute_factors(A, B, scaling, x.dtype), made here when not
    given) and A's and B's gradients come back in their own dtype. `output_unused`: save for the backward
    as always but return an unfilled tensor of the output's shape (a checkpoint recompute that discards
    it; see lorakit.fast.recompute)."""
    factors = factors if factors is not None else compute_factors(lora_a, lora_b, scaling, x.dtype)
    return _LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropped, output_unused, factors)


class _LoraPairFunction(torch.autograd.Function):
    """Two LoRA linears on one input (an MLP's gate and up): both A-products in one matmul over x, in the
    forward and for the A gradients, and the input gradient of both in one buffer (no add of two)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                a2: torch.Tensor, b2: torch.Tensor, scaling: float, factors1: tuple, factors2: tuple):
        a = torch.cat([factors1[0], factors2[0]])  # (2r, in): s·[A1; A2]
        (_, b1_), (_, b2_), r = factors1, factors2, a1.shape[0]
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        low = flat @ a.t()  # (tokens, 2r)
        out1 = (low[:, :r] @ b1_.t()).addmm_(flat, w1.t())
        out2 = (low[:, r:] @ b2_.t()).addmm_(flat, w2.t())
        ctx.save_for_backward(flat, low, w1, w2, a, b1_, b2_)
        ctx.scaling, ctx.in_shape, ctx.factor_dtype = scaling, x.shape, a1.dtype
        return out1.reshape(*x.shape[:-1], -1), out2.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad1: torch.Tensor, grad2: torch.Tensor):
        flat, low, w1, w2, a, b1, b2 = ctx.saved_tensors
        r = b1.shape[1]
        dy1, dy2 = grad1.reshape(-1, grad1.shape[-1]), grad2.reshape(-1, grad2.shape[-1])
        g = torch.cat([dy1 @ b1, dy2 @ b2], dim=1)  # (tokens, 2r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ a).addmm_(dy1, w1).addmm_(dy2, w2).reshape(ctx.in_shape)
        grad_a = _scaled_mm(g.t(), flat, ctx.scaling).to(ctx.factor_dtype)  # (2r, in): one pass over x for both
        grad_b1 = (dy1.t() @ low[:, :r]).to(ctx.factor_dtype)
        grad_b2 = (dy2.t() @ low[:, r:]).to(ctx.factor_dtype)
        return grad_x, None, grad_a[:r], grad_b1, None, grad_a[r:], grad_b2, None, None, None


def lora_linear_pair(x: torch.Tensor, first: tuple, second: tuple) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Both outputs of two LoRA linears that read the same x, given each one's `lora_linear` arguments
    after x (LoraLinear.fused_args), in one node; None where the pair does not fit it (a bias, dropout, an
    output left unused, different scalings, ranks or factor dtypes): call the two layers then."""
    w1, bias1, a1, b1, s1, dropped1, unused1, f1 = first
    w2, bias2, a2, b2, s2, dropped2, unused2, f2 = second
    if bias1 is not None or bias2 is not None or dropped1 is not None or dropped2 is not None or unused1 or unused2:
        return None
    if s1 != s2 or a1.shape[0] != a2.shape[0] or a1.dtype != a2.dtype or b1.dtype != b2.dtype:
        return None
    f1 = f1 if f1 is not None else compute_factors(a1, b1, s1, x.dtype)
    f2 = f2 if f2 is not None else compute_factors(a2, b2, s2, x.dtype)
    return _LoraPairFunction.apply(x, w1, a1, b1, w2, a2, b2, s1, f1, f2)
