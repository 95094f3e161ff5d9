"""The names PEFT's tuner layers carry, on lorakit's LoRA layer, so code that inspects PEFT's layers runs unchanged:
`prefix`, `adapter_layer_names`, `other_param_names`, `get_base_layer()`, and a repr that reads `lora.Linear(...)`."""
from __future__ import annotations

import torch
from torch import nn

PEFT_PREFIX = "lora_"
"""What every LoRA parameter name contains (PEFT's `prefix`): `model.prefix in name` finds adapter weights."""


class PeftLayerNames:
    """Mixed into LoraLayer. Its subclasses set `factor_names`; the per-adapter stores are named after them."""

    prefix = PEFT_PREFIX
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "variant")
    """The per-adapter dicts that hold no weights (PEFT's list, less use_dora/lora_bias: `variant` says that)."""

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """The per-adapter stores that hold weights: the two factors and DoRA's magnitudes."""
        return tuple(self.factor_names) + ("lora_magnitude_vector",)

    def get_base_layer(self) -> nn.Module:
        """The wrapped layer (followed down, should a base layer be a LoRA layer itself)."""
        base = self.base_layer
        while isinstance(base, PeftLayerNames):
            base = base.base_layer
        return base

    def _get_name(self) -> str:
        """The repr's class name, PEFT's: lora.Linear (GPT-2's Conv1D too), lora.Embedding, lora.Conv2d ...,
        lora.ParamWrapper for target_parameters."""
        kind = type(self).__name__.removeprefix("Lora")
        return "lora." + {"Conv": type(self.base_layer).__name__, "Parameter": "ParamWrapper"}.get(kind, kind)

    # ------------------------------------------------------------------ PEFT's per-layer API (BaseTunerLayer's)
    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into this layer's weight (PEFT's flag)."""
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        """Whether this layer's adapters are switched off (PEFT's read-only flag; `enable_adapters` sets it)."""
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's per-layer switch: on, the active adapters train again; off, every adapter here is frozen and
        skipped. (The model's `disable_adapter_layers()` / `enable_adapter_layers()` do this for all layers.)"""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for name in self._all_available_adapter_names():
                for p in self._adapter_parameters(name):
                    p.requires_grad_(False)
        self.disabled = not enabled

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        """PEFT's per-layer `set_adapter`: these adapters active here and, unless `inference_mode`, the only ones
        that train. (The model's `set_adapter` checks the names and does this for every layer.)"""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self._all_available_adapter_names():
            for p in self._adapter_parameters(name):
                p.requires_grad_(name in names and not inference_mode)
        self.active_adapters = names

    def _all_available_adapter_names(self) -> list[str]:
        """The names of the adapters this layer holds, sorted (PEFT's helper)."""
        return sorted(self.r)

    def get_delta_weight(self, adapter: str) -> "torch.Tensor":
        """PEFT's name: adapter `adapter`'s update scaling · B A in the base weight's own layout and dtype."""
        weight = self.base_weight()
        delta = self.delta_weight(adapter, dtype=torch.float32)
        return self._to_weight_layout(delta).reshape(weight.shape).to(weight.dtype)

    @property
    def in_features(self) -> int:
        """PEFT's: the base layer's input size (a linear's in_features, a conv's in_channels, an embedding's
        num_embeddings, GPT-2's Conv1D's nx)."""
        return self._io_features()[0]

    @property
    def out_features(self) -> int:
        """PEFT's: the base layer's output size (out_features, out_channels, embedding_dim, nf)."""
        return self._io_features()[1]

    def _io_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        for names in (("in_features", "out_features"), ("in_channels", "out_channels"),
                      ("num_embeddings", "embedding_dim"), ("embed_dim", "embed_dim")):
            if all(hasattr(base, n) for n in names):
                return getattr(base, names[0]), getattr(base, names[1])
        weight = base.weight  # GPT-2's Conv1D: (nx, nf)
        return (weight.shape[0], weight.shape[1]) if getattr(self, "fan_in_fan_out", False) else \
            (weight.shape[1], weight.shape[0])
