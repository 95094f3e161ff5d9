"""What state the adapter layers are in (PEFT's get_layer_status / get_model_status, same fields).

A layer's adapters should agree with the model's: the same active list everywhere, an adapter's
parameters all trainable or all frozen. Where layers disagree the model-level field says "irregular",
which is what to look for when a model does not behave as expected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

from .inject import adapter_modules
from .layer import LoraLayer
from .model import LoraModel
from .tokens import TrainableTokens

IRREGULAR = "irregular"
Flag = Union[bool, Literal["irregular"]]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Flag]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Flag
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Flag]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


def _agreed(values: list) -> Flag:
    """True or False when every value is, else "irregular"."""
    return values[0] if values and all(v == values[0] for v in values) else IRREGULAR


def _adapter_params(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    if isinstance(module, LoraLayer):
        return {name: module._adapter_parameters(name) for name in module.r}
    if isinstance(module, TrainableTokens):  # (a tied head reports the input embedding's rows)
        return {name: [module.rows.trainable_tokens_delta[name]] for name in module.rows.token_indices}
    return {name: list(copy.parameters()) for name, copy in module.modules_to_save.items()}


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One entry per LoRA layer and per modules_to_save wrapper, in module order (names as PEFT's: under a
    PeftModel's base_model)."""
    root = model.base_model if isinstance(getattr(model, "base_model", None), LoraModel) else model
    out = []
    for name, module in adapter_modules(root):
        params = _adapter_params(module)
        out.append(TunerLayerStatus(
            name=name, module_type=type(module).__name__, enabled=not module.disabled,
            active_adapters=list(module.active_adapters),
            merged_adapters=list(getattr(module, "merged_adapters", [])),
            requires_grad={a: _agreed([p.requires_grad for p in ps]) for a, ps in params.items()},
            available_adapters=sorted(params),
            devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()}))
    if not out:
        raise ValueError("no adapter layers found in the model: is it a lorakit or PEFT model with adapters in it?")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layers' statuses summed up; a field the layers disagree on is "irregular"."""
    peft_config = getattr(model, "peft_config", {}) or {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = get_layer_status(model)
    available = sorted({a for s in layers for a in s.available_adapters})
    active = {tuple(s.active_adapters) for s in layers if isinstance(s.active_adapters, list)}
    merged_somewhere = {a for s in layers for a in s.merged_adapters}
    merged_everywhere = all(a in s.merged_adapters for s in layers for a in merged_somewhere
                            if a in s.available_adapters)
    params = list(model.parameters())
    return TunerModelStatus(
        base_model_type=type(base).__name__,
        adapter_model_type=type(getattr(model, "base_model", model)).__name__,
        peft_types={name: str(getattr(config, "peft_type", "LORA")) for name, config in peft_config.items()},
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        num_adapter_layers=len(layers),
        enabled=_agreed([s.enabled for s in layers]),
        active_adapters=list(active.pop()) if len(active) == 1 else IRREGULAR,
        merged_adapters=sorted(merged_somewhere) if merged_everywhere else IRREGULAR,
        requires_grad={a: _agreed([s.requires_grad[a] for s in layers if a in s.requires_grad]) for a in available},
        available_adapters=available,
        devices={a: sorted({d for s in layers for d in s.devices.get(a, [])}) for a in available})
