"""Batching causal-LM examples into tensors (right padding)."""

from __future__ import annotations

import torch

from lorakit.data.packing import IGNORE_INDEX, block_causal_mask


FLATTEN_MAX_TOKENS = 4096
"""Longest row `flatten` makes (its float mask: 4096² values, 64 MB in fp32); longer batches stay padded rows."""


def _padded(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    """(batch, length) long tensor, each row right-padded with `value`."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate_causal(examples: list[dict], pad_token_id: int,
                   mask_dtype: torch.dtype = torch.float32,
                   pad_to_multiple_of: int | None = None, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, right-padded to the longest one.

    Args:
        examples: dicts with `input_ids` and `labels` (lists of ints); packed rows (from
            `build_causal_examples(..., packing=True)`) also carry `position_ids`.
        pad_token_id: token id used for padding (e.g. the tokenizer's pad or eos id).
        mask_dtype: dtype of the 4D mask of packed batches: the model's compute dtype.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        flatten: join packed rows into one row, with no padding at all (a (1, total tokens) batch);
            for attention that works example by example (`lorakit.fast.use_packed_attention`). Only
            up to FLATTEN_MAX_TOKENS: the joined row's 4D mask grows with the square of its length.

    Returns:
        `input_ids` (batch, seq), `labels` (batch, seq; -100 on padding) and `attention_mask`:
        (batch, seq) of 1/0 for plain batches; for packed batches the block-diagonal causal
        (batch, 1, seq, seq) float mask, plus `position_ids` (batch, seq).
    """
    if not examples:
        raise ValueError("collate_causal needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: pass the tokenizer's pad_token_id or eos_token_id")
    packed = "position_ids" in examples[0]
    if any(("position_ids" in e) != packed for e in examples):
        raise ValueError("cannot mix packed and unpacked examples in one batch")
    if packed and flatten and len(examples) > 1 and sum(len(e["input_ids"]) for e in examples) <= FLATTEN_MAX_TOKENS:
        keys = dict.fromkeys(k for e in examples for k in e)  # a key some rows lack is 0 there
        examples = [{k: [v for e in examples for v in e.get(k, [0] * len(e["input_ids"]))] for k in keys}]
    length = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": _padded([e["input_ids"] for e in examples], length, pad_token_id),
        "labels": _padded([e["labels"] for e in examples], length, IGNORE_INDEX),
    }
    for key in examples[0]:  # other per-token lists (e.g. a distillation mask) are zero-padded alike
        if key not in batch and key != "position_ids":
            batch[key] = _padded([e[key] for e in examples], length, 0)
    if packed:
        # padding tokens get position 0: each is its own one-token "example"
        position_ids = _padded([e["position_ids"] for e in examples], length, 0)  # (batch, seq)
        batch["position_ids"] = position_ids
        batch["attention_mask"] = block_causal_mask(position_ids, mask_dtype)  # (b, 1, seq, seq)
    else:
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        batch["attention_mask"] = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return batch
