"""PeftModel and get_peft_model: PEFT's user-facing API over a LoraModel.

    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=[...]))
    model.save_pretrained("out/adapter")
    model = PeftModel.from_pretrained(fresh_base, "out/adapter")
    merged = model.merge_and_unload()
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .config import RESIDUAL_INITS, TASK_HEADS, LoraConfig, PeftType
from .errors import AdapterError
from .lora.files import (PREFIX, adapter_state_dict, fingerprint, fingerprint_mismatch, load_into, make_meta,
                         read_adapter_tensors, read_json_object, read_meta, save_adapter)
from .lora.inject import ModulesToSave, find_targets, lora_layers
from .lora.layer import BASE_ADAPTER, is_quantized_weight, module_weight, route_rows
from .lora.layer_names import PEFT_PREFIX
from .lora.model import LoraModel, resolve_config
from .lora.tokens import token_layers
from .lora.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .model_card import write_model_card


class _BoundForward(functools.partial):
    """`model.forward` of a PeftModel: its signature is the wrapped model's forward's, plus adapter_names."""

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self.args[0].get_base_model().forward)
        if "adapter_names" in sig.parameters:
            return sig
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        tail = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        return sig.replace(parameters=params + [extra] + tail)


class _ModelSignature:
    """Makes a PeftModel's forward show the wrapped model's arguments to tools that read its signature:
    transformers' Trainer keeps only the dataset columns that forward names (it looks through PEFT's own
    PeftModel the same way), and a bare (*args, **kwargs) made it drop input_ids and labels."""

    def __init__(self, function):
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, obj, objtype=None):
        return self.function if obj is None else _BoundForward(self.function, obj)


class PeftModel(nn.Module):
    """A model with LoRA adapters. Attributes and methods of the wrapped model pass through."""

    prefix = PEFT_PREFIX

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 adapter_dtype: Optional[torch.dtype] = None, autocast_adapter_dtype: Optional[bool] = None,
                 low_cpu_mem_usage: bool = False):
        """autocast_adapter_dtype: as PEFT's, True upcasts fp16/bf16 adapter weights to fp32 and False keeps the base
        layers' dtype; None (lorakit's default, a documented difference) keeps the base's dtype too.
        low_cpu_mem_usage: as PEFT's, the LoRA factors are made empty on the meta device, for a load to fill."""
        super().__init__()
        fp = _fingerprint_before(model, peft_config)
        self.base_model = LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage)
        self.adapter_dtype = adapter_dtype
        self._adapters_disabled = 0  # nesting depth of disable_adapter() blocks
        self.task_type = self.base_model.peft_config[adapter_name].task_type  # the model's task, for later adapters
        self.fingerprints: dict[str, dict] = {adapter_name: fp}
        self.adapter_metadata: dict[str, dict[str, Any]] = {adapter_name: {}}
        self._cast_adapter(adapter_name, autocast_adapter_dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ basics
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        active = self.base_model.active_adapters
        return active[0] if len(active) == 1 else list(active)

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_peft_config(self) -> LoraConfig:
        active = self.base_model.active_adapters
        return self.peft_config[active[0]]

    @property
    def peft_type(self) -> PeftType:
        return self.active_peft_config.peft_type

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside `disable_adapter()` (while adapters are active), as PEFT's property of that name."""
        return not self._adapters_disabled or not self.active_adapters

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.base_model.model, "dtype", None)

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The modules trained in full by any adapter (task heads included, as PEFT lists them), or None."""
        names = {n for c in self.peft_config.values()
                 for n in list(c.modules_to_save or []) + TASK_HEADS.get(c.task_type, [])}
        return names or None

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """Each adapter layer's state (enabled, active, merged, trainable, devices), as PEFT's."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The layers' states summed up; "irregular" where layers disagree (a model in an inconsistent state)."""
        return get_model_status(self)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def _cast_adapter(self, name: str, autocast_adapter_dtype: Optional[bool] = None) -> None:
        """adapter_dtype (lorakit's) casts every adapter weight; else autocast_adapter_dtype=True upcasts the
        fp16/bf16 ones to fp32 (PEFT's rule)."""
        if self.adapter_dtype is None and not autocast_adapter_dtype:
            return
        for _, layer in lora_layers(self.base_model.model) + token_layers(self.base_model.model):
            for p in layer._adapter_parameters(name):
                if self.adapter_dtype is not None:
                    p.data = p.data.to(self.adapter_dtype)
                elif p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()

    # ------------------------------------------------------------------ forward / generate
    def _routing(self, adapter_names: Optional[Sequence[str]]):
        if adapter_names is None:
            return contextlib.nullcontext()
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise AdapterError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. This model has "
                               f"{sorted(self.peft_config)} (and {BASE_ADAPTER!r} for none)")
        return route_rows(adapter_names)

    @_ModelSignature
    def forward(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        """The wrapped model's forward; `adapter_names[i]` picks the adapter of row i (mixed batches)."""
        with self._routing(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        with self._routing(adapter_names):
            return self.base_model.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: Optional[bool] = None) -> None:
        """Add a new, freshly initialised adapter (not activated: call set_adapter). On a task model a config
        without task_type takes the model's, so this adapter trains its own copy of the head too, as in PEFT.
        autocast_adapter_dtype and low_cpu_mem_usage: as in PeftModel()."""
        if peft_config.task_type is None and self.task_type in TASK_HEADS:
            peft_config = peft_config.copy(task_type=self.task_type)
        fp = _fingerprint_before(self.base_model.model, peft_config)
        self.base_model.inject_adapter(peft_config, adapter_name, low_cpu_mem_usage)  # inactive and frozen
        self.fingerprints[adapter_name] = fp
        self.adapter_metadata[adapter_name] = {}
        self._cast_adapter(adapter_name, autocast_adapter_dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)
        self.fingerprints.pop(adapter_name, None)
        self.adapter_metadata.pop(adapter_name, None)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activate these adapters and make them the trainable ones (`inference_mode`: all frozen), as PEFT."""
        self.base_model.set_adapter(adapter_name, inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block the model is the base model, and no adapter parameter requires grad (as PEFT)."""
        self._adapters_disabled += 1
        try:
            with self.base_model.disable_adapter():
                yield
        finally:
            self._adapters_disabled -= 1

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs) -> None:
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, **kwargs)
        self.fingerprints[adapter_name] = self.fingerprints[adapters[0]]
        self.adapter_metadata[adapter_name] = {"combined_from": dict(zip(adapters, map(float, weights))),
                                               "combination_type": combination_type}

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: Union[str, os.PathLike],
                        selected_adapters: Optional[Sequence[str]] = None, is_main_process: bool = True,
                        convert_to_lora: bool = True, save_embedding_layers: Union[bool, str] = "auto",
                        safe_serialization: bool = True,
                        path_initial_model_for_weight_conversion: Optional[Union[str, os.PathLike]] = None,
                        **_ignored) -> None:
        """Write each adapter as a PEFT folder: 'default' at the root, others in sub-folders by name.

        PiSSA/OLoRA/CorDA adapters are converted (convert_to_lora=True) into plain LoRA of rank 2r that applies
        to the original, unmodified base model, so they load anywhere without the residual weights.
        save_embedding_layers: also write the input and output embeddings' own weights, as PEFT does, so an
        adapter trained over an enlarged vocabulary (resize_token_embeddings) brings its new rows; 'auto' (PEFT's
        default) does so when the adapter puts LoRA on an embedding layer.
        safe_serialization=False: adapter_model.bin (PEFT's pickle file) is written too, beside the safetensors file.
        path_initial_model_for_weight_conversion: PEFT's way to ask for that conversion; refused where PEFT refuses
        it (rsLoRA with rank_pattern or alpha_pattern), which lorakit's own conversion handles.
        """
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        if path_initial_model_for_weight_conversion is not None:
            _check_weight_conversion([self.peft_config[n] for n in names if n in self.peft_config])
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"cannot save unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}")
        for name in names:
            config = self.peft_config[name]
            tensors = adapter_state_dict(self.base_model.model, name, config.bias)
            tensors.update(self._embedding_weights(name, save_embedding_layers))
            if convert_to_lora and str(config.init_lora_weights).startswith(RESIDUAL_INITS):
                tensors, config = self._as_plain_lora(name, tensors, config)
            config_dict = {**config.to_dict(), "inference_mode": True}
            config_dict["base_model_name_or_path"] = config.base_model_name_or_path or \
                getattr(getattr(self.base_model.model, "config", None), "_name_or_path", None)
            directory = Path(save_directory) if name == "default" else Path(save_directory) / name
            config_dict, facts = _peft_readable(config_dict, self._trained_copies(name))
            meta = make_meta(self.fingerprints.get(name, {}),
                             {"adapter_name": name, **facts, **self.adapter_metadata.get(name, {})})
            save_adapter(directory, tensors, config_dict, meta, pickle_copy=not safe_serialization)
        write_model_card(save_directory, self)  # README.md, as PEFT writes it (the Hub reads its front matter)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the adapters, as save_pretrained writes them (README.md model card included), to a Hub model
        repository (PEFT's method); offline, a ModelLoadError saying so. See lorakit/hub.py."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def _embedding_weights(self, name: str, save: Union[bool, str]) -> dict[str, torch.Tensor]:
        """{key: weight} of the embeddings under PEFT's keys, chosen by PEFT's rule: the LoRA-wrapped embedding
        layers when the adapter has any, else the input and output embeddings (if `save`, or if 'auto' finds the
        vocabulary resized against the base's local config.json; PEFT would also ask the Hub)."""
        model = self.base_model.model
        layers = [m for m in map(functools.partial(_embedding_layer, model), ("input", "output"))
                  if m is not None and not isinstance(m, ModulesToSave)]  # (trained copies save anyway)
        wrapped = [m for m in layers if name in getattr(m, "r", {})]
        if save == "auto" and wrapped:  # PEFT's words for what 'auto' decided
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
        save = (bool(wrapped) or _vocabulary_resized(model)) if save == "auto" else save
        if save and not hasattr(model, "get_input_embeddings"):
            warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")
        if save and str(self.peft_config[name].init_lora_weights).startswith(RESIDUAL_INITS):
            if save is True:  # (asked for by name: say why it is not done)
                warnings.warn("save_embedding_layers: this PiSSA/OLoRA/CorDA adapter is saved as plain LoRA for the "
                              "original weights, which lorakit no longer holds (it trains on the residual); "
                              "the embedding weights are left out")
            return {}
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        out = {}
        for layer in (wrapped or layers) if save else []:
            base = getattr(layer, "base_layer", layer)
            prefix = names[id(base)] + "."  # (under a LoRA or token-rows wrapper: PEFT's key for its base layer)
            out.update({prefix + p: t for p, t in base.named_parameters(recurse=False)})
            if getattr(layer, "merged_adapters", None):  # the weight as it was before the merges, not W + ΔW
                out[prefix + "weight"] = layer.unmerged_weight().to(base.weight.dtype)
        return out

    def _trained_copies(self, name: str) -> list[str]:
        """Short names of the modules trained in full for adapter `name` (task heads, modules_to_save)."""
        return sorted({full.rsplit(".", 1)[-1] for full, m in self.base_model.model.named_modules()
                       if isinstance(m, ModulesToSave) and name in m.modules_to_save})

    def _as_plain_lora(self, name: str, tensors: dict, config: LoraConfig) -> tuple[dict, LoraConfig]:
        """ΔW = s·B A − s·B0 A0 = s·[B, −B0] [A; A0]: a rank-2r LoRA on the original weights."""
        tensors = dict(tensors)
        for layer_name, layer in lora_layers(self.base_model.model):
            if name not in layer._initial_factors:
                continue
            A0, B0 = layer._initial_factors[name]
            A, B = layer.factor_params(name)
            key_a, key_b = (f"{layer_name}.{attr}" + ("" if layer._factor_store is nn.ParameterDict else ".weight")
                            for attr in layer.factor_names)
            tensors[key_a] = torch.cat([A.detach(), A0], 0)
            tensors[key_b] = torch.cat([B.detach(), -B0], 1)
        grow = math.sqrt(2) if config.use_rslora else 2  # keeps alpha / r (or alpha / sqrt r) unchanged
        return tensors, config.copy(
            r=2 * config.r, lora_alpha=config.lora_alpha * grow, init_lora_weights=True, corda_config=None,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: v * grow for k, v in config.alpha_pattern.items()})

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        autocast_adapter_dtype: Optional[bool] = None, allow_pickle: bool = False,
                        ignore_base_mismatch: bool = False, low_cpu_mem_usage: bool = False,
                        **_ignored) -> "PeftModel":
        """Load a saved adapter (lorakit's or PEFT's) onto a fresh base model. autocast_adapter_dtype: as in
        PeftModel().

        `config`, when given, is "the configuration object to use instead of an automatically loaded
        configuration" (PEFT): the object itself is used as given, as in PEFT, not a copy. It becomes
        `peft_config[adapter_name]`, its `inference_mode` is set to `not is_trainable`, and what the model implies
        (default target_modules, fan_in_fan_out ...) is filled into it, as PEFT does.
        """
        if config is not None and not isinstance(config, LoraConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        given = config
        if given is not None:
            given.inference_mode = not is_trainable  # PEFT sets it on the caller's object
        meta = read_meta(model_id)
        config = _loadable_config(config or _with_task_type(LoraConfig.from_pretrained(model_id), meta), is_trainable)
        tensors = read_adapter_tensors(model_id, allow_pickle)
        _check_base(meta, model, str(model_id), ignore_base_mismatch, tensors)
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                         low_cpu_mem_usage=low_cpu_mem_usage)
        peft_model._finish_load(adapter_name, tensors, config, meta, str(model_id), is_trainable)
        if given is not None:
            peft_model.base_model.peft_config[adapter_name] = _adopt(given, peft_model.peft_config[adapter_name])
        return peft_model

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: Optional[bool] = None,
                     allow_pickle: bool = False, ignore_base_mismatch: bool = False, low_cpu_mem_usage: bool = False,
                     **_ignored) -> nn.modules.module._IncompatibleKeys:
        """Load a saved adapter into this model under `adapter_name` (not activated); an existing adapter of that
        name gets the file's weights, as in PEFT. Returns PEFT's load result: every key is checked (a missing or
        unknown tensor raises AdapterError), so its missing_keys and unexpected_keys are empty."""
        meta = read_meta(model_id)
        config = _loadable_config(_with_task_type(LoraConfig.from_pretrained(model_id), meta), is_trainable)
        tensors = read_adapter_tensors(model_id, allow_pickle)
        _check_base(meta, self.base_model.model, str(model_id), ignore_base_mismatch, tensors)
        existing = adapter_name in self.peft_config
        if not existing:
            self.add_adapter(adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype)
        else:  # as PEFT: the file's weights replace the adapter's, which must compute the same way
            self._check_reload(adapter_name, config, str(model_id))
        self._finish_load(adapter_name, tensors, config, meta, str(model_id),
                          (is_trainable or None) if existing else is_trainable)
        return nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def _check_reload(self, name: str, config: LoraConfig, source: str) -> None:
        if any(name in layer.merged_adapters for _, layer in lora_layers(self.base_model.model)):
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge it before loading new "
                               "weights into it")
        have = self.peft_config[name]
        fields = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
        differ = [f"{f} {getattr(have, f)!r} vs {getattr(config, f)!r}" for f in fields
                  if getattr(have, f) != getattr(config, f)]
        if differ:
            raise AdapterError(f"adapter {source} cannot replace the weights of adapter {name!r}: they differ in "
                               f"{', '.join(differ)}; load it under another name, or delete_adapter({name!r}) first")

    def _finish_load(self, name: str, tensors: dict, config: LoraConfig, meta: dict, source: str,
                     is_trainable: Optional[bool]) -> None:
        """is_trainable None: the adapter existed, and whether it trains is left as it was (as PEFT)."""
        load_into(self.base_model.model, name, tensors, config.bias, source)
        if meta.get("base_fingerprint"):
            self.fingerprints[name] = meta["base_fingerprint"]
        self.adapter_metadata[name] = {k: v for k, v in meta.items()
                                       if k not in ("base_fingerprint", "versions", "format", "created", "adapter_name")}
        if is_trainable is not None:
            self.base_model.set_requires_grad(name, is_trainable)  # active or not, as PEFT
        if is_trainable is False:
            self.eval()


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: Optional[bool] = None, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False, *, adapter_dtype: Optional[torch.dtype] = None) -> PeftModel:
    """Inject LoRA into `model` (in place) and wrap it. Only adapter parameters (and modules_to_save) train.
    PEFT's signature: an unknown keyword argument is a TypeError.

    Args:
        model: any torch model; transformers models get per-architecture default targets.
        peft_config: the LoraConfig (copied, never modified).
        adapter_name: name of this first adapter.
        mixed: True returns a PeftMixedModel, PEFT's model for adapters of several types; lorakit's are all LoRA,
            which any PeftModel mixes, so it is a PeftModel under that name.
        autocast_adapter_dtype: True upcasts fp16/bf16 adapter weights to fp32 (PEFT's default); False, or None
            (lorakit's default), keeps the base weights' dtype.
        revision: recorded in the config as the base model's revision.
        low_cpu_mem_usage: the LoRA factors are made empty on the meta device (for a load to fill), as in PEFT.
        adapter_dtype: lorakit's: one dtype for every adapter weight; wins over autocast_adapter_dtype.

    Returns:
        the PeftModel subclass PEFT returns for the config's task_type (PeftModelForCausalLM, ...), else PeftModel.
    """
    if revision is not None:
        peft_config = peft_config.copy(revision=revision)
    old_name, new_name = peft_config.base_model_name_or_path, model.__dict__.get("name_or_path", None)
    if old_name != new_name:  # (PEFT records the model's own name; lorakit on a copy of the config)
        if old_name is not None:
            warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
                          "Please ensure that the correct base model is loaded when loading this checkpoint.")
        peft_config = peft_config.copy(base_model_name_or_path=new_name)
    from .task_models import model_class_for  # (it subclasses PeftModel: imported here, not at the top)

    return model_class_for(peft_config.task_type, mixed)(model, peft_config, adapter_name, adapter_dtype=adapter_dtype,
                                                         autocast_adapter_dtype=autocast_adapter_dtype,
                                                         low_cpu_mem_usage=low_cpu_mem_usage)


