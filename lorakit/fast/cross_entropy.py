"""Cross-entropy through a frozen output head, chunk by chunk: no (tokens x vocab) fp32 logits at once.

transformers materialises fp32 logits for every position (8 x 1024 tokens x 128k vocab = 4 GiB) and
autograd keeps them, and their gradient, for the backward pass. With a frozen head (LoRA) the only
gradient needed is the one for the hidden states, so each chunk of rows computes its logits, its loss
and its hidden-state gradient in the forward pass, then drops the logits (the Liger / Unsloth "fused
linear cross-entropy" idea in plain PyTorch). Peak extra memory: one (chunk x vocab) fp32 block.
"""
from __future__ import annotations

import torch

from lorakit.fast.kernels.cross_entropy import cross_entropy_grad_
from lorakit.fast.kernels.runtime import triton_runs

CHUNK_ROWS = 1024
"""Rows per block of logits (memory: CHUNK_ROWS x vocab fp32 values at a time)."""


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden (n, d), weight (vocab, d) frozen, targets (n,) all valid
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]  # (c, d)
            t = targets[start:start + chunk]  # (c,)
            if triton_runs(h):  # one kernel: the rows' losses, and the logits overwritten by their gradient
                logits = h @ weight.T  # (c, vocab) in the head's dtype
                total += cross_entropy_grad_(logits, t).sum()
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = (logits @ weight).to(hidden.dtype)  # (c, d)
                continue
            logits = (h @ weight.T).float()  # (c, vocab)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is not None:
                probs = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d(loss sum)/d(logits)
                grad_hidden[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)  # (c, d)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * (grad_output / ctx.n).to(grad_hidden.dtype), None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, equal to
    `F.cross_entropy((hidden @ weight.T).float(), targets)`, for a head weight that needs no gradient.

    Args:
        hidden: (n, d) hidden states (any float dtype; gradient flows to them).
        weight: (vocab, d) output-head weight, frozen.
        targets: (n,) token ids, no ignored positions (select them out first).
        chunk: rows per block; memory is one (chunk, vocab) fp32 block.
    """
    if weight.requires_grad:
        raise ValueError("chunked_linear_cross_entropy needs a frozen head weight (no gradient for it)")
    if hidden.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.float32)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
