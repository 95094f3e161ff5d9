"""Cross-entropy through a frozen output head, chunk by chunk: no (tokens x vocab) fp32 logits at once.

transformers materialises fp32 logits for every position (8 x 1024 tokens x 128k vocab = 4 GiB) and
autograd keeps them, and their gradient, for the backward pass. With a frozen head (LoRA) the only
gradient needed is the one for the hidden states, so each chunk of rows computes its logits, its loss
and its hidden-state gradient in the forward pass, then drops the logits (the Liger / Unsloth "fused
linear cross-entropy" idea in plain PyTorch). Peak extra memory: one (chunk x vocab) fp32 block.

One formula covers a hard target (a token id) and a soft one (a distribution p over the vocabulary, for
the KL to a base model). With z = W h the logits and lse = log Σ exp(z):

    loss = lse − h·d + c        d(loss)/dh = Wᵀ softmax(z) − d

where d = W[target], c = 0 for a token id, and d = Wᵀp, c = Σ p log p for a distribution p (so the
loss is KL(p ‖ softmax(z)) and p enters only through d and c: a (hidden,) vector and a number per row,
computed once from the base model's states and kept instead of them).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch

from lorakit.fast.kernels.cross_entropy import cross_entropy_grad_
from lorakit.fast.kernels.runtime import triton_runs

CHUNK_ROWS = 1024
"""Rows per block of logits (memory: CHUNK_ROWS x vocab fp32 values at a time)."""

VOCAB_BLOCK = 4096
"""Vocabulary columns per matmul (outside the Triton kernel's path): the logits are made as (rows x
VOCAB_BLOCK) blocks, so each matmul's output stays small (the CPU writes one (rows x vocab) output at about
half the rate it multiplies into a small one); the blocks are then reduced and exponentiated one by one."""


class SoftTargets(NamedTuple):
    """Distributions p over the vocabulary as the loss needs them: direction = Wᵀp (n, hidden) and
    offset = Σ p log p (n,), both fp32 (see `soft_targets`)."""
    direction: torch.Tensor
    offset: torch.Tensor


def _softmax_moments(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (c,), Wᵀ softmax(W h) (c, hidden)) of a chunk of rows, all in fp32, in one pass over the vocabulary:
    each block of logits is made, exponentiated against the running row maximum and multiplied back through its
    rows of W while it is fresh in cache (the online softmax of flash attention: the sums so far are rescaled when
    the maximum grows), so no block is kept or read again."""
    vocab, block = weight.shape[0], VOCAB_BLOCK
    # fp32 logits: the KL's terms are close numbers, and bf16 logits would not cancel. Under autocast in the
    # head's dtype (CPU bf16 training) autocast would multiply in that dtype anyway: the operands stay as they
    # are (no fp32 copies of W's blocks for autocast to cast back) and the products come out in fp32.
    low = weight.dtype != torch.float32 and torch.is_autocast_enabled(hidden.device.type) and \
        torch.get_autocast_dtype(hidden.device.type) == weight.dtype
    h = hidden.to(weight.dtype) if low else hidden.float()
    rows = hidden.shape[0]
    top = torch.full((rows, 1), -math.inf, device=hidden.device)  # running max of each row's logits
    total = torch.zeros(rows, 1, device=hidden.device)  # Σ exp(z − top)
    expected = torch.zeros(rows, hidden.shape[1], dtype=torch.float32, device=hidden.device)  # Σ exp(z − top) W
    for s in range(0, vocab, block):
        w = weight[s:s + block]
        z = (h @ w.T).float() if low else h @ w.float().T  # (c, block)
        new_top = torch.maximum(top, z.amax(-1, keepdim=True))
        rescale = (top - new_top).exp_()  # (c, 1): the sums so far, to the new maximum
        z.sub_(new_top).exp_()
        total.mul_(rescale).add_(z.sum(-1, keepdim=True))
        expected.mul_(rescale).add_((z.to(w.dtype) @ w).float() if low else z @ w.float())
        top = new_top
    return (top + total.log()).squeeze(1), expected.div_(total)


def soft_targets(hidden: torch.Tensor, weight: torch.Tensor, chunk: int = CHUNK_ROWS) -> SoftTargets:
    """The distributions softmax(W h) of `hidden` (n, d) (a frozen model's states) as targets for
    `chunked_linear_cross_entropy`: Wᵀp and Σ p log p, computed without keeping any (n x vocab) block."""
    with torch.no_grad():
        directions, offsets = [], []
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            lse, expected = _softmax_moments(h, weight)
            directions.append(expected)
            offsets.append((expected * h.float()).sum(-1) - lse)  # Σ p log p = Σ p z − lse = h·Wᵀp − lse
        if not directions:
            empty = hidden.new_empty(0, hidden.shape[1], dtype=torch.float32)
            return SoftTargets(empty, empty[:, 0])
        return SoftTargets(torch.cat(directions), torch.cat(offsets))


Targets = Union[torch.Tensor, SoftTargets]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: Targets, chunk: int) -> torch.Tensor:
        # hidden (n, d), weight (vocab, d) frozen, targets (n,) valid ids or SoftTargets of n rows
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]  # (c, d)
            if isinstance(targets, torch.Tensor) and triton_runs(h):
                # one kernel: the rows' losses, and the logits overwritten by their gradient
                logits = h @ weight.T  # (c, vocab) in the head's dtype
                total += cross_entropy_grad_(logits, targets[start:start + chunk]).sum()
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = (logits @ weight).to(hidden.dtype)  # (c, d)
                continue
            if isinstance(targets, torch.Tensor):  # a token id: d = W[target], c = 0
                direction, offset = weight[targets[start:start + chunk]].float(), None
            else:
                direction = targets.direction[start:start + chunk]
                offset = targets.offset[start:start + chunk]
            lse, expected = _softmax_moments(h, weight)
            loss = lse - (h.float() * direction).sum(-1)  # lse − h·d (+ c)
            total += loss.sum() + (offset.sum() if offset is not None else 0.0)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (expected - direction).to(hidden.dtype)  # Wᵀ softmax − d
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * (grad_output / ctx.n).to(grad_hidden.dtype), None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: Targets,
                                 chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, for a head weight that needs no gradient.

    With token ids this equals `F.cross_entropy((hidden @ weight.T).float(), targets)`; with
    `soft_targets(base_hidden, weight)` it is the mean KL(p ‖ softmax(hidden @ weight.T)) of the base
    distributions p, i.e. their cross-entropy minus their entropy.

    Args:
        hidden: (n, d) hidden states (any float dtype; gradient flows to them).
        weight: (vocab, d) output-head weight, frozen.
        targets: (n,) token ids, no ignored positions (select them out first), or SoftTargets of n rows.
        chunk: rows per block; memory is one (chunk, vocab) fp32 block.
    """
    if weight.requires_grad:
        raise ValueError("chunked_linear_cross_entropy needs a frozen head weight (no gradient for it)")
    if hidden.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.float32)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
