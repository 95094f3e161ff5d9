"""`lorakit estimate`: how much GPU memory full fine-tuning, LoRA and QLoRA need, before buying the GPU.

    from lorakit.estimate import resolve_shape, estimate, EstimateSettings
    est = estimate(resolve_shape("llama-3.1-8b"), EstimateSettings(method="qlora", seq_len=2048))
    est.total_bytes

The shapes are in `shapes.py` (built-in families, config.json, hub ids); the memory model, with its
formula, in `memory.py`.
"""
from .memory import (METHODS, OPTIMIZERS, EstimateSettings, MemoryEstimate, estimate, largest_fitting,
                     layer_activation_bytes, target_names)
from .shapes import KNOWN_SHAPES, ModelShape, resolve_shape, shape_from_config

__all__ = ["METHODS", "OPTIMIZERS", "EstimateSettings", "MemoryEstimate", "estimate", "largest_fitting",
           "layer_activation_bytes", "target_names", "KNOWN_SHAPES", "ModelShape", "resolve_shape",
           "shape_from_config"]
