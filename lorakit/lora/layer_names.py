"""The names PEFT's tuner layers carry, on lorakit's LoRA layer, so code that inspects PEFT's layers runs unchanged:
`prefix`, `adapter_layer_names`, `other_param_names`, `get_base_layer()`, and a repr that reads `lora.Linear(...)`."""
from __future__ import annotations

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
