"""PEFT's low-level API: LoRA put into a model in place with no PeftModel around it, and one adapter's tensors
read from / written into a model, keyed as in adapter_model.safetensors.

    model = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), model)
    state = get_peft_model_state_dict(model)          # keys relative to `model` (a PeftModel's: base_model.model.)
    set_peft_model_state_dict(model, state)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterError
from .files import PREFIX, adapter_state_dict, load_into, warn_unsharded
from .model import LoraModel


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, **_ignored) -> nn.Module:
    """LoRA layers put into `model` in place, with no PeftModel around it (PEFT's low-level API): only the
    adapter's parameters train. As in PEFT, `model.peft_config` holds {adapter_name: config}, so
    get_peft_model_state_dict / set_peft_model_state_dict work on it (keys relative to `model`).
    low_cpu_mem_usage: the LoRA factors are made empty on the meta device; set_peft_model_state_dict fills them."""
    model.peft_config = LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage).peft_config
    return model


def _adapter_holder(model: nn.Module, adapter_name: str) -> tuple[nn.Module, str, LoraConfig]:
    """(the module holding the LoRA layers, the key prefix, the adapter's config) of a PeftModel, or of a model
    made by inject_adapter_in_model, whose keys have no `base_model.model.` prefix."""
    if isinstance(getattr(model, "base_model", None), LoraModel):
        model.base_model.known_adapters(adapter_name)
        return model.base_model.model, PREFIX, model.peft_config[adapter_name]
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        raise AdapterError(f"no adapter named {adapter_name!r} in this {type(model).__name__}; pass a PeftModel "
                           "or a model made by inject_adapter_in_model")
    return model, "", configs[adapter_name]


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict] = None,
                              adapter_name: str = "default", **_ignored) -> dict[str, torch.Tensor]:
    """One adapter's tensors under the keys of its adapter_model.safetensors (PEFT's function; `state_dict`
    is ignored: the tensors are read from the model)."""
    holder, prefix, config = _adapter_holder(model, adapter_name)
    tensors = {prefix + key: value for key, value in adapter_state_dict(holder, adapter_name, config.bias).items()}
    warn_unsharded(tensors, adapter_name)
    return tensors


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", **_ignored):
    """Copy tensors keyed as get_peft_model_state_dict gives them into adapter `adapter_name` (PEFT's function).
    Every key and shape is checked: a missing, unknown or misshapen tensor raises AdapterError naming it, so the
    returned missing/unexpected key lists are empty."""
    holder, prefix, config = _adapter_holder(model, adapter_name)
    tensors = {PREFIX + key.removeprefix(prefix): value for key, value in peft_model_state_dict.items()}
    load_into(holder, adapter_name, tensors, config.bias, "state dict")
    return nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])
