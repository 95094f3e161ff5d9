"""Model loading: embedded models, local folders, .gguf files and hub ids -> model + tokenizer.

    from lorakit.models import load_model
    loaded = load_model("smollm2-135m", task="causal-lm", device="auto", dtype="auto")
"""
from lorakit.models.device import DTYPE_CHOICES, DEVICE_CHOICES, resolve_device, resolve_dtype
from lorakit.models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel, find_embedded
from lorakit.models.gguf_cache import cache_root, ensure_gguf_cache, gguf_cache_folder
from lorakit.models.loader import TASKS, LoadedModel, load_model, normalize_task
from lorakit.models.sources import ModelSource, resolve_source

__all__ = [
    "DEFAULT_MODEL",
    "DEVICE_CHOICES",
    "DTYPE_CHOICES",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "LoadedModel",
    "ModelSource",
    "TASKS",
    "cache_root",
    "ensure_gguf_cache",
    "find_embedded",
    "gguf_cache_folder",
    "load_model",
    "normalize_task",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
]
