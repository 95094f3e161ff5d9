"""Silence the known messages that importing lorakit's dependencies prints and that concern no lorakit user.

transformers imports torchao whenever it is installed (lorakit's `qlora` extra): `transformers.quantizers.auto`
imports its torchao quantizer at module level, so loading any model imports torchao, whether or not QLoRA is
used. torchao then logs "Failed to load .../torchao/_C_mxfp8...so" for each prebuilt kernel library built for
other hardware or another Python (CUDA-only, cp310), and torch logs a deprecation note for each enum torchao
registers with `register_constant`. Neither can be acted on by the user, and lorakit cannot stop transformers'
import, so these exact messages (and no others) are dropped by a filter on the two loggers that emit them.
"""
from __future__ import annotations

import logging

KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
}
"""Logger name -> the fragments of the messages dropped from it."""


class _DropKnownNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(fragment in message for fragment in self.fragments)


def silence_import_noise() -> None:
    """Add the filters (once; calling again does nothing)."""
    for name, fragments in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(fragments))
