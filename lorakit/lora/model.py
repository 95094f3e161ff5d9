"""LoraModel: a transformers (or any torch) model with LoRA layers injected, and the operations over them.

It holds the wrapped model as `.model`, so a PeftModel's keys read `base_model.model.<module>...`
exactly as PEFT's do.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterError, ConfigError
from .combine import COMBINATIONS, combine_layer, combined_rank
from .inject import (ModulesToSave, adapter_modules, find_targets, inject_adapter, lora_layers, mergeable_layers,
                     unwrap)
from .tokens import token_layers
from .layer_names import PEFT_PREFIX
from .parameters import LoraParameter
from .tying import resolve_weight_tying
from .targets import DEFAULT_TARGETS, default_targets, model_type, resolve_moe_targets


class LoraModel(nn.Module):
    """The base model with every adapter's layers in place; one adapter set (or several) active at a time."""

    prefix = PEFT_PREFIX

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self.trainable_adapters: set[str] = set()  # those whose parameters require grad (PEFT's rules below)
        self.layers_disabled = False  # disable_adapter_layers(): the base model's outputs, nothing trains
        self.inject_adapter(config, adapter_name, low_cpu_mem_usage)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ adapters
    def inject_adapter(self, config: LoraConfig, adapter_name: str, low_cpu_mem_usage: bool = False) -> list[str]:
        """Add adapter `adapter_name` (inactive unless it is the first); low_cpu_mem_usage: its LoRA factors empty on
        the meta device until a load fills them (see inject.inject_adapter)."""
        if adapter_name in self.peft_config:
            raise AdapterError(f"Adapter with name {adapter_name!r} already exists; pick another name "
                               "or delete_adapter() it first")
        config = resolve_weight_tying(self.model, resolve_config(self.model, config))
        self._check_same_parameters(config)
        self._check_one_bias(config)
        targets = inject_adapter(self.model, config, adapter_name, low_cpu_mem_usage)
        self.peft_config[adapter_name] = config
        if not self.active_adapters:  # the first adapter is active, and trains unless it is for inference
            self.active_adapters = [adapter_name]
            if not config.inference_mode:
                self.trainable_adapters.add(adapter_name)
        self._apply_activity()  # a later one is added inactive and frozen
        return targets

    def _check_one_bias(self, config: LoraConfig) -> None:
        """PEFT's rule: one adapter at most trains biases (they are the base model's own, shared by all)."""
        with_bias = [n for n, other in self.peft_config.items() if other.bias != "none"]
        if config.bias != "none" and with_bias:
            raise ConfigError([f"{type(self).__name__} supports only 1 adapter with bias. When using multiple "
                               f"adapters, set bias to 'none' for all adapters (adapter {with_bias[0]!r} has "
                               f"bias={self.peft_config[with_bias[0]].bias!r})"], where="bias")

    def _check_same_parameters(self, config: LoraConfig) -> None:
        """PEFT's rule: every adapter with target_parameters names the same parameters (they share wrappers)."""
        new = set(config.target_parameters or [])
        for name, other in self.peft_config.items():
            if new and other.target_parameters and set(other.target_parameters) != new:
                raise ConfigError(["When using multiple adapters with `target_parameters`, all adapters must "
                                   f"target the same set of parameters, but got {sorted(new)} for the new adapter "
                                   f"and {sorted(other.target_parameters)} for adapter '{name}' (adapters share one "
                                   "wrapper per parameter, so they must name the same parameters)"],
                                  where="target_parameters")

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name, or the list of them when several are active (PEFT's property)."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Make these adapters active (several active adapters add their updates) and, as PEFT does, the only
        trainable ones, or all frozen with `inference_mode`."""
        names = self.known_adapters(adapter_name)
        if not names:
            raise AdapterError(f"set_adapter() needs at least one adapter; this model has {sorted(self.peft_config)}")
        self._check_one_copy_each(names)
        self._unmerge_first("set_adapter()")  # as PEFT: warn, unmerge, switch
        self.active_adapters = names
        self.trainable_adapters = set() if inference_mode else set(names)
        self._apply_activity()

    def _check_one_copy_each(self, names: list[str]) -> None:
        """PEFT's rule: a module trained in full is not additive, so two active adapters cannot both have a copy of
        it (which copy would run?)."""
        for module_name, module in adapter_modules(self.model):
            if isinstance(module, ModulesToSave) and len([n for n in names if n in module.modules_to_save]) > 1:
                both = [n for n in names if n in module.modules_to_save]
                raise AdapterError(f"Only one adapter can be set at a time for ModulesToSaveWrapper: adapters {both} "
                                   f"each train their own copy of {module_name} (modules_to_save); activate one of "
                                   "them, or give them different modules_to_save")

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Let these adapters' parameters train (or freeze them), active or not; the others keep their state."""
        names = self.known_adapters(adapter_names)
        self.trainable_adapters = (self.trainable_adapters | set(names)) if requires_grad \
            else (self.trainable_adapters - set(names))
        self._apply_activity()

    def known_adapters(self, adapter_names: Union[str, Sequence[str]]) -> list[str]:
        """The names as a list; AdapterError naming any this model does not have."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}")
        return names

    def _apply_activity(self) -> None:
        """Push the active list to every layer, and requires_grad to every adapter's parameters."""
        for _, module in adapter_modules(self.model):
            module.active_adapters = list(self.active_adapters)
        trainable = set() if self.layers_disabled else self.trainable_adapters
        for _, module in lora_layers(self.model):
            for name in module.r:
                for p in module._adapter_parameters(name):
                    p.requires_grad_(name in trainable)
        for _, module in adapter_modules(self.model):
            if isinstance(module, ModulesToSave):
                for name, copy_ in module.modules_to_save.items():
                    for p in copy_.parameters():
                        p.requires_grad_(name in trainable)
        for _, module in token_layers(self.model):
            for name, p in module.token_adapter.trainable_tokens_delta.items():
                p.requires_grad_(name in trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(f"Adapter {adapter_name} does not exist; this model has {sorted(self.peft_config)}")
        if any(adapter_name in layer.merged_adapters for _, layer in mergeable_layers(self.model)):
            raise AdapterError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge "
                               "them first. (model.unmerge_adapter() does.)")
        for _, module in adapter_modules(self.model):
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self.trainable_adapters.discard(adapter_name)
        if adapter_name in self.active_adapters:  # as PEFT: the others active, or the first by name, set active
            remaining = [n for n in self.active_adapters if n != adapter_name] or sorted(self.peft_config)[:1]
            if remaining:
                self.set_adapter(remaining)
                return
            self.active_adapters = []
        self._apply_activity()

    # ------------------------------------------------------------------ merge / disable / unload
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Fold the adapters into W. With safe_merge, every layer is checked first: a non-finite result anywhere
        raises, naming the layer, and no weight changes.

        A base weight another module shares (a tied embedding and head) is merged into a copy of its own, so
        the other module is left as it was (LoraLayer.merge).
        """
        layers = mergeable_layers(self.model)
        if not self._warn_merged(layers, adapter_names):
            return
        if safe_merge:
            for name, layer in layers:
                if bad := layer.non_finite_merge(adapter_names):
                    raise AdapterError(f"NaNs detected in the merged weights. The adapter {bad} seems to be broken: "
                                       f"merging it into {name} gives non-finite weights; no layer was changed")
        for _, layer in layers:
            layer.merge(adapter_names)

    @staticmethod
    def _warn_merged(layers: list, adapter_names: Optional[Sequence[str]]) -> bool:
        """PEFT's warnings when some adapters are merged already; False when there is nothing left to merge."""
        merged = sorted({n for _, layer in layers for n in layer.merged_adapters})
        if not merged:
            return True
        new = sorted({n for _, layer in layers for n in layer._to_merge(adapter_names)})
        if not new:
            warnings.warn("All adapters are already merged, nothing to do.")
            return False
        warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally merging "
                      f"{','.join(new)}.")
        return True

    def unmerge_adapter(self) -> None:
        for _, layer in mergeable_layers(self.model):
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this block the model is the base model exactly (merged adapters are taken out and put back), and,
        as in PEFT, no adapter parameter requires grad; on exit each gets back the state it had."""
        merged = {id(l): list(l.merged_adapters) for _, l in mergeable_layers(self.model)}
        self.unmerge_adapter()
        was_disabled = self.layers_disabled
        if len({layer.disabled for _, layer in adapter_modules(self.model)}) > 1:  # (layers switched one by one)
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the context, all adapter layers will be "
                          "enabled.")
            was_disabled = False
        self._set_layers_disabled(True)
        try:
            yield
        finally:
            self._set_layers_disabled(was_disabled)
            for _, layer in mergeable_layers(self.model):
                if merged.get(id(layer)):
                    layer.merge(merged[id(layer)])

    def disable_adapter_layers(self) -> None:
        """The base model's outputs, and no adapter trains, until enable_adapter_layers() (which gives the trainable
        ones back); merged adapters are unmerged first. As PEFT's."""
        self._unmerge_first("disable_adapter_layers()")
        self._set_layers_disabled(True)

    def enable_adapter_layers(self) -> None:
        self._set_layers_disabled(False)

    def _set_layers_disabled(self, disabled: bool) -> None:
        self.layers_disabled = disabled
        self._set_disabled(disabled)
        self._apply_activity()

    def _unmerge_first(self, call: str) -> None:
        if any(layer.merged_adapters for _, layer in mergeable_layers(self.model)):
            warnings.warn(f"{call} while adapters are merged into the weights: unmerging them first")
            self.unmerge_adapter()

    def _set_disabled(self, disabled: bool) -> None:
        for _, module in adapter_modules(self.model):
            module.disabled = disabled

    @property
    def targeted_module_names(self) -> list[str]:
        """The names of the modules with LoRA layers, as PEFT lists them (relative to the wrapped model)."""
        return [name for name, layer in lora_layers(self.model) if not isinstance(layer, LoraParameter)]

    @property
    def targeted_parameter_names(self) -> list[str]:
        """The full names of the parameters with LoRA (target_parameters), as PEFT lists them."""
        return [f"{name.replace('.base_layer', '')}.{layer.parameter_name}"
                for name, layer in lora_layers(self.model) if isinstance(layer, LoraParameter)]

    def _get_kasa_loss(self) -> float:
        """PEFT's KaSA regularisation term, summed over the layers that use KaSA. lorakit refuses KaSA (a research
        variant) at LoraConfig, so no layer here has one: 0.0, what PEFT returns for a model without KaSA layers."""
        return 0.0

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        """Merge the active adapters into W and return the plain model, with no LoRA modules left."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return unwrap(self.model, merge=True, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every LoRA module without merging; returns the original model."""
        for _, layer in mergeable_layers(self.model):
            layer.unmerge()
        return unwrap(self.model, merge=False)

    # ------------------------------------------------------------------ combination
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total", **_ignored) -> None:
        """Create adapter `adapter_name` = a weighted combination of existing adapters (not activated)."""
        if len(adapters) == 1 and combination_type in COMBINATIONS:  # as PEFT: one adapter is combined linearly
            combination_type = "linear"
        self._check_combination(adapters, weights, adapter_name, combination_type, density)
        layers = [(name, layer) for name, layer in lora_layers(self.model) if any(a in layer.r for a in adapters)]
        if combination_type.endswith("svd") and not svd_rank:  # PEFT's rule: one rank for every layer, the largest
            svd_rank = max(max([c.r, *c.rank_pattern.values()]) for c in (self.peft_config[a] for a in adapters))
        ranks = {name: combined_rank(layer, adapters, combination_type, svd_rank) for name, layer in layers}
        for name, layer in layers:  # every layer's new factors made first, then filled: PEFT's order of random
            layer.add_adapter(adapter_name, r=ranks[name], lora_alpha=ranks[name])  # draws (inits, then DARE masks)
        for name, layer in layers:
            A, B = combine_layer(layer, adapters, weights, combination_type, ranks[name],
                                 1.0 if density is None else density, majority_sign_method, svd_clamp)
            a_param, b_param = layer.factor_params(adapter_name)
            with torch.no_grad():
                a_param.copy_(A.reshape(a_param.shape))
                b_param.copy_(B.reshape(b_param.shape))
        self._copy_saved_modules(adapters, adapter_name)
        self.peft_config[adapter_name] = _combined_config(self.peft_config[adapters[0]], ranks)
        self._apply_activity()

    def _check_combination(self, adapters, weights, adapter_name, combination_type, density) -> None:
        problems = [f"unknown adapter {a!r}" for a in adapters if a not in self.peft_config]
        if len(adapters) != len(weights):
            problems.append(f"{len(adapters)} adapters but {len(weights)} weights")
        if combination_type not in COMBINATIONS:
            problems.append(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
        if adapter_name in self.peft_config:
            problems.append(f"an adapter named {adapter_name!r} exists already")
        if any(self.peft_config[a].trainable_token_indices for a in adapters if a in self.peft_config):
            problems.append("adapters with trainable_token_indices cannot be combined (their rows replace the "
                            "embedding's, they do not add)")
        if any(self.peft_config[a].target_parameters for a in adapters if a in self.peft_config):
            problems.append("adapters with target_parameters cannot be combined (as in PEFT); combine others")
        if any(self.peft_config[a].use_dora for a in adapters if a in self.peft_config):
            problems.append("DoRA adapters cannot be combined (their magnitude vectors do not add)")
        if any(self.peft_config[a].lora_bias for a in adapters if a in self.peft_config):
            problems.append("adapters with lora_bias cannot be combined (the combination has no bias term to keep "
                            "lora_B's biases in); combine adapters without it")
        shared = []  # as PEFT: trained copies (modules_to_save) do not average
        for name, module in adapter_modules(self.model):
            if getattr(module, "grouped", False) and any(a in module.r for a in adapters):
                problems.append(f"{name} is a grouped convolution: its B is block-diagonal per group, which the "
                                "combinations do not keep; combine adapters that leave it out")
            both = [a for a in adapters if a in module.modules_to_save] if isinstance(module, ModulesToSave) else []
            if len(both) > 1:
                shared.append(f"adapters {both} each have their own trained copy of {name}")
        if shared:
            problems.append("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                            f"found {len(shared)} such instance(s). ({'; '.join(shared)}: combine adapters of which "
                            "at most one has it)")
        needs_density = combination_type not in ("linear", "cat", "svd")
        if needs_density and (density is None or not 0 < density <= 1):
            problems.append(f"combination_type={combination_type!r} needs density in (0, 1], got {density!r}")
        if problems:
            raise ConfigError(problems, where="add_weighted_adapter")

    def _copy_saved_modules(self, sources: Sequence[str], new: str) -> None:
        """modules_to_save of the new adapter: the trained copy of the one source that has it."""
        for _, module in adapter_modules(self.model):
            if isinstance(module, ModulesToSave):
                src = next((s for s in sources if s in module.modules_to_save), None)
                if src is not None:
                    module.modules_to_save[new] = copy.deepcopy(module.modules_to_save[src])


def resolve_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """A private copy with what the model implies filled in (the caller's object is never touched)."""
    config = copy.deepcopy(config)
    if config.target_modules is None and config.target_parameters:  # PEFT: the defaults where it knows them
        config.target_modules = list(DEFAULT_TARGETS.get(model_type(model), []))
    if config.target_modules is None:
        config.target_modules = default_targets(model)
    moe = resolve_moe_targets(model, config.target_modules, config.target_parameters, config.r, config.lora_alpha)
    if moe is not None:  # saved as resolved, so PEFT loading the file adapts exactly these
        config.target_modules, params, rank_add, alpha_add = moe
        config.target_parameters = params or None
        config.rank_pattern = {**config.rank_pattern, **rank_add}
        config.alpha_pattern = {**config.alpha_pattern, **alpha_add}
    if not config.fan_in_fan_out and any(type(m).__name__ == "Conv1D" for m in model.modules()):
        config.fan_in_fan_out = _targets_conv1d(model, config)  # recorded so PEFT reads the file right
    return config


def _combined_config(first: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    r = max(ranks.values())
    odd = {n: k for n, k in ranks.items() if k != r}
    return first.copy(r=r, lora_alpha=r, rank_pattern=odd, alpha_pattern=dict(odd), use_rslora=False,
                      use_dora=False, init_lora_weights=True, target_modules=sorted(ranks), lora_dropout=0.0,
                      layers_to_transform=None, layers_pattern=None, exclude_modules=None)


def _targets_conv1d(model: nn.Module, config: LoraConfig) -> bool:
    names = find_targets(model, config, required=not config.target_parameters)
    return any(type(getattr(model.get_submodule(n), "base_layer", model.get_submodule(n))).__name__ == "Conv1D"
               for n in names)
