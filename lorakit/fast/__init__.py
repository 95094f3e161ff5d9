"""Faster training paths that compute the same results as the plain ones (each has a test against it)."""
from lorakit.fast.attention import use_packed_attention
from lorakit.fast.kernels import use_fast_kernels
from lorakit.fast.loss import label_only_lm_loss
from lorakit.fast.memory import keep_freed_memory
from lorakit.fast.recompute import CHECKPOINT_KWARGS, mark_recompute_outputs

__all__ = ["label_only_lm_loss", "keep_freed_memory", "use_packed_attention", "use_fast_kernels", "CHECKPOINT_KWARGS",
           "mark_recompute_outputs"]
