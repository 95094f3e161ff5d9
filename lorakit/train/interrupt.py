"""Graceful stop: SIGINT / SIGTERM (or `StopFlag.request`) end training after the current step.

The trainer then writes a checkpoint and returns normally. A second Ctrl-C aborts at once.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional


class StopFlag:
    """Set when training should stop at the next step boundary."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str = "stop requested") -> None:
        if self.reason is None:
            self.reason = reason

    def clear(self) -> None:
        self.reason = None


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Route SIGINT / SIGTERM to `flag` while the block runs; restore the old handlers after.

    Only the main thread may install signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

    def handle(signum, frame):  # noqa: ARG001 - signal handler signature
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user means it
        flag.request(f"{names.get(signum, signum)} received")
        print(f"\nlorakit: {names.get(signum, signum)} received - finishing this step and "
              "writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handle) for sig in names}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
