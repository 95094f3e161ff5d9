"""One kind of progress bar for every phase that takes more than a few seconds: scoring, evaluation,
training (tqdm: count, rate and ETA; TQDM_DISABLE=1 turns them all off)."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional

from tqdm.auto import tqdm

_PHASE: ContextVar[Optional[str]] = ContextVar("lorakit_progress_phase", default=None)


def progress_bar(total: int, desc: Optional[str], unit: str = "it", leave: bool = True, **kwargs) -> tqdm:
    """A bar over `total` units labelled `desc`; a silent one when `desc` is None (library callers that did
    not ask for a bar). The ETA is the mean rate over the phase (smoothing 0): a slow first batch or a
    pause does not swing it by hours."""
    if desc is None:
        kwargs["disable"] = True  # (otherwise left unset, so that TQDM_DISABLE=1 applies)
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, smoothing=0, **kwargs)


@contextlib.contextmanager
def phase(label: Optional[str]) -> Iterator[None]:
    """Name what the code inside is doing ("scoring before training"): the batch loops below it that take
    their bar from `phase_bar` show one under that name (None: no bars), whatever library function runs."""
    token = _PHASE.set(label)
    try:
        yield
    finally:
        _PHASE.reset(token)


def phase_bar(total: int, unit: str = "example") -> tqdm:
    """A batch loop's bar, labelled by the enclosing `phase` (silent outside one); gone when it ends (the
    phase's caller prints the result)."""
    return progress_bar(total, _PHASE.get(), unit=unit, leave=False)
