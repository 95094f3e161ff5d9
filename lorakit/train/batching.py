"""Data order and batch bookkeeping: which examples form each micro-batch, and how many tokens it holds.

The order of epoch `e` is a permutation drawn from a generator seeded with (seed, e) alone, so it
does not depend on how much randomness the model consumed; a resumed run therefore sees exactly the
batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

IGNORE_INDEX = -100  # label value that the loss skips (PyTorch / transformers convention)

LossUnitCounter = Callable[[Mapping[str, Any]], int]


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The example indices of `epoch` in training order: a permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n_examples, generator=generator).tolist()


def micro_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of `batch_size` indices; the last one may be shorter (nothing is dropped)."""
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def windows(batches: list[list[int]], grad_accum: int) -> list[list[list[int]]]:
    """Group micro-batches into accumulation windows (one optimizer step each); never across epochs."""
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


def micro_batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch (a short last window still makes a step)."""
    return math.ceil(micro_batches_per_epoch(n_examples, batch_size) / grad_accum)


def loss_unit_counter(task: str) -> LossUnitCounter:
    """How many units the model's mean loss averages over, for each task.

    causal-lm: label tokens after the one-position shift (transformers drops the first label);
    seq2seq and token-cls: label tokens; seq-cls and qa: examples.
    """
    if task == "causal-lm":
        return lambda batch: _count_labels(batch, shift=True)
    if task in ("seq2seq", "token-cls"):
        return lambda batch: _count_labels(batch, shift=False)
    return count_examples


def _count_labels(batch: Mapping[str, Any], shift: bool) -> int:
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        return count_examples(batch)
    if shift and labels.dim() >= 2:
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def count_examples(batch: Mapping[str, Any]) -> int:
    """Rows in the batch: the first dimension of its first tensor."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def count_input_tokens(batch: Mapping[str, Any]) -> int:
    """Real (non-padding) input tokens: the 2-D attention mask's sum, the packed rows' lengths, else
    the size of input_ids."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.sum())
    positions = batch.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:
        # packed rows: padding sits at the end of each row with position 0; count that tail out
        tail = (positions.flip(-1) == 0).long().cumprod(-1).sum()
        return int(positions.numel() - tail)
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return int(ids.numel())
    return 0


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A new dict with every tensor moved to `device` (the caller's batch is left as it was)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def example_lengths(examples: Sequence[Any]) -> list[int]:
    """Tokens per example (the length of its input_ids)."""
    return [len(ex["input_ids"]) for ex in examples]


def group_by_length(order: list[int], lengths: Sequence[int], batch_size: int,
                    mega_batches: int = 50) -> list[int]:
    """Reorder one epoch's shuffled `order` so each micro-batch holds examples of similar length.

    The order is cut into chunks of `mega_batches` x `batch_size` (still random), and each chunk is
    sorted longest first, as transformers' LengthGroupedSampler does: the randomness of the epoch is
    kept at the chunk level, and padding inside a micro-batch nearly disappears. Deterministic, so an
    interrupted run resumes at the same place.
    """
    size = mega_batches * batch_size
    out: list[int] = []
    for start in range(0, len(order), size):
        out += sorted(order[start:start + size], key=lambda i: -lengths[i])
    return out

