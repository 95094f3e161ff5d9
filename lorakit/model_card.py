"""README.md, the model card PEFT writes beside a saved adapter: front matter the Hugging Face Hub reads
(`library_name: peft`, `base_model`, tags with `lora`, `pipeline_tag` for a causal LM) and a short card saying what
the adapter is and how to load it. A card already in the folder keeps its text and its other fields; only those keys
and a framework-versions line are added, as PEFT does."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from .atomic import atomic_write

CARD_NAME = "README.md"
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)
VERSIONS_HEADING = "### Framework versions"


def card_fields(model) -> dict[str, Any]:
    """The front-matter fields PEFT derives from a PeftModel: base_model and its adapter tag from the base's
    `_name_or_path`, 'transformers' for a transformers model, 'lora', the base's own model_tags, and
    pipeline_tag 'text-generation' for a causal LM."""
    from .task_models import PeftModelForCausalLM

    base = model.get_base_model()
    config = getattr(base, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    tags = set(getattr(base, "model_tags", None) or []) | {"lora"}
    if type(base).__module__.startswith("transformers.") and config is not None:
        tags.add("transformers")
    if name:
        tags.add(f"base_model:adapter:{name}")
    fields: dict[str, Any] = {"library_name": "peft", "tags": sorted(tags)}
    if name:
        fields["base_model"] = name
    if isinstance(model, PeftModelForCausalLM):
        fields["pipeline_tag"] = "text-generation"
    return fields


def write_model_card(directory: str | os.PathLike, model) -> None:
    """Create or update `directory`/README.md for a PeftModel just saved there (atomically)."""
    from . import __version__

    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / CARD_NAME
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    meta, body = _split(existing) if existing is not None else ({}, _template(model))
    fields = card_fields(model)
    meta["library_name"] = fields["library_name"]
    meta["tags"] = sorted(set(meta.get("tags") or []) | set(fields["tags"]))
    if "base_model" in fields:
        meta["base_model"] = fields["base_model"]
    if "pipeline_tag" in fields and not meta.get("pipeline_tag"):
        meta["pipeline_tag"] = fields["pipeline_tag"]
    line = f"- lorakit {__version__}"
    if line not in body.splitlines():
        lines = body.rstrip("\n").splitlines()
        if VERSIONS_HEADING in lines:
            at = lines.index(VERSIONS_HEADING) + 1
            at += at < len(lines) and not lines[at].strip()  # after the blank line under the heading
            lines.insert(at, line)
        else:
            lines += ["", VERSIONS_HEADING, "", line]
        body = "\n".join(lines) + "\n"
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + body
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _split(text: str) -> tuple[dict[str, Any], str]:
    """(front-matter fields, the text after them) of an existing card; a card without front matter is all text."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    meta = yaml.safe_load(match.group(1)) or {}
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


def _template(model) -> str:
    """The card's text for a folder that has none: what the adapter is, what it adapts, how to load it."""
    config = model.active_peft_config
    base = card_fields(model).get("base_model")
    targets = config.target_modules if isinstance(config.target_modules, str) else \
        ", ".join(f"`{t}`" for t in sorted(config.target_modules or []))
    scaling = f"lora_alpha / sqrt(r) = {config.lora_alpha / config.r ** 0.5:g} (rsLoRA)" if config.use_rslora \
        else f"lora_alpha / r = {config.lora_alpha / config.r:g}"
    extras = [name for name, on in (("DoRA", config.use_dora), ("lora_bias", config.lora_bias)) if on]
    saved = ", ".join(f"`{m}`" for m in sorted(getattr(model, "modules_to_save", None) or [])) or "none"
    adapters = ", ".join(f"`{n}`" + (" (this folder)" if n == "default" else f" (sub-folder `{n}/`)")
                         for n in model.peft_config)
    base_class = type(model.get_base_model()).__name__
    load_base = (f'base = {base_class}.from_pretrained("{base}")' if base else
                 f"base = {base_class}(...)  # the base model this adapter was trained on")
    return f"""
# LoRA adapter{f" for {base}" if base else ""}

A LoRA adapter (Low-Rank Adaptation) made with lorakit and saved in PEFT's format: `adapter_config.json` and
`adapter_model.safetensors` load in PEFT and in lorakit alike, and give the same outputs. The base model's weights
are not in this folder; each adapted layer computes `W x + scaling * B A x` with the frozen base weight `W`.

## Adapter

- Base model: {f"`{base}`" if base else "a custom model (no Hub name recorded)"}
- Rank r = {config.r}, {scaling}{"; " + ", ".join(extras) if extras else ""}
- Adapted modules: {targets or "(by target_parameters)"}
- Trained in full and saved with the adapter: {saved}
- Adapters saved: {adapters}

## How to use

```python
from lorakit import PeftModel   # or: from peft import PeftModel

{load_base}
model = PeftModel.from_pretrained(base, "path/to/this/folder")
merged = model.merge_and_unload()   # optional: a plain model with the update folded into its weights
```

## Training procedure

lorakit keeps the facts of the run in `lorakit.json` beside the adapter: the base model's fingerprint (loading onto
another base is refused unless asked for), and, when trained with `lorakit train`, the training configuration, the
data's fingerprint and the scores before and after training.

## Limitations

The adapter changes only the modules listed above; everything else is the base model's, including its biases and
limitations. Check the held-out scores in `lorakit.json` before relying on it.

{VERSIONS_HEADING}

- PyTorch {torch.__version__}
"""
