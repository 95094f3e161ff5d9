"""The SwiGLU MLP's middle, silu(gate) · up, in one kernel forward and one backward.

    y = round(silu(g)) · u,  silu(g) = g · σ(g)
    du = dy · silu(g),  dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))

The backward writes dg and du over the saved gate and up outputs (nothing else reads them), so it
allocates nothing; the plain version keeps silu(g) as well and launches five kernels for the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.fast.kernels.runtime import HAS_TRITON

BLOCK = 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_forward(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + i, (s * u).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_backward(dy_ptr, g_ptr, u_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        dy = tl.load(dy_ptr + i, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(u_ptr + i, (dy * silu).to(u_ptr.dtype.element_ty), mask=mask)  # du over u
        tl.store(g_ptr + i, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(g_ptr.dtype.element_ty), mask=mask)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaMLP middle: act_fn(gate_proj(x)) * up_proj(x) with act_fn = SiLU."""
    return F.silu(gate) * up


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        _silu_mul_forward[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        n = gate.numel()
        _silu_mul_backward[(triton.cdiv(n, BLOCK),)](dy.contiguous(), gate, up, n, BLOCK=BLOCK, num_warps=4)
        return gate, up  # now dg and du


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu_mul_reference` in one Triton kernel each way; gate and up (same shape and dtype) must not be
    used by anything else in the graph (their memory is reused for their gradients)."""
    return _SiluMul.apply(gate, up)