def _fingerprint_before(model: nn.Module, config: LoraConfig) -> dict:
    """The base fingerprint over the modules this config will target, taken before any init touches W.

    Quantized (QLoRA) weights count by shape only: their 4-bit values differ from the base's by the
    rounding, and the adapter must still load on the unquantized base.
    """
    config = resolve_config(model, config)
    names = [] if config.target_parameters and not config.target_modules else \
        find_targets(model, config, required=not config.target_parameters)
    quantized = [n for n in names if _is_quantized(model, n)]
    if not quantized:
        return fingerprint(model, names)
    fp = fingerprint(model, [n for n in names if n not in quantized])
    fp["shapes"] = {n: list(module_weight(model.get_submodule(n)).shape)
                    for n in names}
    fp["quantized_targets"] = len(quantized)
    return fp


def _is_quantized(model: nn.Module, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    return is_quantized_weight(getattr(getattr(module, "base_layer", module), "weight", None))


def _check_weight_conversion(configs: list[LoraConfig]) -> None:
    """PEFT refuses path_initial_model_for_weight_conversion with rsLoRA and rank/alpha patterns (its conversion
    cannot keep each layer's scaling); so does lorakit, saying what works instead."""
    if any(c.use_rslora and (c.rank_pattern or c.alpha_pattern) for c in configs):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`. lorakit "
                         "converts PiSSA/OLoRA/CorDA adapters itself, keeping each layer's scaling: call "
                         "save_pretrained without path_initial_model_for_weight_conversion (convert_to_lora=True, "
                         "the default).")


def _loadable_config(config: LoraConfig, is_trainable: bool) -> LoraConfig:
    """The config to inject a saved adapter with. Saved weights replace the init, but a PiSSA/OLoRA adapter
    saved as such (PEFT's default, or save_pretrained(convert_to_lora=False)) holds factors of the residual
    base: its init runs again, as in PEFT, to turn W into that residual before the factors are loaded. LoftQ too:
    its factors go with the quantized base Q, which the (deterministic) init makes again from W."""
    residual = str(config.init_lora_weights).startswith((*RESIDUAL_INITS, "loftq"))
    return config.copy(init_lora_weights=config.init_lora_weights if residual else True,
                       inference_mode=not is_trainable)


def _adopt(given: LoraConfig, resolved: LoraConfig) -> LoraConfig:
    """The caller's config object, with what injection resolved from the model filled into it (PEFT fills
    target_modules into the object it is given). init_lora_weights stays the caller's: only the load skipped it."""
    for field in dataclasses.fields(LoraConfig):
        if field.name != "init_lora_weights" and getattr(given, field.name) != getattr(resolved, field.name):
            setattr(given, field.name, getattr(resolved, field.name))
    return given


def _embedding_layer(model: nn.Module, side: str) -> Optional[nn.Module]:
    """model.get_input_embeddings() / get_output_embeddings(), or None where it has none (vision models raise)."""
    try:
        return getattr(model, f"get_{side}_embeddings", lambda: None)()
    except (NotImplementedError, AttributeError):
        return None


def _vocabulary_resized(model: nn.Module) -> bool:
    """Whether the model's vocabulary differs from that of the local checkpoint it was loaded from."""
    config = getattr(model, "config", None)
    source = getattr(config, "_name_or_path", "") or ""
    if not source:  # a model built from a config has no source (and the current folder is not it)
        return False
    saved = read_json_object(Path(source) / "config.json")
    saved = saved.get("vocab_size", (saved.get("text_config") or {}).get("vocab_size"))
    current = getattr(config.get_text_config(), "vocab_size", None) if hasattr(config, "get_text_config") else None
    return saved is not None and current is not None and saved != current


def _check_base(meta: dict, model: nn.Module, source: str, ignore: bool, tensors: dict) -> None:
    """Refuse an adapter made for another base. A module whose own weight the file carries (an embedding saved
    with save_embedding_layers) is compared by shape only: its values are about to be replaced."""
    if ignore:
        return
    expected = dict(meta.get("base_fingerprint") or {})
    carried = {n for n in expected.get("shapes", {})
               if f"{PREFIX}{n}.base_layer.weight" in tensors or f"{PREFIX}{n}.weight" in tensors}
    if carried:
        expected["samples"] = {n: v for n, v in expected["samples"].items() if n not in carried}
    quantized = {n for n in expected.get("shapes", {}) if _is_quantized(model, n)}
    problem = None
    if quantized:  # a QLoRA base: its layers are compared by shape, their values are 4-bit roundings
        for name in sorted(quantized):
            shape = list(module_weight(model.get_submodule(name)).shape)
            if shape != expected["shapes"][name]:
                problem = problem or f"{name} has shape {shape}, the adapter expects {expected['shapes'][name]}"
        for key in ("shapes", "samples"):
            expected[key] = {n: v for n, v in (expected.get(key) or {}).items() if n not in quantized}
    problem = problem or fingerprint_mismatch(expected, model)
    if problem:
        raise AdapterError(f"adapter {source} was trained on a different base model: {problem}. Load the base it "
                           "was made for, or pass ignore_base_mismatch=True (CLI: --ignore-base-mismatch) "
                           "if you know they match")


PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _peft_readable(config_dict: dict, trained_copies: list[str]) -> tuple[dict, dict]:
    """(adapter_config.json as PEFT reads it, facts for lorakit.json).

    The modules trained in full (task heads included) are listed in modules_to_save, as PEFT writes them;
    a task type PEFT does not know (IMAGE_CLASSIFICATION ...) is written as null, PEFT would refuse the
    file otherwise, and kept in lorakit.json, from where lorakit restores it.
    """
    config_dict, facts = dict(config_dict), {}
    if trained_copies and not config_dict.get("modules_to_save"):
        config_dict["modules_to_save"] = trained_copies
    task = config_dict.get("task_type")
    if task is not None and str(task) not in PEFT_TASK_TYPES:
        facts["task_type"], config_dict["task_type"] = str(task), None
    return config_dict, facts


def _with_task_type(config: LoraConfig, meta: dict) -> LoraConfig:
    """The config with the task type lorakit.json kept for PEFT's sake (see `_peft_readable`)."""
    return config.copy(task_type=meta["task_type"]) if config.task_type is None and meta.get("task_type") else config

