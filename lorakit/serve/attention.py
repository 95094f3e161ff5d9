"""Ragged attention for the serving engine: every row of a batch is its own sequence with its own KV cache.

The engine runs a decoder-only transformers model with `attn_implementation="lorakit_ragged"`. Each forward
pass carries a `StepRows` (set in `STEP_ROWS`) naming, for every batch row, the `SequenceKV` that row
belongs to (or None for a padding row). The attention function appends the row's new keys and values to
that cache and attends over exactly the row's own tokens: no padding, no shared mask, so a row's numbers
are the same whatever else is in the batch.

The linear layers see all rows at once. CPU (and GPU) matmul kernels compute a row the same way only when
the number of rows is a multiple of the kernel's row tile; `batch_invariant_multiple` finds that multiple
once, and the engine pads each decode batch to it with idle rows.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

ATTENTION_NAME = "lorakit_ragged"


class SequenceKV:
    """One sequence's keys and values for every layer, preallocated to the longest it may grow."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, capacity, head_dim)
        self.values: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    @property
    def length(self) -> int:
        """Tokens cached so far (every layer holds the same number between forward passes)."""
        return max(self.lengths.values(), default=0)

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value (kv_heads, new, head_dim) for `layer`; return all of this layer's (kv_heads, L, d)."""
        if layer not in self.keys:
            self.keys[layer] = key.new_empty(key.shape[0], self.capacity, key.shape[2])
            self.values[layer] = value.new_empty(value.shape[0], self.capacity, value.shape[2])
            self.lengths[layer] = 0
        start, new = self.lengths[layer], key.shape[1]
        if start + new > self.capacity:
            raise RuntimeError(f"sequence grew past its KV capacity ({self.capacity} tokens)")
        self.keys[layer][:, start:start + new] = key
        self.values[layer][:, start:start + new] = value
        self.lengths[layer] = start + new
        return self.keys[layer][:, :start + new], self.values[layer][:, :start + new]


@dataclass
class StepRows:
    """What one forward pass computes: the KV cache of each batch row (None = an idle padding row)."""

    caches: list[Optional[SequenceKV]]
    layers_seen: set[int] = field(default_factory=set)


STEP_ROWS: ContextVar[Optional[StepRows]] = ContextVar("lorakit_step_rows", default=None)


def ragged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                     dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (batch, heads, q, d), key/value (batch, kv_heads, q, d).

    Returns the attention output as (batch, q, heads, d), like transformers' own implementations.
    """
    step = STEP_ROWS.get()
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    if step is None:  # outside an engine step (e.g. model.generate): behave exactly like the model's own
        if softcap or sinks is not None:  # sdpa has neither: the model's eager attention (Gemma 2, gpt-oss)
            import sys

            eager = sys.modules[type(module).__module__].eager_attention_forward
            return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    layer = module.layer_idx
    step.layers_seen.add(layer)
    batch, heads, q_len, _ = query.shape
    out = query.new_zeros(batch, q_len, heads, value.shape[-1])
    for row, kv in enumerate(step.caches):
        if kv is None:
            continue
        keys, values = kv.append(layer, key[row], value[row])  # (kv_heads, L, d)
        if q_len > 1 and keys.shape[1] != q_len:
            raise RuntimeError("a prompt must be processed in one pass from an empty cache")
        if window or softcap or sinks is not None:
            attended = _masked_attention(query[row], keys, values, scaling, window, softcap, sinks)
        else:
            attended = F.scaled_dot_product_attention(
                query[row:row + 1], keys[None], values[None], is_causal=q_len > 1, scale=scaling,
                enable_gqa=keys.shape[0] != heads)[0]  # (heads, q, d)
        out[row] = attended.transpose(0, 1)
    return out, None


def _masked_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: Optional[float],
                      window: Optional[int], softcap: Optional[float],
                      sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """One sequence's attention with what sdpa lacks: query (heads, q, d) over its cache's keys and values
    (kv_heads, L, d), the q queries being the last q positions. Scores are soft-capped (Gemma 2:
    cap·tanh(s/cap)), a query at position p sees keys j with p - window < j <= p (transformers' sliding
    window), and a per-head sink logit (gpt-oss) joins the softmax and is dropped after it."""
    heads, q_len, dim = query.shape
    keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)  # (heads, L, d)
    values = values.repeat_interleave(heads // values.shape[0], dim=0)
    scores = (query @ keys.transpose(1, 2)) * (dim ** -0.5 if scaling is None else scaling)  # (heads, q, L)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    length = keys.shape[1]
    positions = torch.arange(length - q_len, length, device=query.device)[:, None]  # (q, 1)
    key_positions = torch.arange(length, device=query.device)[None]  # (1, L)
    allowed = key_positions <= positions
    if window:
        allowed &= key_positions > positions - window
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.float().reshape(heads, 1, 1).expand(heads, q_len, 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    return probs.to(values.dtype) @ values  # (heads, q, d)


def register_ragged_attention() -> None:
    """Make `attn_implementation="lorakit_ragged"` known to transformers (idempotent). Masks are built
    as for "sdpa", so the model still runs normally outside the engine."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, ragged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@torch.no_grad()
def batch_invariant_multiple(weights: Iterable[torch.Tensor], max_rows: int = 32,
                             probed: Optional[dict] = None) -> int:
    """The smallest row count P such that, in batches of a multiple of P rows, a matmul with each of
    `weights` computes each row bit-for-bit the same wherever it sits. Probed once per distinct shape,
    dtype and device, with the weight itself and random rows: the BLAS picks its kernel by all three
    matmul sizes, so a square probe of the hidden size says nothing of a (hidden, intermediate) one.
    `probed` keeps the answers between calls (the kernel depends on the sizes, not on the values)."""
    found = {} if probed is None else probed
    wanted = set()
    for weight in weights:
        key = (tuple(weight.shape), weight.dtype, weight.device)
        wanted.add(key)
        if key not in found:
            found[key] = _row_multiple(weight, max_rows)
    return max((found[k] for k in wanted), default=1)  # powers of two: the largest is a multiple of every other


def _row_multiple(weight: torch.Tensor, max_rows: int) -> int:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(max_rows, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    with torch.no_grad():
        reference = F.linear(x, weight)  # (max_rows, out)
        for multiple in (1, 2, 4, 8, 16):
            sizes = range(multiple, max_rows + 1, multiple)
            if all(torch.equal(F.linear(x[:m], weight), reference[:m]) for m in sizes) and \
                    all(torch.equal(F.linear(x[i:i + multiple], weight)[0], reference[i]) for i in range(0, 8)):
                return multiple
    return max_rows
