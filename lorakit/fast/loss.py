"""Causal-LM loss computed only where there are labels.

transformers computes logits for every position (batch × seq × vocab, in fp32 for the loss), then
ignores the positions labelled -100. In instruction tuning most positions are prompt: here the LM head
runs only on the hidden states whose next token is a label, which gives the same mean cross-entropy
with a fraction of the head's FLOPs and memory.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.fast.attention import one_example_per_row
from lorakit.fast.cross_entropy import SoftTargets, chunked_linear_cross_entropy, soft_targets

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


def label_only_lm_loss(model: nn.Module, row_multiple: Optional[int] = None
                       ) -> Optional[Callable[[nn.Module, dict], torch.Tensor]]:
    """A `loss_fn(model, batch)` equal to `model(**batch).loss` for this causal LM, or None if unsupported.

    A batch may also carry `distill_mask` (batch, seq): tokens whose prediction should stay what the base
    model predicts; the loss then adds the mean KL(base || adapted) there (see `_distillation`).
    row_multiple: the base model's forward over packed examples (for that KL) runs on a row padded to a multiple
    of this many tokens (on a CPU, where each new matmul shape costs a kernel compile: see
    lorakit.cli.train_data.FLAT_ROW_MULTIPLE).
    """
    parts = _parts(model)
    if parts is None:
        return None
    backbone, head = parts
    no_cache = _without_kv_cache(backbone)
    frozen = _frozen_head_weight(head)  # decided once: it fixes what the base cache keeps
    base_cache = _BaseHiddenCache(no_cache, _base_summary(frozen), row_multiple=row_multiple)

    def loss_fn(model_: nn.Module, batch: dict) -> torch.Tensor:
        batch = dict(batch)
        labels, distill = batch.pop("labels"), batch.pop("distill_mask", None)
        # which positions predict a label (position t predicts token t+1), found before the forward: reading
        # them off the device waits only for the batch's copy there, where after the forward it would wait
        # for the whole forward and leave the GPU idle while the backward is queued
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        at = predicts.flatten().nonzero().squeeze(1)  # (n,) flat positions
        distilled = distill is not None and bool(distill.any())
        with contextlib.nullcontext() if "position_ids" in batch else one_example_per_row():
            hidden = backbone(**batch, **no_cache).last_hidden_state  # (batch, seq, hidden)
        loss = hidden.new_zeros((), dtype=torch.float32)
        if at.numel():  # only where a label exists
            loss = _label_loss(head, hidden.flatten(0, 1).index_select(0, at), labels.flatten()[at + 1])
        if distilled:
            loss = loss + _distillation(model_, backbone, head, frozen, batch, hidden, distill[:, 1:].bool(),
                                        base_cache)
        return loss

    return loss_fn


def _without_kv_cache(backbone: nn.Module) -> dict:
    """`use_cache=False` for backbones that take it: training needs no key/value cache (a copy per layer)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(backbone.forward).parameters else {}


def _frozen_head_weight(head: nn.Module) -> Optional[torch.Tensor]:
    """The weight of a frozen bias-free linear head (the chunked loss's case), else None."""
    weight = getattr(head, "weight", None)
    if type(head) is nn.Linear and head.bias is None and weight is not None and not weight.requires_grad:
        return weight
    return None


def _label_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head's logits: chunked (no full fp32 logits kept) for a frozen bias-free
    linear head, transformers' way otherwise (a trained or LoRA-wrapped head)."""
    weight = _frozen_head_weight(head)
    if weight is not None:
        return chunked_linear_cross_entropy(hidden, weight, targets)
    return F.cross_entropy(head(hidden).float(), targets)  # (n, vocab) logits


