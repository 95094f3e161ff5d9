"""PEFT's `ensure_weight_tying`: adapters on a tied input embedding and output head stay tied.

A model that ties its output head (and, in encoder-decoders, its other embeddings) to the input embedding shares
one weight. An adapter that trains one of them alone would untie them. With ensure_weight_tying=True, as in PEFT:
- the input embedding in `modules_to_save` (or a tied module named there): the embedding is trained in full, and
  each tied module's copy *is* the embedding's copy (one parameter);
- the embedding (or a tied module) in `target_modules`: the embedding gets LoRA, and each tied module gets LoRA
  whose factors share storage with the embedding's, transposed (head A = embedding B^T, head B = embedding A^T),
  so the head's update is the transpose of the embedding's.
The config is resolved as PEFT resolves it (and saved so): the embedding added, the tied modules taken out of the
lists, since they are tied by this step instead. PEFT's warnings are kept word for word.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

from torch import nn

from ..config import LoraConfig

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
"""PEFT's names that mark an adapter as touching a tied layer."""


def input_embedding(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(name, module) of the model's input embedding, its LoRA or modules_to_save wrapper if wrapped; or None."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    for name, module in model.named_modules():
        if module is embedding:
            for suffix in (".base_layer", ".original_module"):
                if name.endswith(suffix):  # inside a wrapper: the wrapper
                    name = name[: -len(suffix)]
                    return name, model.get_submodule(name)
            return name, module
    return None


def tied_module_names(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is the input embedding's (PEFT: the modules tied to it), none when the
    model's config says tie_word_embeddings=False."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    found = input_embedding(model)
    if found is None:
        return []
    emb_name, embedding = found
    weight = getattr(embedding, "weight", None)
    names = set()
    for name, module in model.named_modules():
        for suffix in (".base_layer", ".original_module"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        if name and name != emb_name and not _inside_wrapper(name) and getattr(module, "weight", None) is weight:
            names.add(name)
    return sorted(names)


def _inside_wrapper(name: str) -> bool:
    return any(part in name for part in (".modules_to_save.", ".lora_", ".base_layer.", ".original_module."))


def _names_embedding(spec, *, regex: bool) -> bool:
    if regex:
        return any(re.fullmatch(spec, n) for n in EMBEDDING_LAYER_NAMES)
    return any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in spec or [])


def _without_tied(names: list[str], tied: list[str]) -> list[str]:
    """PEFT's rule: for each tied module, the first entry that names it is removed."""
    names = list(names)
    for key in tied:
        for m in names:
            if re.match(rf"(^|.*\.){m}($|\..*)", key):
                names.remove(m)
                break
    return names


def resolve_weight_tying(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """The config with PEFT's resolution applied (config is a private copy: changed in place), and PEFT's warnings."""
    tied = tied_module_names(model)
    saved = config.modules_to_save or []
    targets = config.target_modules
    regex = isinstance(targets, str)
    in_saved, in_targets = _names_embedding(saved, regex=False), _names_embedding(targets, regex=regex)
    if not config.ensure_weight_tying:
        if tied and (in_saved or in_targets):
            warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                          "`ensure_weight_tying` is not set to True. This can lead to complications, for example "
                          "when merging the adapter or converting your model to formats other than safetensors. "
                          "Check the discussion here: https://github.com/huggingface/peft/issues/2777")
        return config
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model")
        return config
    emb_name = input_embedding(model)[0]
    if in_saved:
        config.modules_to_save = _without_tied(saved + ([emb_name] if emb_name not in saved else []), tied)
    elif in_targets:
        if regex:
            config.target_modules = rf"(?:{targets}|^{re.escape(emb_name)}$)"
        else:
            config.target_modules = sorted(_without_tied(sorted(set(targets) | {emb_name}), tied))
    else:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`")
    return config


def modules_to_tie(model: nn.Module, config: LoraConfig, adapter_name: str) -> tuple[Optional[str], list[str]]:
    """("saved" | "lora" | None, the tied module names) for this adapter: what `tie_adapters` will do, known before
    the targets are wrapped (the tied modules are left out of them)."""
    if not config.ensure_weight_tying:
        return None, []
    tied, found = tied_module_names(model), input_embedding(model)
    if not tied or found is None:
        return None, []
    from .targets import name_matches

    if name_matches(list(config.modules_to_save or []), found[0]):
        return "saved", tied
    if name_matches(config.target_modules, found[0]):
        return "lora", tied
    return None, []


def tie_adapters(model: nn.Module, mode: Optional[str], tied: list[str], adapter_name: str) -> None:
    """Give each tied module the embedding's adapter, sharing its tensors (see the module docstring)."""
    from .inject import ModulesToSave, _set_submodule, _wrap
    from .layer import LoraLayer

    if mode is None:
        return
    _, source = input_embedding(model)
    for name in tied:
        module = model.get_submodule(name)
        if mode == "saved":
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, adapter_name)
                _set_submodule(model, name, module)
            elif adapter_name not in module.modules_to_save:
                module.add_adapter(adapter_name)
            module.modules_to_save[adapter_name].weight = source.modules_to_save[adapter_name].weight
            continue
        if not isinstance(module, LoraLayer):
            module = _wrap(module, False)
            _set_submodule(model, name, module)
        _share_factors(source, module, adapter_name)


def _share_factors(source, layer, adapter_name: str) -> None:
    """The tied layer's A and B as the embedding's (an embedding: the same parameters; a head: transposed views)."""
    emb_A, emb_B = source.lora_embedding_A[adapter_name], source.lora_embedding_B[adapter_name]  # (r, V), (d, r)
    r, alpha = source.r[adapter_name], source.lora_alpha[adapter_name]
    layer.add_adapter(adapter_name, r=r, lora_alpha=alpha, init_lora_weights=False)
    layer.scaling[adapter_name] = source.scaling[adapter_name]
    layer.lora_dropout[adapter_name] = source.lora_dropout[adapter_name]
    if layer.factor_names[0] == "lora_embedding_A":
        layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name] = emb_A, emb_B
    else:  # head (V, d): A (r, d) = B_emb^T, B (V, r) = A_emb^T, sharing storage (PEFT's tied_adapter)
        layer.lora_A[adapter_name].weight = nn.Parameter(emb_B.t())
        layer.lora_B[adapter_name].weight = nn.Parameter(emb_A.t())
