"""Rotary position embedding of queries and keys, both in one kernel forward and one backward.

With x = (x₁, x₂) split at the middle of the head dimension and cos/sin split the same way:

    forward:  (x₁·c₁ − x₂·s₁,  x₂·c₂ + x₁·s₂)        = x·cos + rotate_half(x)·sin
    backward: (d₁·c₁ + d₂·s₂,  d₂·c₂ − d₁·s₁)        the transpose of the same linear map

q and k are (batch, heads, seq, head_dim) in any strides (transformers hands over transposed views);
the outputs keep the inputs' strides. cos and sin are (batch, seq, head_dim), as transformers' rotary
embedding returns them.
"""
from __future__ import annotations

import torch

from lorakit.fast.kernels.runtime import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate(x_ptr, o_ptr, b, s, heads, sb, sh, ss, ob, oh, os, c1, c2, s1, s2, half,
                BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < heads) & (d < half)
        src = x_ptr + b * sb + s * ss + h * sh + d
        dst = o_ptr + b * ob + s * os + h * oh + d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(dst, y1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, y2.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, seq, q_heads, k_heads,
                       qsb, qsh, qss, ksb, ksh, kss, qob, qoh, qos, kob, koh, kos, csb, css, half,
                       BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one (batch, position)
        b = pid // seq
        s = pid % seq
        d = tl.arange(0, BLOCK_D)[None, :]
        dmask = d < half
        row = b * csb + s * css
        c1 = tl.load(cos_ptr + row + d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + row + half + d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + row + d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + row + half + d, mask=dmask, other=0.0).to(tl.float32)
        _rotate(q_ptr, qo_ptr, b, s, q_heads, qsb, qsh, qss, qob, qoh, qos, c1, c2, s1, s2, half,
                BACKWARD, BLOCK_QH, BLOCK_D)
        _rotate(k_ptr, ko_ptr, b, s, k_heads, ksb, ksh, kss, kob, koh, kos, c1, c2, s1, s2, half,
                BACKWARD, BLOCK_KH, BLOCK_D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb with unsqueeze_dim=1."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _launch(q, k, cos, sin, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_heads, seq, dim = q.shape
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # dense inputs: the same strides
    cos = cos.expand(batch, seq, dim)  # one row for the whole batch broadcasts
    _rotary_kernel[(batch * seq,)](
        q, k, qo, ko, cos, sin.expand(batch, seq, dim), seq, q_heads, k.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1), dim // 2, BACKWARD=backward,
        BLOCK_QH=triton.next_power_of_2(q_heads), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_D=triton.next_power_of_2(dim // 2), num_warps=4)
    return qo, ko


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk))  # the kernel steps d by 1
        dq, dk = _launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The kernel's arithmetic in torch ops, written into halves of one output: two multiplies and two
    multiply-adds over x, where transformers' x·cos + rotate_half(x)·sin makes five passes (and its
    backward a zero-filled gradient per slice)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    out = torch.empty_like(x)
    y1, y2 = out[..., :half], out[..., half:]
    torch.mul(x1, c1, out=y1)
    torch.mul(x2, c2, out=y2)
    if backward:  # (d₁·c₁ + d₂·s₂,  d₂·c₂ − d₁·s₁)
        y1.addcmul_(x2, s2)
        y2.addcmul_(x1, s1, value=-1)
    else:  # (x₁·c₁ − x₂·s₁,  x₂·c₂ + x₁·s₂)
        y1.addcmul_(x2, s1, value=-1)
        y2.addcmul_(x1, s2)
    return out


class _RotaryTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (b or 1, 1, s, d): one row for every head
        ctx.save_for_backward(cos, sin)
        return _rotate_torch(q, cos, sin, False), _rotate_torch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return _rotate_torch(dq, cos, sin, True), _rotate_torch(dk, cos, sin, True), None, None


def rotary_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_reference` with the kernel's arithmetic in torch ops (any device; cos/sin as the kernel
    takes them), and a backward that is the same map transposed instead of autograd's record of it."""
    return _RotaryTorch.apply(q, k, cos, sin)


def rotary_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The shapes the kernel takes: (b, h, s, d) q and k with unit last stride, (b or 1, s, d) cos/sin."""
    return (q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and q.shape[-1] % 2 == 0
            and q.shape[-1] == k.shape[-1] == cos.shape[-1] and q.shape[2] == k.shape[2] == cos.shape[1]
            and cos.shape[0] in (1, q.shape[0]) and cos.shape == sin.shape and cos.stride() == sin.stride()
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1 and q.dtype == k.dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_reference` in one Triton kernel each way (shapes as `rotary_supported` says)."""
    return _Rotary.apply(q, k, cos, sin)
