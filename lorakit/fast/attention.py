"""Attention over packed rows, one example at a time.

A packed row holds several examples, kept apart by a block-diagonal causal mask. transformers' sdpa
computes the whole (seq x seq) score matrix and then masks most of it away; here each example's
stretch of the row runs its own causal attention, which gives the same result with work in
proportion to the sum of the examples' squared lengths instead of the row's.

On a CPU, bf16 inputs are attended in fp32 and the output handed back in bf16: torch's CPU flash attention
takes about three times as long in bf16 as in fp32, casts included (forward + backward, measured on an
AMX CPU in torch 2.13).

`use_packed_attention(model)` switches a transformers model from "sdpa" to this attention. It only
acts on packed batches (position_ids that restart at 0 inside a row, as `lorakit.data` packs them
and as transformers' `DataCollatorWithFlattening` does); every other call, including generation
with a cache, goes to transformers' own sdpa unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "lorakit_packed_sdpa"


def example_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """For each row, the (start, stop) of every example in it.

    An example starts at a position id of 0. A run of 0s (the padding after the last example, which
    collate gives position 0) stays one span: under causal attention its first token still sees only
    itself, and the rest predict nothing. A 0 followed by 1 always starts its own span.

    Args:
        position_ids: (batch, seq) positions restarting at 0 per example.
    """
    zero = position_ids == 0
    previous_nonzero = torch.ones_like(zero)
    previous_nonzero[:, 1:] = ~zero[:, :-1]
    next_nonzero = torch.zeros_like(zero)
    next_nonzero[:, :-1] = ~zero[:, 1:]
    starts = zero & (previous_nonzero | next_nonzero)
    starts[:, 0] = True
    seq = position_ids.shape[1]
    spans = []
    for row in starts.tolist():
        begin = [i for i, s in enumerate(row) if s]
        spans.append(list(zip(begin, begin[1:] + [seq])))
    return spans


def _packed_spans(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  position_ids: Optional[torch.Tensor]) -> Optional[list[list[tuple[int, int]]]]:
    """The rows' example spans when this call is causal self-attention over packed rows, else None."""
    if position_ids is None or not getattr(module, "is_causal", True):
        return None
    batch, _, length, _ = query.shape
    if key.shape[2] != length or position_ids.shape[-1] != length:
        return None  # a key/value cache: not a packed training batch
    if attention_mask is not None and attention_mask.dim() != 4:
        return None
    return _spans_of(position_ids, batch)


_LAST_SPANS: list = [None, None, None]
"""(key, position_ids, spans) of the last call: every layer of a forward gets the same position_ids
tensor, so its spans are read off the device (a synchronisation) once per forward, not once per layer.
The tensor is held so that its id cannot be reused by another while it is the key."""


_ONE_EXAMPLE_PER_ROW = contextvars.ContextVar("lorakit_one_example_per_row", default=False)


@contextlib.contextmanager
def one_example_per_row():
    """Within it, forwards need not read position ids off the device to find packed examples: the caller
    knows its rows are not packed (a batch without position_ids, whose positions transformers makes)."""
    token = _ONE_EXAMPLE_PER_ROW.set(True)
    try:
        yield
    finally:
        _ONE_EXAMPLE_PER_ROW.reset(token)


def _spans_of(position_ids: torch.Tensor, batch: int) -> Optional[list[list[tuple[int, int]]]]:
    """`example_spans` of the `batch` rows (position_ids may be one row for all), or None when no row holds
    more than one example."""
    key = (id(position_ids), position_ids._version, batch)
    if _LAST_SPANS[0] != key:  # (kept for a checkpoint's recompute too, which runs outside the context)
        spans = [] if _ONE_EXAMPLE_PER_ROW.get() else example_spans(position_ids.expand(batch, position_ids.shape[-1]))
        _LAST_SPANS[:] = [key, position_ids, spans if any(len(row) > 1 for row in spans) else None]
    return _LAST_SPANS[2]


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, position_ids: Optional[torch.Tensor] = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq,
    dim) -> output (batch, seq, heads, dim). Packed rows: causal sdpa per example; otherwise plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = _packed_spans(module, query, key, attention_mask, position_ids)
    if spans is None or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    dtype = query.dtype
    upcast = dtype == torch.bfloat16 and query.device.type == "cpu"
    if upcast:  # torch's CPU flash attention takes about 3x longer in bf16 than in fp32, casts included (measured)
        query, key, value = query.float(), key.float(), value.float()
    rows = []
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():  # (autocast would cast back)
        # split, not sliced: the backward of a split writes each piece's gradient into one tensor, where every
        # slice's would be a zero-filled tensor of the whole input, all of them then added up
        for (q, k, v), row in zip(zip(*(t.split(1) for t in (query, key, value))), spans):
            lengths = [e - s for s, e in row]
            parts = [F.scaled_dot_product_attention(*piece, dropout_p=dropout, is_causal=True, scale=scaling,
                                                    enable_gqa=gqa)
                     for piece in zip(*(t.split(lengths, dim=2) for t in (q, k, v)))]  # each (1, heads, e - s, dim)
            rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).to(dtype).contiguous(), None


def use_packed_attention(model: nn.Module) -> bool:
    """Give a transformers model that uses "sdpa" the packed-row attention (same outputs on every batch,
    less work on packed ones). Returns whether it was switched (models with other attention keep theirs)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # unpacked batches get sdpa's masks
    base.set_attn_implementation(PACKED_ATTENTION)
    return config._attn_implementation == PACKED_ATTENTION
