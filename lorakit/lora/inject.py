"""Injection: find the target modules, swap each for a LoRA layer, wrap modules_to_save, freeze the rest."""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ..config import BIAS_CHOICES, TASK_HEADS, LoraConfig, TaskType, UnsupportedBiasError
from ..errors import ConfigError, TargetError
from .loftq import init_loftq
from .conv_layer import CONV_LAYERS
from .layer import BASE_ADAPTER, ROW_ADAPTERS, LoraEmbedding, LoraLayer, LoraLinear, rows_by_adapter
from .attention_layer import LoraMultiheadAttention
from .parameters import inject_parameters
from .tokens import TrainableTokens, add_trainable_tokens
from .tying import modules_to_tie, tie_adapters
from .targets import (closest_names, default_targets, is_conv1d_gpt2, layer_index, linear_types, name_matches,
                      output_head_names, supported_types, warn_unmatched_patterns)


class ModulesToSave(nn.Module):
    """A module trained in full: the frozen original plus one trainable copy per adapter."""

    adapter_layer_names = ("modules_to_save",)  # PEFT's names for the per-adapter stores (see layer_names.py)
    other_param_names = ()

    def __init__(self, original_module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.add_adapter(adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        """The model's active adapters that have a copy here (as PEFT's wrapper lists them)."""
        return [a for a in self._active if a in self.modules_to_save]

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self._active = list(names)

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        if name not in self._active:
            self._active.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self._active = [a for a in self._active if a != name]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)

    def _module_for(self, names: Sequence[str]) -> nn.Module:
        for n in names:
            if n in self.modules_to_save:
                return self.modules_to_save[n]
        return self.original_module

    def forward(self, x, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        rows = ROW_ADAPTERS.get()
        if rows is None:
            return self._module_for(self.active_adapters)(x, *args, **kwargs)
        out = None
        for name, idx in rows_by_adapter(rows, x.shape[0], x.device).items():
            module = self.original_module if name == BASE_ADAPTER else self._module_for([name])
            part = module(x.index_select(0, idx), *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise TypeError("Mixed batching is only supported for the following modules: Linear, Embedding, "
                                "Conv1d, Conv2d, Conv3d. (lorakit routes rows through any module in modules_to_save "
                                f"that returns one batch-first tensor; {type(module).__name__} returned a "
                                f"{type(part).__name__}.) Run this batch with one adapter at a time instead")
            out = part.new_empty((x.shape[0],) + part.shape[1:]) if out is None else out
            out[idx] = part
        return out

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict(keep_vars=True)) if name in self.modules_to_save else {}


ADAPTER_MODULES = (LoraLayer, ModulesToSave, TrainableTokens)


def _wrap(module: nn.Module, fan_in_fan_out: bool) -> LoraLayer:
    if is_conv1d_gpt2(module):
        return LoraLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Linear):
        return LoraLinear(module, fan_in_fan_out=fan_in_fan_out)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    for conv, lora_conv in CONV_LAYERS.items():
        if isinstance(module, conv):
            return lora_conv(module)
    if isinstance(module, nn.MultiheadAttention):
        return LoraMultiheadAttention(module)
    raise AssertionError(type(module))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _saved_module_specs(model: nn.Module, config: LoraConfig) -> tuple[list[str], list[str]]:
    """(user-named modules_to_save, task heads kept trainable for this task type)."""
    task = config.task_type if isinstance(config.task_type, TaskType) else None
    return list(config.modules_to_save or []), TASK_HEADS.get(task, []) if task else []


def find_targets(model: nn.Module, config: LoraConfig, exclude_names: set[str] = frozenset(),
                 required: bool = True) -> list[str]:
    """Names of the modules `config` adapts. Raises TargetError when nothing matches and `required`."""
    spec = config.target_modules if config.target_modules is not None else default_targets(model)
    all_linear = spec == "all-linear"
    heads = output_head_names(model) if all_linear else set()
    found, unsupported = [], []
    for name, module in model.named_modules():
        if not name or name in exclude_names or any(name.startswith(e + ".") for e in exclude_names):
            continue
        if isinstance(module, (ModulesToSave, TrainableTokens)) or ".modules_to_save." in name \
                or ".original_module" in name or ".token_adapter." in name:
            continue
        target = module.base_layer if isinstance(module, LoraLayer) else module
        if all_linear:
            hit = isinstance(target, linear_types()) and name not in heads
        else:
            hit = name_matches(spec, name)
        if not hit or name_matches(config.exclude_modules, name):
            continue
        if config.layers_to_transform is not None:
            wanted = config.layers_to_transform
            wanted = [wanted] if isinstance(wanted, int) else wanted
            if layer_index(name, config.layers_pattern) not in wanted:
                continue
        if not isinstance(target, supported_types()):
            unsupported.append(f"{name} ({type(target).__name__})")
            continue
        found.append(name)
    if unsupported and isinstance(spec, list):
        raise TargetError(f"target_modules matched modules LoRA cannot wrap: {', '.join(unsupported[:5])}. "
                          "Supported: nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention, "
                          "transformers Conv1D; "
                          "name their linear sub-layers instead")
    if not found and required:
        wanted = spec if isinstance(spec, list) else [spec]
        raise TargetError(f"target_modules {spec!r} matched no module of {type(model).__name__}. "
                          f"Closest module names: {closest_names(model, wanted)}")
    return found


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str,
                   low_cpu_mem_usage: bool = False) -> list[str]:
    """Add adapter `adapter_name` to `model` in place; returns the adapted module names.
    low_cpu_mem_usage: the LoRA layers' new factors are made empty on the meta device, for a load to fill (PEFT's
    option: nothing is initialised; until loaded, those layers cannot run)."""
    if config.bias not in BIAS_CHOICES:  # (checked here, as PEFT does, not when the config is made)
        raise UnsupportedBiasError(config.bias)
    if config.use_dora and config.init_lora_weights not in (True, False, "gaussian"):
        raise ConfigError([f"use_dora cannot be combined with init_lora_weights={config.init_lora_weights!r}"])
    tie_mode, tied = modules_to_tie(model, config, adapter_name)  # (tied modules get the embedding's adapter)
    saved, heads = _saved_module_specs(model, config)
    saved_names = _wrap_modules_to_save(model, saved, heads, adapter_name)
    only_parameters = config.target_parameters and not config.target_modules
    targets = [] if only_parameters else find_targets(model, config, exclude_names=saved_names | set(tied),
                                                      required=not config.target_parameters)
    loftq = config.init_lora_weights == "loftq"  # (it changes the base weight too: see lora/loftq.py)
    if loftq and low_cpu_mem_usage:
        raise ConfigError(["init_lora_weights='loftq' quantizes the base weights, which low_cpu_mem_usage=True "
                           "skips; load without low_cpu_mem_usage"], where="low_cpu_mem_usage")
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = _wrap(module, config.fan_in_fan_out)
            _set_submodule(model, name, module)
        with torch.device("meta") if low_cpu_mem_usage else contextlib.nullcontext():
            module.add_adapter(adapter_name, r=config.rank_for(name), lora_alpha=config.alpha_for(name),
                               lora_dropout=config.lora_dropout,
                               init_lora_weights=True if loftq else config.init_lora_weights,
                               use_rslora=config.use_rslora, use_dora=config.use_dora, lora_bias=config.lora_bias)
        if loftq:
            init_loftq(module, adapter_name, config.loftq_config)
    tie_adapters(model, tie_mode, tied, adapter_name)
    parameters = inject_parameters(model, config, adapter_name, modules_matched=bool(targets))
    if config.target_modules and config.target_parameters and not targets:
        spec = set(config.target_modules) if isinstance(config.target_modules, list) else config.target_modules
        warnings.warn(f"target_modules={spec} were set but no module was matched.", RuntimeWarning, stacklevel=4)
    warn_unmatched_patterns(config, targets + parameters)
    add_trainable_tokens(model, config, adapter_name)
    note_shared_weights(model)
    mark_trainable(model, config)
    return targets


