"""Which modules an adapter targets: PEFT's matching rules and the per-architecture defaults."""
from __future__ import annotations

import difflib
import re
from typing import Optional, Union

from torch import nn

from ..errors import TargetError

# target_modules=None picks these (PEFT's defaults, so an adapter means the same thing in both tools).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "vit": ["query", "value", "q_proj", "v_proj"],  # transformers 5 renamed ViT's projections
}

# Attention + MLP projections: what `lorakit train` targets by default for causal LMs (LoRA paper
# follow-ups and QLoRA found adapting every projection beats attention-only at the same budget).
ATTENTION_MLP_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}
for _family in ("mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
    ATTENTION_MLP_TARGETS[_family] = ATTENTION_MLP_TARGETS["llama"]

LAYER_CONTAINERS = ("layers", "h", "layer", "blocks", "block")


def linear_types() -> tuple[type, ...]:
    """nn.Linear plus transformers' GPT-2 Conv1D when transformers is importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # lorakit's core does not require transformers
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def is_conv1d_gpt2(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and isinstance(module, linear_types())


def supported_types() -> tuple[type, ...]:
    return linear_types() + (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_targets(model: nn.Module) -> list[str]:
    kind = model_type(model)
    if kind not in DEFAULT_TARGETS:
        raise TargetError(f"no default target_modules for model type {kind!r}; pass target_modules "
                          f"(e.g. ['q_proj', 'v_proj'] or 'all-linear'). Known types: {sorted(DEFAULT_TARGETS)}")
    return DEFAULT_TARGETS[kind]


def name_matches(spec: Union[str, list[str], None], name: str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list entry matches the name or a '.suffix' of it."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern) -> Optional[int]:
    """The layer number in a module's name, as PEFT reads it: the first number after `layers_pattern` (each
    pattern a regex), or with no pattern the first numbered segment after another segment ("encoder.block.1."
    -> 1, not T5's "layer.0" inside it). A bare model's names start with the layer container
    ("layers.0.experts.3.w1" -> 0, "block.1.layer.0" -> 1): the number after it."""
    if layers_pattern:
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
            if m:
                return int(m.group(1))
        return None
    m = re.match(rf"({'|'.join(LAYER_CONTAINERS)})\.(\d+)\.", name) or re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(m.group(m.lastindex)) if m else None


def output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def closest_names(model: nn.Module, wanted: list[str], among: str = "wrappable") -> str:
    """Module names like the `wanted` ones (difflib), else the names of the layers LoRA can wrap ('wrappable'),
    or of the modules outside the repeated layers ('modules': where heads and embeddings are)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
    hints = set()
    for w in wanted:
        hints.update(difflib.get_close_matches(w.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.5))
    if hints:
        return ", ".join(sorted(hints))
    if among == "modules":
        outside = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules()
                          if n and not any(part.isdigit() for part in n.split("."))})
        return ", ".join(outside[:20]) + " (the modules outside the repeated layers)"
    wrappable = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, supported_types())})
    return ", ".join(wrappable[:20]) + " (the layers LoRA can wrap)"


def unmatched_targets(model: nn.Module, targets: Union[str, list[str], None]) -> list[str]:
    """The entries of a target_modules list that name no module of `model` (PEFT leaves them unused: a
    config may list several architectures' names). A regex string or None gives []."""
    if not isinstance(targets, list):
        return []
    names = [n for n, _ in model.named_modules() if n]
    return [t for t in targets if not any(name_matches([t], n) for n in names)]
