"""The LoRA linear layer as one autograd function: y = x Wᵀ + b + s·(d Aᵀ) Bᵀ, d = dropout(x) (or x).

Autograd over the plain layer keeps the branch as separate ops: a scaled copy of the update, an add,
and in the backward a second add of the input gradients. Here the base matmul accumulates onto the
rank-r product inside the matmul (addmm), and the backward computes only what LoRA trains, smallest products
first (W is frozen: no weight gradient, and no (out x in) matrix is ever formed):

    low = d (s·A)ᵀ                (tokens, r)  kept for dB
    y   = x Wᵀ + b + low Bᵀ       (tokens, out)
    g   = dy B                    (tokens, r)
    dB  = dyᵀ low                 (out, r)
    dA  = s · gᵀ d                (r, in)
    dx  = dy W + g (s·A)          (tokens, in) with no dropout; with dropout, dd = g (s·A) goes back
                                               through the dropout mask to x
    db  = Σ_tokens dy             (out,) only for a bias that trains (LoraConfig bias="all")

The products use s·A and B in x's dtype (`compute_factors`; fp32 factors under bf16 autocast are cast as
autocast would), which a layer can keep from one call to the next while its factors do not change.

Layers that read the same x (q, k and v; gate and up) can run as one node (`lora_linear_group`): one
matmul over x gives every member's low, one over x every member's dA, and every member's dx accumulates
into one buffer.
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
        ctx.bias_dtype = None if bias is None else bias.dtype
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
        grad_x = grad_bias = grad_a = grad_b = grad_dropped = None
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
        if ctx.needs_input_grad[2]:  # a bias that trains (LoraConfig bias="all" or "lora_only")
            grad_bias = dy.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, None, grad_dropped, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropped: Optional[torch.Tensor] = None,
                output_unused: bool = False,
                factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """x Wᵀ + b + scaling · (d Aᵀ) Bᵀ for x (..., in), W (out, in), A (r, in), B (out, r), where d is
    `dropped` (x after the adapter's dropout, same shape) or x itself. Gradients reach x, A, B and a bias that
    trains (W must be frozen: it gets none). A and B may be in another dtype than x (fp32 factors under bf16
    autocast): the products use `factors` (compute_factors(A, B, scaling, x.dtype), made here when not
    given) and A's and B's gradients come back in their own dtype. `output_unused`: save for the backward
    as always but return an unfilled tensor of the output's shape (a checkpoint recompute that discards
    it; see lorakit.fast.recompute)."""
    factors = factors if factors is not None else compute_factors(lora_a, lora_b, scaling, x.dtype)
    return _LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropped, output_unused, factors)


class _LoraGroupFunction(torch.autograd.Function):
    """LoRA linears that read the same x (an attention's q, k and v; an MLP's gate and up) as one node: all
    their A products in one matmul over x, in the forward and for the A gradients, and one input-gradient
    buffer that every member's dx accumulates into (no adds of separate ones)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stacked_a: torch.Tensor, weights: tuple, biases: tuple, bs: tuple,
                scalings: tuple, *factor_params: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        low = flat @ stacked_a.t()  # (tokens, R): [d (s1·A1)ᵀ | d (s2·A2)ᵀ | ...], R = sum of the ranks
        lows = low.split([b.shape[1] for b in bs], dim=1)
        outs = []
        for w, bias, b, low_i in zip(weights, biases, bs, lows):
            out = low_i @ b.t() if bias is None else torch.addmm(bias, low_i, b.t())
            outs.append(out.addmm_(flat, w.t()).reshape(*x.shape[:-1], w.shape[0]))
        ctx.save_for_backward(flat, low, stacked_a, *weights, *bs)
        ctx.scalings, ctx.in_shape = scalings, x.shape
        ctx.factor_dtypes = [t.dtype for t in factor_params]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        flat, low, stacked_a, *rest = ctx.saved_tensors
        n = len(grads)
        weights, bs = rest[:n], rest[n:]
        ranks = [b.shape[1] for b in bs]
        dys = [grad.reshape(-1, grad.shape[-1]) for grad in grads]  # (tokens, out_i)
        g = torch.cat([dy @ b for dy, b in zip(dys, bs)], dim=1)  # (tokens, R)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ stacked_a  # the small product first, then every member's dy W_i onto it
            for dy, w in zip(dys, weights):
                grad_x.addmm_(dy, w)
            grad_x = grad_x.reshape(ctx.in_shape)
        scalings = ctx.scalings
        if len(set(scalings)) == 1:
            grad_a = _scaled_mm(g.t(), flat, scalings[0])  # (R, in): one pass over x for every A
        else:  # each member's columns of g times its own scaling first (no host-to-device copy of scalings)
            scaled = torch.cat([g_i * s for g_i, s in zip(g.split(ranks, dim=1), scalings)], dim=1)
            grad_a = scaled.t() @ flat
        factor_grads = []
        for i, (dy, grad_a_i, low_i) in enumerate(zip(dys, grad_a.split(ranks), low.split(ranks, dim=1))):
            a_dtype, b_dtype = ctx.factor_dtypes[2 * i], ctx.factor_dtypes[2 * i + 1]
            factor_grads.append(grad_a_i.to(a_dtype) if ctx.needs_input_grad[6 + 2 * i] else None)
            factor_grads.append((dy.t() @ low_i).to(b_dtype) if ctx.needs_input_grad[7 + 2 * i] else None)
        return (grad_x, None, None, None, None, None, *factor_grads)


def stack_factors(factors: list[torch.Tensor], cache: Optional[dict] = None) -> torch.Tensor:
    """torch.cat(factors) (the members' s·A, stacked by rows), kept in `cache` while the same factor
    tensors come back (LoraLinear keeps its factors between calls while they do not change)."""
    if cache is not None:
        kept = cache.get("stacked")
        if kept is not None and len(kept[0]) == len(factors) and all(a is b for a, b in zip(kept[0], factors)):
            return kept[1]
    stacked = torch.cat(factors)
    if cache is not None:
        cache["stacked"] = (tuple(factors), stacked)
    return stacked


def lora_linear_group(x: torch.Tensor, members: list[tuple],
                      cache: Optional[dict] = None) -> Optional[tuple[torch.Tensor, ...]]:
    """The outputs of LoRA linears that read the same x, given each one's `lora_linear` arguments after x
    (LoraLinear.fused_args), in one node; None where the group does not fit it (dropout, which gives each
    member its own input, an output left unused, or a bias that trains): call the layers one by one then. Ranks, scalings,
    biases and output sizes may differ. `cache`: a dict the caller keeps, to keep the stacked A factors in
    between calls (see stack_factors)."""
    if any(dropped is not None or unused or (bias is not None and bias.requires_grad)
           for (_, bias, _, _, _, dropped, unused, _) in members):
        return None
    factors = [f if f is not None else compute_factors(a, b, s, x.dtype) for (_, _, a, b, s, _, _, f) in members]
    stacked_a = stack_factors([f[0] for f in factors], cache)
    weights, biases = tuple(m[0] for m in members), tuple(m[1] for m in members)
    params = [t for m in members for t in (m[2], m[3])]
    return _LoraGroupFunction.apply(x, stacked_a, weights, biases, tuple(f[1] for f in factors),
                                    tuple(m[4] for m in members), *params)
