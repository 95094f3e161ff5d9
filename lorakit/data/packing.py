"""Packing: several tokenized examples per row, attention kept inside each example.

A packed row concatenates examples; its `position_ids` restart at 0 at each example, which is
all that is needed to rebuild the block-diagonal causal mask (`block_causal_mask`): a token
attends to the earlier tokens of its own example only. The first label of every example is -100,
so the last token of one example is never trained to predict the first token of the next.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label value the loss ignores (PyTorch's `cross_entropy` default)."""


class _FirstFit:
    """Finds the first row with room for an example in O(log rows) (a max segment tree over
    the rows' free space; unopened rows have the full `capacity`)."""

    def __init__(self, max_rows: int, capacity: int):
        self.size = 1
        while self.size < max(max_rows, 1):
            self.size *= 2
        self.free = [capacity] * (2 * self.size)

    def place(self, length: int) -> int:
        """Index of the first row with at least `length` free tokens; takes that space."""
        node = 1
        while node < self.size:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        row = node - self.size
        self.free[node] -= length
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return row


def pack_examples(examples: list[dict], seq_len: int) -> list[dict]:
    """Pack examples (each at most `seq_len` tokens) into rows of at most `seq_len`, first-fit
    decreasing: longest first, each example goes into the first row with room for it (rows come out
    nearly full, so little of a batch is padding).

    Args:
        examples: dicts with `input_ids` and `labels` (lists of ints, same length); other per-token
            lists of that length (e.g. `distill_mask`) are packed alongside.
        seq_len: the row length limit.

    Returns:
        Rows with `input_ids`, `labels`, `position_ids` (0, 1, ... per example) and the other
        per-token keys. An example's first token predicts nothing: the token before it belongs
        to another example, so its label is -100 and its other per-token values are 0.
    """
    fit = _FirstFit(len(examples), seq_len)
    rows: list[dict] = []
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):  # stable: ties keep their order
        length = len(example["input_ids"])
        if not 0 < length <= seq_len:
            raise ValueError(f"cannot pack an example of {length} tokens into rows of {seq_len}")
        index = fit.place(length)
        if index == len(rows):
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
        row = rows[index]
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(example["labels"][1:])
        row["position_ids"] += list(range(length))
        for key, values in example.items():
            if key not in ("input_ids", "labels", "position_ids") and isinstance(values, list) \
                    and len(values) == length:
                row.setdefault(key, [0] * (len(row["input_ids"]) - length))
                row[key] += [0] + list(values[1:])
        for key in row:  # keys this example lacks stay aligned with input_ids
            if len(row[key]) < len(row["input_ids"]):
                row[key] += [0] * (len(row["input_ids"]) - len(row[key]))
    return rows


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which example each token belongs to: a new example starts wherever position_ids is 0.

    Args:
        position_ids: (batch, seq) positions restarting at 0 per example.

    Returns:
        (batch, seq) integers, equal for tokens of the same example.
    """
    return torch.cumsum((position_ids == 0).long(), dim=-1)


def block_causal_mask(position_ids: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 4D additive attention mask for packed rows: causal inside each example, nothing across.

    transformers uses a 4D `attention_mask` as given (for the `eager` and `sdpa` attention
    implementations): 0 where attention is allowed, the dtype's minimum where it is not.

    Args:
        position_ids: (batch, seq) positions restarting at 0 per example (padding tokens each
            get position 0, so they only attend to themselves and no row is fully masked).
        dtype: the mask's dtype; use the model's compute dtype (sdpa requires it to match).

    Returns:
        (batch, 1, seq, seq) float mask.
    """
    segments = segment_ids(position_ids)                                   # (batch, seq)
    seq = position_ids.shape[-1]
    same = segments[:, :, None] == segments[:, None, :]                    # (batch, q, k)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same & causal                                                # (batch, q, k)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]                                                   # (batch, 1, q, k)
