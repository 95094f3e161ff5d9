"""RMSNorm as transformers' Llama computes it, in one kernel forward and one backward.

    y = w · round(x̂),  x̂ = x · r,  r = 1 / sqrt(mean(x²) + eps)       (round: to x's dtype)
    dx = r · (ĝ − x̂ · mean(ĝ · x̂)),  ĝ = dy · w                      (w frozen: no dw)

Saved for the backward: x and r (one fp32 per row), instead of the plain version's fp32 copies.
"""
from __future__ import annotations

import torch

from lorakit.fast.kernels.runtime import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_forward(x_ptr, w_ptr, y_ptr, r_ptr, d, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps)
        x_hat = (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * d + cols, (w * x_hat).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(r_ptr + row, r)

    @triton.jit
    def _rms_norm_backward(dy_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, d, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row)
        x_hat = x * r
        g = dy * w
        dx = r * (g - x_hat * (tl.sum(g * x_hat, axis=0) / d))
        tl.store(dx_ptr + row * d + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, d)
        rows, d = flat.shape
        y = torch.empty(flat.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        r = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(d)
        _rms_norm_forward[(rows,)](flat, weight, y, r, d, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(flat, weight, r)
        return y.view(*x.shape[:-1], d)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        flat, weight, r = ctx.saved_tensors
        rows, d = flat.shape
        dx = torch.empty_like(flat)
        block = triton.next_power_of_2(d)
        _rms_norm_backward[(rows,)](dy.reshape(rows, d).contiguous(), flat, weight, r, dx, d, BLOCK=block,
                                    num_warps=_warps(block))
        return dx.view(dy.shape[:-1] + (d,)), None, None


def _warps(block: int) -> int:
    return min(16, max(1, block // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference` in one Triton kernel each way, for a frozen `weight` (d,) and x (..., d)."""
    if weight.requires_grad:
        raise ValueError("the Triton rms_norm has no weight gradient: use rms_norm_reference for a trained norm")
    return _RMSNorm.apply(x, weight, eps)


class _RMSNormTorch(torch.autograd.Function):
    """The same equations in torch ops, in fp32 arithmetic whatever x's dtype (bf16 or fp16 x is rounded where the
    reference rounds: x̂ before the weight, and ĝ): one read for r and three passes for y; five for dx, against
    transformers' eleven or so (its fp32 squares, the rescaled copy, autograd's record of each). Only x and r are
    saved, not the reference's fp32 copies of x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        d = x.shape[-1]
        xf = x.float()  # x itself when it is fp32
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        x_hat = torch.mul(x, r) if xf is x else xf.mul_(r)
        return x_hat.to(x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        g = (dy * weight).float()  # ĝ, a new tensor (in x's dtype first, as the reference rounds it)
        xf = x.float()
        coefficient = torch.linalg.vecdot(g, xf).unsqueeze(-1).mul_(r.pow(3)).div_(-x.shape[-1])
        return g.mul_(r).addcmul_(xf, coefficient).to(x.dtype), None, None


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference` in torch ops with its own backward, for a frozen `weight` of x's dtype (any device; on a
    CPU the bf16 training path's norms: about half the time of transformers' forward + backward, measured)."""
    if weight.requires_grad or x.dtype != weight.dtype or not x.dtype.is_floating_point:
        raise ValueError("rms_norm_torch takes a frozen weight of x's floating dtype: use rms_norm_reference otherwise")
    return _RMSNormTorch.apply(x, weight, eps)
