"""Causal-LM loss computed only where there are labels.

transformers computes logits for every position (batch × seq × vocab, in fp32 for the loss), then
ignores the positions labelled -100. In instruction tuning most positions are prompt: here the LM head
runs only on the hidden states whose next token is a label, which gives the same mean cross-entropy
with a fraction of the head's FLOPs and memory.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.fast.cross_entropy import chunked_linear_cross_entropy

IGNORE_INDEX = -100


def _parts(model: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    """(backbone, lm_head) of a plain transformers causal LM, or None when the head does more than a matmul."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    get_head = getattr(base, "get_output_embeddings", None)
    prefix = getattr(base, "base_model_prefix", None)
    if config is None or not callable(get_head) or not prefix or not hasattr(base, prefix):
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) \
            or getattr(config, "is_encoder_decoder", False):
        return None  # soft-capped or scaled logits: keep transformers' own loss
    head = get_head()
    return (getattr(base, prefix), head) if head is not None else None


def label_only_lm_loss(model: nn.Module) -> Optional[Callable[[nn.Module, dict], torch.Tensor]]:
    """A `loss_fn(model, batch)` equal to `model(**batch).loss` for this causal LM, or None if unsupported.

    A batch may also carry `distill_mask` (batch, seq): tokens whose prediction should stay what the base
    model predicts; the loss then adds the mean KL(base || adapted) there (see `_distillation`).
    """
    parts = _parts(model)
    if parts is None:
        return None
    backbone, head = parts

    def loss_fn(model_: nn.Module, batch: dict) -> torch.Tensor:
        batch = dict(batch)
        labels, distill = batch.pop("labels"), batch.pop("distill_mask", None)
        hidden = backbone(**batch).last_hidden_state  # (batch, seq, hidden)
        targets = labels[:, 1:]  # token t+1 is predicted from position t
        keep = targets != IGNORE_INDEX  # (batch, seq-1)
        loss = hidden.new_zeros((), dtype=torch.float32)
        if keep.any():
            loss = _label_loss(head, hidden[:, :-1][keep], targets[keep])  # only where a label exists
        if distill is not None and distill.any():
            loss = loss + _distillation(model_, backbone, head, batch, hidden, distill[:, 1:].bool())
        return loss

    return loss_fn


def _label_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head's logits: chunked (no full fp32 logits kept) for a frozen bias-free
    linear head, transformers' way otherwise (a trained or LoRA-wrapped head)."""
    weight = getattr(head, "weight", None)
    if type(head) is nn.Linear and head.bias is None and weight is not None and not weight.requires_grad:
        return chunked_linear_cross_entropy(hidden, weight, targets)
    return F.cross_entropy(head(hidden).float(), targets)  # (n, vocab) logits


def _distillation(model: nn.Module, backbone: nn.Module, head: nn.Module, batch: dict, hidden: torch.Tensor,
                  marked: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || adapted) of the next-token distributions at the marked positions.

    The base distribution comes from the same model with its adapters disabled (no gradient), run only
    on the rows that have marked positions; it keeps the adapter from changing what it should not.
    """
    rows = marked.any(-1)  # (batch,)
    with torch.no_grad(), model.disable_adapter():
        base_hidden = backbone(**{k: v[rows] for k, v in batch.items()}).last_hidden_state
        base_logp = F.log_softmax(head(base_hidden[:, :-1][marked[rows]]).float(), -1)  # (n, vocab)
    logp = F.log_softmax(head(hidden[:, :-1][marked]).float(), -1)  # (n, vocab)
    return (base_logp.exp() * (base_logp - logp)).sum(-1).mean()