def _wrap_modules_to_save(model: nn.Module, saved: list[str], heads: list[str], adapter_name: str) -> set[str]:
    wrapped, matched = set(), set()
    for name, module in list(model.named_modules()):
        if not name or ".modules_to_save." in name or ".original_module" in name or ".token_adapter." in name \
                or isinstance(module, (LoraLayer, TrainableTokens)):
            continue
        hits = [s for s in saved + heads if name_matches([s], name)]
        if not hits:
            continue
        matched.update(hits)
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
        else:
            _set_submodule(model, name, ModulesToSave(module, adapter_name))
        wrapped.add(name)
    missing = [s for s in saved if s not in matched and s not in heads]
    if missing:  # a warning, as PEFT runs on: a config may list the heads of several architectures
        warnings.warn(f"modules_to_save {missing} matched no module of {type(model).__name__}, so nothing is "
                      f"trained in full for them. Closest module names: {closest_names(model, missing, 'modules')}",
                      stacklevel=4)
    return wrapped


def mark_trainable(model: nn.Module, config: LoraConfig) -> None:
    """Freeze everything, then unfreeze LoRA factors, DoRA magnitudes, saved-module copies and biases."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.r:
                for p in module._adapter_parameters(adapter):
                    p.requires_grad_(True)
            if config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            for p in module.modules_to_save.parameters():
                p.requires_grad_(True)
        elif isinstance(module, TrainableTokens):
            for p in module.token_adapter.trainable_tokens_delta.parameters():
                p.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".original_module." not in name:
                p.requires_grad_(True)


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTER_MODULES)]


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def mergeable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that merge into W and unmerge: LoRA layers and trained token rows."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLayer, TrainableTokens))]


def note_shared_weights(model: nn.Module) -> None:
    """Tell each LoRA layer whose base weight another module shares (an input embedding tied to the output head)
    which configs tie them, so its merges go into a copy of its own (see LoraLayer.merge)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    config = getattr(model, "config", None)
    configs = list({id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())
                    if getattr(c, "tie_word_embeddings", False)}.values()) if config is not None else []
    for _, layer in lora_layers(model):
        if layer.tied is None and uses.get(id(getattr(layer.base_layer, "weight", None)), 0) > 1:
            layer.tied = {"configs": configs}


def unwrap(model: nn.Module, merge: bool, safe_merge: bool = False,
           adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
    """Put every base layer back (merging first when asked); returns the plain model."""
    for name, module in reversed(adapter_modules(model)):  # innermost first: LoraParameters nest
        if isinstance(module, LoraLayer):
            if merge:
                module.merge(adapter_names, safe_merge=safe_merge)
            _set_submodule(model, name, module.base_layer)
        elif isinstance(module, TrainableTokens):
            if merge:
                module.merge(adapter_names, safe_merge=safe_merge)
            _set_submodule(model, name, module.base_layer)
        else:
            chosen = module._module_for(module.active_adapters) if merge else module.original_module
            _set_submodule(model, name, chosen)
    return model
