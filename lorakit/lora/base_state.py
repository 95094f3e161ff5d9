"""The base model's own weights read from / written into a model with LoRA, under the base's original keys
(PEFT's `get_base_model_state_dict` / `set_base_model_state_dict`): the wrappers' infixes (`base_layer`,
`original_module`, `token_adapter`) are left out and the adapters' tensors are skipped.

    state = get_base_model_state_dict(peft_model)           # keys as in base_model.state_dict() before LoRA
    set_base_model_state_dict(peft_model, state)            # e.g. after FSDP wrapping, or to reset the base
"""
from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from .layer import LoraLayer
from .tokens import TokenRows, TrainableTokens

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_INFIX = {LoraLayer: "base_layer", TokenRows: "base_layer", TrainableTokens: "token_adapter"}
"""The child of each wrapper type that holds (or leads to) the original module: its name is no part of the base's
keys. ModulesToSave's `original_module` is looked up by name below (inject.py imports this package's layers)."""


def _base_root(model: nn.Module) -> nn.Module:
    """The module whose state_dict holds the base weights: a PeftModel's base model, else the model itself (made by
    inject_adapter_in_model)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def _infix(module: nn.Module) -> str | None:
    for kind, name in _INFIX.items():
        if isinstance(module, kind):
            return name
    return "original_module" if _is_saved_copy_wrapper(module) else None


def _is_saved_copy_wrapper(module: nn.Module) -> bool:
    """lorakit's ModulesToSave (by its structure, to keep this file free of inject.py's import cycle)."""
    return isinstance(getattr(module, "original_module", None), nn.Module) and \
        isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict)


def _original_key(root: nn.Module, key: str) -> str | None:
    """`key` of root.state_dict() as the base model names it, or None when the tensor belongs to an adapter."""
    parts, kept, module = key.split("."), [], root
    for i, part in enumerate(parts):
        if module is None:
            kept.append(part)
            continue
        infix = _infix(module)
        child = module._modules.get(part)
        if infix is not None:
            if part != infix:
                return None  # lora_A, lora_B, modules_to_save, trainable_tokens_delta ...: the adapter's
            module = child
            continue
        kept.append(part)
        module = child
    return ".".join(kept)


def _base_keys(root: nn.Module) -> dict[str, str]:
    """{original key: key in root.state_dict()} for every base tensor."""
    out = {}
    for key in root.state_dict(keep_vars=True):
        original = _original_key(root, key)
        if original is not None:
            out.setdefault(original, key)
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under its original keys, adapters left out (PEFT's function of that name).

    Args:
        model: a PeftModel, or a model made by inject_adapter_in_model.
    Returns:
        {key: tensor} with the keys the base model had before LoRA was put in (the tensors are the model's own,
        detached as state_dict() gives them; merged adapters are part of the weights, as in PEFT).
    """
    root = _base_root(model)
    state = root.state_dict()
    return {original: state[key] for original, key in _base_keys(root).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load tensors keyed as the base model names them into a model with LoRA (PEFT's function of that name).

    Args:
        model: a PeftModel, or a model made by inject_adapter_in_model.
        state_dict: {original key: tensor}, e.g. from get_base_model_state_dict or the base's checkpoint.
        strict: raise RuntimeError, as torch's load_state_dict does, on a missing or unexpected key.
    Returns:
        a namedtuple (missing_keys, unexpected_keys) in original keys; the adapters are never touched.
    """
    root = _base_root(model)
    keys = _base_keys(root)
    unexpected = [k for k in state_dict if k not in keys]
    missing = [k for k in keys if k not in state_dict]
    if strict and (missing or unexpected):
        problems = ([f"Missing key(s) in state_dict: {missing}"] if missing else []) + \
                   ([f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else [])
        raise RuntimeError("Error(s) in loading state_dict for the base model:\n\t" + "\n\t".join(problems))
    root.load_state_dict({keys[k]: v for k, v in state_dict.items() if k in keys}, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
