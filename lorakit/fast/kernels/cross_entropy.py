"""Cross-entropy of a block of logits and its gradient, in one kernel that reads the logits twice.

For each row: lse = log Σ exp(z) (online max and sum over the vocabulary), loss = lse − z[target],
and the row is overwritten with d(loss)/dz = softmax(z) − onehot(target), in the logits' dtype.
The plain version makes an fp32 copy of the block and passes over it five times.
"""
from __future__ import annotations

import torch

from lorakit.fast.kernels.runtime import HAS_TRITON

BLOCK = 4096

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _cross_entropy_grad(z_ptr, stride, t_ptr, loss_ptr, vocab: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        target = tl.load(t_ptr + row)
        m = tl.full((), -float("inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(total)
        z_target = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - z_target)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss in fp32, gradient of their sum w.r.t. the logits in the logits' dtype)."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    grad = torch.softmax(z, dim=-1)
    grad[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss, grad.to(logits.dtype)


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy (fp32) of `logits` (rows, vocab; unit last stride) against `targets` (rows,),
    with `logits` overwritten by the gradient of the losses' sum. Targets must be valid ids."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _cross_entropy_grad[(rows,)](logits, logits.stride(0), targets, loss, vocab, BLOCK=BLOCK, num_warps=8)
    return loss
