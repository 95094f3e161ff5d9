"""Adapter folders on disk, in PEFT's format key for key, plus lorakit's own facts.

    adapter_config.json         LoraConfig as JSON (PEFT reads it)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in), ...lora_B.weight (out, r), ...
    lorakit.json                base fingerprint, versions, creation time, training facts (PEFT ignores it)
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write, atomic_write_json
from ..errors import AdapterError, PeftWarning
from .inject import adapter_modules, lora_layers
from .layer import module_weight
from .tokens import is_tied_follower

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
CONFIG_NAME = "adapter_config.json"
META_NAME = "lorakit.json"
SAMPLES = 16  # values sampled per fingerprinted weight


# ---------------------------------------------------------------------- state dicts
def adapter_state_dict(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    """{PEFT key: tensor} for one adapter of a model holding LoRA layers (keys relative to `model`)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in adapter_modules(model):
        for key, value in module.adapter_state_dict(adapter_name).items():
            out[f"{name}.{key}"] = value
    if bias != "none":
        lora_names = {n for n, _ in lora_layers(model)}
        for name, p in model.named_parameters():
            if not name.endswith("bias") or ".original_module." in name or ".modules_to_save." in name:
                continue
            owner = name.rsplit(".", 1)[0].removesuffix(".base_layer")
            if bias == "all" or owner in lora_names:
                out[name] = p
    return out


def warn_unsharded(tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """PeftWarning (PEFT's text) when a lora_A / lora_B weight is 1-D or empty: DeepSpeed ZeRO-3 / FSDP shards saved
    without gathering them first. The file is still written, as PEFT does (a caller may skip gathering on purpose).
    lora_B's bias (lora_bias) is 1-D by design and not checked (PEFT 0.21.2 checks it too, and warns wrongly)."""
    bad = [(k, tuple(v.shape)) for k, v in tensors.items() if (".lora_A" in k or ".lora_B" in k)
           and not k.endswith(".bias") and isinstance(v, torch.Tensor) and (v.dim() < 2 or 0 in v.shape)]
    if not bad:
        return
    preview = ", ".join(f"{k}:{shape}" for k, shape in bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
    warnings.warn(f"Adapter {adapter_name!r}: {len(bad)} LoRA tensor(s) have invalid shape: {preview}. A 1-D or "
                  "zero-sized lora_A / lora_B tensor indicates that DeepSpeed ZeRO-3 / FSDP shards were not gathered "
                  "before save_pretrained() and are therefore incomplete. Wrap the save in "
                  "deepspeed.zero.GatheredParameters([...], modifier_rank=None) for ZeRO-3, or "
                  "torch.distributed.fsdp.FullyShardedDataParallel.summon_full_params(model) for FSDP, before "
                  "calling save_pretrained().", PeftWarning, stacklevel=3)


def save_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config_dict: dict[str, Any],
                 meta: dict[str, Any], pickle_copy: bool = False) -> None:
    """Write the three files atomically; tensors are cloned contiguous so views and tied storage save.
    pickle_copy (save_pretrained(safe_serialization=False)): also adapter_model.bin, the pickle file PEFT writes
    then, for tools that read only that; the safetensors file stays beside it, and it is what loaders read first."""
    warn_unsharded(tensors, meta.get("adapter_name", "default"))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(payload, tmp, metadata={"format": "pt"}))
    if pickle_copy:
        atomic_write(directory / PICKLE_NAMES[0], lambda tmp: torch.save(payload, tmp))
    atomic_write_json(directory / CONFIG_NAME, config_dict)
    atomic_write_json(directory / META_NAME, meta)