def _base_summary(weight: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the distillation keeps of the base model's states (k, hidden): for a frozen linear head (its
    `weight`), its distributions as the chunked loss takes them, [Wᵀp, Σ p log p] (k, hidden + 1) in fp32,
    so no base logits are made again; for any other head (None), the states themselves."""
    if weight is None:
        return lambda states: states
    return lambda states: torch.cat([(t := soft_targets(states, weight)).direction, t.offset[:, None]], 1)


def _distillation(model: nn.Module, backbone: nn.Module, head: nn.Module, weight: Optional[torch.Tensor],
                  batch: dict, hidden: torch.Tensor, marked: torch.Tensor, cache: "_BaseHiddenCache") -> torch.Tensor:
    """Mean KL(base || adapted) of the next-token distributions at the marked positions.

    The base distribution comes from the same model with its adapters disabled (no gradient); it keeps
    the adapter from changing what it should not. The base is frozen, so what the loss needs of its
    states for an example is computed once and reused when the example comes back (every later epoch).
    """
    base = cache.lookup(model, backbone, batch, marked)  # (n, hidden + 1) soft targets or (n, hidden) states
    adapted = hidden[:, :-1][marked]  # (n, hidden)
    if weight is not None:  # a frozen head, so the cache holds soft targets: KL through the chunked loss
        return chunked_linear_cross_entropy(adapted, weight, SoftTargets(base[:, :-1], base[:, -1]))
    with torch.no_grad(), model.disable_adapter():  # the base head too, if it is adapted
        base_logp = F.log_softmax(head(base).float(), -1)  # (n, vocab)
    logp = F.log_softmax(head(adapted).float(), -1)  # (n, vocab)
    return (base_logp.exp() * (base_logp - logp)).sum(-1).mean()


class _BaseHiddenCache:
    """What the loss needs of the frozen base model's last hidden states at an example's marked positions
    (`summarise(states)`), keyed by its tokens.

    The pieces of a batch are its examples: each packed example (position ids restart at 0), or each
    unpacked row without its right padding (padding does not change a causal model's earlier states).
    A piece's states depend only on its own tokens, so they are computed once, for the pieces not seen
    before, and reused however the pieces are later batched. At most `limit_bytes` are kept; pieces
    past it are recomputed every time.
    """

    def __init__(self, forward_kwargs: dict, summarise: Callable[[torch.Tensor], torch.Tensor],
                 limit_bytes: int = 256 * 2**20, row_multiple: Optional[int] = None):
        self.summarise = summarise  # (k, hidden) states -> (k, m) rows kept
        self.pieces: dict[bytes, torch.Tensor] = {}
        self.bytes, self.limit_bytes = 0, limit_bytes
        self.forward_kwargs = forward_kwargs  # extra keywords of every base forward (no KV cache)
        self.row_multiple = row_multiple  # packed pieces: the joined row padded to a multiple of this

    def lookup(self, model: nn.Module, backbone: nn.Module, batch: dict, marked: torch.Tensor) -> torch.Tensor:
        """(n, m) summaries of the base states at `marked` (batch, seq-1), in row-major order like `hidden[marked]`."""
        pieces = [(i, s, e, at) for i, s, e in self._pieces(batch) if (at := self._marked(marked, i, s, e)).any()]
        keys = [batch["input_ids"][i, s:e].cpu().numpy().tobytes() + b"|" + at.cpu().numpy().tobytes()
                for i, s, e, at in pieces]
        found = {k: self.pieces[k] for k in keys if k in self.pieces}
        missing = {k: piece for k, piece in zip(keys, pieces) if k not in found}
        if missing:
            with torch.no_grad(), model.disable_adapter():
                computed = self._compute(backbone, batch, list(missing.values()), self.forward_kwargs,
                                         self.row_multiple)
            summaries = [part.clone() for part in self.summarise(torch.cat(computed)).split([len(c) for c in computed])]
            for key, states in zip(missing, summaries):
                found[key] = states
                if self.bytes + states.nbytes <= self.limit_bytes:
                    self.pieces[key] = states
                    self.bytes += states.nbytes
        return torch.cat([found[k] for k in keys])

    @staticmethod
    def _pieces(batch: dict) -> list[tuple[int, int, int]]:
        """(row, start, stop) of every example in the batch."""
        from lorakit.fast.attention import example_spans

        ids = batch["input_ids"]
        if "position_ids" in batch:
            return [(i, s, e) for i, row in enumerate(example_spans(batch["position_ids"])) for s, e in row]
        mask, pieces = batch.get("attention_mask"), []
        for i in range(ids.shape[0]):
            length = ids.shape[1]
            if mask is not None and mask.dim() == 2 and bool(mask[i, : int(mask[i].sum())].all()):
                length = int(mask[i].sum())  # right-padded: the padding is not part of the example
            pieces.append((i, 0, length))
        return pieces

    @staticmethod
    def _marked(marked: torch.Tensor, i: int, start: int, stop: int) -> torch.Tensor:
        """The piece's marked positions, one per token (the row's last token predicts nothing)."""
        at = torch.zeros(stop - start, dtype=torch.bool, device=marked.device)
        part = marked[i, start:stop]
        at[: len(part)] = part
        return at

    @staticmethod
    def _compute(backbone: nn.Module, batch: dict, pieces: list, kwargs: dict,
                 row_multiple: Optional[int] = None) -> list[torch.Tensor]:
        """Base hidden states at each piece's marked positions: packed pieces run together as one packed
        row (padded to a multiple of `row_multiple` tokens, as collate pads: position 0, after the pieces),
        unpacked ones as the subset of the batch's rows."""
        from lorakit.data.packing import block_causal_mask

        if "position_ids" in batch:
            ids = torch.cat([batch["input_ids"][i, s:e] for i, s, e, _ in pieces])  # (total,)
            positions = torch.cat([torch.arange(e - s, device=ids.device) for _, s, e, _ in pieces])
            pad = -len(ids) % row_multiple if row_multiple else 0
            ids, positions = F.pad(ids, (0, pad))[None], F.pad(positions, (0, pad))[None]  # (1, total + pad)
            given = batch.get("attention_mask")
            mask = block_causal_mask(positions, given.dtype if given is not None else torch.float32)
            states = backbone(input_ids=ids, position_ids=positions, attention_mask=mask,
                              **kwargs).last_hidden_state[0]
            starts = torch.tensor([0] + [e - s for _, s, e, _ in pieces]).cumsum(0).tolist()
            return [states[o:o + len(at)][at].clone() for o, (_, _, _, at) in zip(starts, pieces)]
        index = torch.tensor([i for i, _, _, _ in pieces], device=batch["input_ids"].device)
        states = backbone(**{k: v[index] for k, v in batch.items()}, **kwargs).last_hidden_state
        return [states[j, : len(at)][at].clone() for j, (_, _, _, at) in enumerate(pieces)]
