"""Leaner recomputation under activation checkpointing: the recompute skips the one matmul it never uses.

Non-reentrant checkpointing (torch.utils.checkpoint, what transformers' per-layer checkpointing uses)
reruns a decoder layer's forward in the backward only to get back the tensors autograd saved; the rerun's
outputs are thrown away. In a pre-norm decoder layer (Llama, Mistral, Qwen2, Qwen3) the MLP's down_proj
feeds nothing but the residual add that ends the layer, so its base product h Wᵀ - a quarter of the
layer's matmul FLOPs - is dead work there. A LoRA down_proj marked here saves the same tensors as in the
forward (its input and the rank-r product, all its backward needs) and returns an unfilled output
instead, while `checkpoint_context` (the checkpoint's context_fn) says a recompute is running.

Only modules marked by `mark_recompute_outputs` skip, and only inside that context: a model checkpointed
without `CHECKPOINT_KWARGS` recomputes everything, as before.
"""
from __future__ import annotations

import contextlib
import threading

from torch import nn

from lorakit.fast.kernels.patch import FAMILIES

_state = threading.local()  # the recompute runs on autograd's backward thread: set and read there


@contextlib.contextmanager
def _recomputing():
    previous = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = previous


def recomputing() -> bool:
    """Whether a checkpoint recompute with `checkpoint_context` is running on this thread."""
    return getattr(_state, "on", False)


def checkpoint_context():
    """torch.utils.checkpoint's context_fn: nothing in the forward, the recompute flag in the recompute."""
    return contextlib.nullcontext(), _recomputing()


CHECKPOINT_KWARGS = {"use_reentrant": False, "context_fn": checkpoint_context}
"""What to pass as transformers' gradient_checkpointing_kwargs for the lean recompute."""


def mark_recompute_outputs(model: nn.Module) -> int:
    """Mark the LoRA down_proj of each decoder layer's MLP in a Llama-family model as unused by its
    layer's recompute (see the module docstring); returns how many were marked (0 for other models,
    whose layers may read their last projection's output, e.g. a post-norm)."""
    from lorakit.lora.layer import LoraLinear

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in FAMILIES:
        return 0
    marked = 0
    for name, module in base.named_modules():
        if isinstance(module, LoraLinear) and name.endswith("mlp.down_proj"):
            module.output_unused_in_recompute = True
            marked += 1
    return marked