def read_adapter_tensors(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for torn files
            raise AdapterError(f"{path}: cannot read safetensors file ({e}); the file is damaged or incomplete") from None
    for name in PICKLE_NAMES:
        if (directory / name).is_file():
            if not allow_pickle:
                raise AdapterError(f"{directory / name} is a pickle file, which can run code when loaded; lorakit "
                                   "reads only safetensors by default. If you trust its source, pass "
                                   "allow_pickle=True (CLI: --allow-pickle), or convert it to safetensors")
            return torch.load(directory / name, map_location="cpu", weights_only=True)
    raise AdapterError(f"no {WEIGHTS_NAME} in {directory}: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file's object, or {} when the file is missing, unreadable, not JSON or not an object (for facts
    that are only consulted, such as a base model's config.json)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None


def load_into(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], bias: str, source: str) -> None:
    """Copy saved tensors into the model's adapter `adapter_name`, every key and shape checked before anything is
    copied (so a refused file leaves an existing adapter as it was)."""
    expected = adapter_state_dict(model, adapter_name, bias)
    base_params = dict(model.named_parameters(remove_duplicate=False))  # a tied head under its own name too
    missing = [k for k in expected if PREFIX + k not in tensors]
    unexpected, wrong_shape, copies = [], [], []
    followers = {n for n, m in adapter_modules(model) if is_tied_follower(m)}
    for key, value in tensors.items():
        rel = key.removeprefix(PREFIX)
        target = expected.get(rel)
        if target is None and rel.removesuffix(".token_adapter.trainable_tokens_delta") in followers:
            continue  # PEFT saves a tied head's rows too (a resized vocabulary): they are the input embedding's
        if target is None and rel in base_params:  # PEFT saves full embeddings when it resized them
            target = base_params[rel]
        if target is None and ".modules_to_save." in rel:  # PEFT's bias="all" also saves a head copy's
            target = expected.get(rel.replace(".modules_to_save.", ".", 1))  # bias under this name
        if (target is not None and rel.endswith("lora_magnitude_vector") and target.shape != value.shape
                and target.numel() == value.numel()):  # a conv DoRA magnitude as earlier lorakit saved it, flat
            value = value.reshape(target.shape)
        if target is None:
            unexpected.append(key)
        elif tuple(target.shape) != tuple(value.shape):
            wrong_shape.append(f"{key}: adapter {tuple(value.shape)} vs model {tuple(target.shape)}")
        else:
            copies.append((target, value))
    problems = []
    if wrong_shape:
        problems.append("shapes differ (the adapter was trained on a different base model?):\n    "
                        + "\n    ".join(wrong_shape[:8]))
    if missing:
        problems.append(f"{len(missing)} tensors missing from the file, e.g. {PREFIX + missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors name modules this model does not have, e.g. {unexpected[0]}")
    if problems:
        raise AdapterError(f"adapter {source} does not fit this model:\n  " + "\n  ".join(problems))
    owners = _meta_owners(model) if any(t.is_meta for t, _ in copies) else {}
    with torch.no_grad():  # through the parameter: its version moves (layers key cached casts on it)
        for target, value in copies:
            if target.is_meta:  # made empty (low_cpu_mem_usage): the loaded tensor becomes the parameter
                module, attr, device = owners[id(target)]
                module._parameters[attr] = nn.Parameter(value.to(device=device, dtype=target.dtype),
                                                        requires_grad=target.requires_grad)
            else:
                target.copy_(value.to(target.dtype))


def _meta_owners(model: nn.Module) -> dict[int, tuple[nn.Module, str, torch.device]]:
    """{id(parameter): (module holding it, its attribute, the device its LoRA layer's base weight is on)} for every
    parameter still on the meta device."""
    owners = {}
    for _, layer in adapter_modules(model):
        device = next((t.device for t in layer.parameters() if not t.is_meta), torch.device("cpu"))
        for module in layer.modules():
            for attr, p in module._parameters.items():
                if p is not None and p.is_meta:
                    owners[id(p)] = (module, attr, device)
    return owners


# ---------------------------------------------------------------------- fingerprint
def fingerprint(model: nn.Module, target_names: list[str]) -> dict[str, Any]:
    """What identifies a base model: architecture, shapes of the targeted weights, and a few sampled values.

    Values are sampled (not hashed) so the same model in fp32, bf16 or fp16 still matches.
    """
    config = getattr(model, "config", None)
    shapes, samples = {}, {}
    for name in target_names:
        weight = module_weight(model.get_submodule(name))
        if weight is not None:  # (None: a module LoRA will refuse, e.g. attention with separate q/k/v weights)
            shapes[name] = list(weight.shape)
    target_names = list(shapes)
    picks = sorted(set(target_names[i] for i in (0, len(target_names) // 2, -1))) if target_names else []
    for name in picks:
        module = model.get_submodule(name)
        samples[name] = [round(float(v), 6) for v in _sampled(module, SAMPLES)]
    digest = hashlib.sha256(json.dumps([shapes, {k: [round(v, 2) for v in s] for k, s in samples.items()}],
                                       sort_keys=True).encode()).hexdigest()[:16]
    return {"architecture": getattr(config, "model_type", None) or type(model).__name__,
            "model_class": type(model).__name__, "shapes": shapes, "samples": samples, "digest": digest}


def fingerprint_mismatch(expected: dict[str, Any], actual_model: nn.Module) -> Optional[str]:
    """None when the model fits the saved fingerprint, else a sentence saying what differs."""
    if not expected:
        return None
    names = [n for n in expected.get("shapes", {}) if _has_module(actual_model, n)]
    absent = [n for n in expected.get("shapes", {}) if n not in names]
    if absent:
        return f"the base model has no module {absent[0]} (and {len(absent) - 1} more)"
    actual = fingerprint(actual_model, names)
    if expected.get("architecture") and expected["architecture"] != actual["architecture"]:
        return f"architecture is {actual['architecture']!r}, the adapter was made for {expected['architecture']!r}"
    for name, shape in expected["shapes"].items():
        if actual["shapes"][name] != shape:
            return f"{name} has shape {actual['shapes'][name]}, the adapter expects {shape}"
    for name, values in expected.get("samples", {}).items():
        if not torch.allclose(_sampled(actual_model.get_submodule(name), len(values)), torch.tensor(values),
                              rtol=2e-2, atol=2e-3):
            return f"the weights of {name} differ from those the adapter was trained on (another checkpoint?)"
    return None


def _sampled(module: nn.Module, count: int) -> torch.Tensor:
    """`count` evenly spaced values of the module's base weight (as it was before any merge), as fp32 on the CPU."""
    merged = getattr(module, "merged_adapters", None)
    w = (module.unmerged_weight() if merged else module_weight(module).detach()).reshape(-1)
    idx = torch.linspace(0, w.numel() - 1, count, dtype=torch.float64).long()  # float64: exact past 2^24 elements
    return w[idx.to(w.device)].float().cpu()


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def make_meta(fingerprint_: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    import safetensors

    from .. import __version__

    versions = {"lorakit": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return {"format": 1, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, "base_fingerprint": fingerprint_, **extra}
