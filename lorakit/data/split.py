"""A deterministic train / validation split."""

from __future__ import annotations

import random
from typing import TypeVar

from lorakit.data.records import RecordSet
from lorakit.errors import ConfigError

Records = TypeVar("Records", RecordSet, list)


def validation_size(count: int, val_fraction: float, max_val: int | None) -> int:
    """How many of `count` records go to validation: `val_fraction` of them (at least one
    when the fraction is positive), at most `max_val`, and never all of them."""
    if count < 2 or val_fraction <= 0:
        return 0
    size = max(1, round(count * val_fraction))
    if max_val is not None:
        size = min(size, max_val)
    return min(size, count - 1)


def train_val_split(records: Records, val_fraction: float = 0.1, seed: int = 0,
                    max_val: int | None = 200) -> tuple[Records, Records]:
    """Split records into (train, validation), the same way every time for the same seed.

    Validation records are drawn at random (seeded); both parts keep the original order.

    Args:
        records: a `RecordSet` or a plain list.
        val_fraction: share of records for validation, in [0, 1).
        seed: seed of the draw.
        max_val: cap on the number of validation records (None = no cap).

    Returns:
        (train, validation), of the same type as `records`. Validation is empty when
        `val_fraction` is 0 or there are fewer than two records.

    Raises:
        ConfigError: val_fraction outside [0, 1) or a negative max_val.
    """
    problems = []
    if not 0 <= val_fraction < 1:
        problems.append(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_val is not None and max_val < 0:
        problems.append(f"max_val must be >= 0, got {max_val}")
    if problems:
        raise ConfigError(problems, where="validation split")
    count = len(records)
    chosen = set(random.Random(seed).sample(range(count),
                                            validation_size(count, val_fraction, max_val)))
    train = [i for i in range(count) if i not in chosen]
    val = sorted(chosen)
    if isinstance(records, RecordSet):
        return records.subset(train), records.subset(val)
    return [records[i] for i in train], [records[i] for i in val]
