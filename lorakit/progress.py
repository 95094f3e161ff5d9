"""One kind of progress bar for every phase that takes more than a few seconds: scoring, evaluation,
training (tqdm: count, rate and ETA; TQDM_DISABLE=1 turns them all off)."""
from __future__ import annotations

from typing import Optional

from tqdm.auto import tqdm


def progress_bar(total: int, desc: Optional[str], unit: str = "it", leave: bool = True, **kwargs) -> tqdm:
    """A bar over `total` units labelled `desc`; a silent one when `desc` is None (library callers that did
    not ask for a bar). The ETA is the mean rate over the phase (smoothing 0): a slow first batch or a
    pause does not swing it by hours."""
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=desc is None, dynamic_ncols=True,
                smoothing=0, **kwargs)
