"""Which modules an adapter targets: PEFT's matching rules and the per-architecture defaults."""
from __future__ import annotations

import difflib
import re
import warnings
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
for _family in ("mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2"):
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
    return linear_types() + (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_targets(model: nn.Module) -> list[str]:
    kind = model_type(model)
    if kind not in DEFAULT_TARGETS:
        raise TargetError(f"Please specify `target_modules` in `peft_config`: no default target_modules for model "
                          f"type {kind!r}; pass target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear'). Known "
                          f"types: {sorted(DEFAULT_TARGETS)}")
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


# ---------------------------------------------------------------------- mixture-of-experts targets
# PEFT 0.21 rewrites the targets of these transformers-5 MoE families (peft.utils.transformers_weight_conversion),
# whatever the adapter says, because their v4 nn.Linear experts and router became fused parameters: each old
# module name turns into a target parameter, and a fused pair (w1 + w3 -> gate_up_proj) gets rank and alpha
# times two. lorakit does the same on creation and saves the result, which PEFT's rewrite then leaves unchanged.
PEFT_MOE_RENAMES: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
PEFT_MOE_FUSED: dict[str, dict[str, list[str]]] = {
    "mixtral": {"gate_up_proj": ["w1", "w3"]},
    "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]},
}


def peft_moe_family(model: nn.Module) -> Optional[str]:
    """'mixtral' or 'qwen2_moe' when PEFT rewrites this model's targets (transformers' own table of model types
    whose checkpoints it converts, as PEFT reads it), else None."""
    return peft_moe_family_of(model_type(model))


def peft_moe_family_of(kind: Optional[str]) -> Optional[str]:
    """peft_moe_family for a model_type string."""
    if kind is None:
        return None
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4, or none: no rewrite
        return None
    family = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}.get(kind)
    if family not in PEFT_MOE_RENAMES or get_checkpoint_conversion_mapping(kind) is None:
        return None
    return family


def expert_parameters(model: nn.Module) -> list[str]:
    """Leaf names of the fused expert weights (3-D parameters, e.g. ['gate_up_proj', 'down_proj']), in the
    order their modules register them."""
    experts = num_experts(model)
    names: list[str] = []
    if experts is None:  # no mixture of experts: a 3-D parameter is something else (ViT's cls_token ...)
        return names
    for _, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.shape[0] == experts and pname not in names:
                names.append(pname)
    return names


def num_experts(model: nn.Module) -> Optional[int]:
    """The number of experts per layer the model's config declares (Mixtral, gpt-oss: num_local_experts;
    Qwen-MoE: num_experts), else None."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for key in ("num_local_experts", "num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers but the output head: what 'all-linear' adapts as modules."""
    heads = output_head_names(model)
    return [n for n, m in model.named_modules()
            if n and n not in heads and isinstance(getattr(m, "base_layer", m), linear_types())
            and not any(part in ("lora_A", "lora_B", "base_layer") for part in n.split("."))]


def resolve_moe_targets(model: nn.Module, target_modules, target_parameters: Optional[list[str]],
                        r: int, lora_alpha: float) -> Optional[tuple[list[str], list[str], dict, dict]]:
    """On a mixture-of-experts model, (target_modules, target_parameters, rank_pattern and alpha_pattern
    additions) as PEFT 0.21 resolves them, else None (the targets stay as given).

    'all-linear' adapts every linear layer but the output head, and the experts: on the families PEFT rewrites
    (Mixtral, Qwen2/3-MoE ...) exactly what PEFT's rewrite gives (router 'gate.weight' included, gate_up_proj at
    rank 2r); on other models with fused 3-D experts (gpt-oss ...), whose experts PEFT's 'all-linear' leaves out,
    the linear layers by full name plus every 3-D expert parameter, so PEFT loading the saved names adapts the
    same ones. A list or regex is rewritten on the PEFT families only, as PEFT does.
    """
    family = peft_moe_family(model)
    params = list(target_parameters or [])
    if family is None:
        experts = expert_parameters(model)
        if target_modules != "all-linear" or not experts:
            return None
        return sorted(linear_module_names(model)), params + [p for p in experts if p not in params], {}, {}
    renames = PEFT_MOE_RENAMES[family]
    if target_modules == "all-linear":
        modules = {n.rsplit(".", 1)[-1] for n in linear_module_names(model)} | set(renames)
    elif isinstance(target_modules, str):
        modules = _regex_leaf_names(model, target_modules, renames)
    else:
        modules = set(target_modules or [])
    kept, fused_seen = set(), {}
    for target in modules:
        old = next((o for o in renames if target == o or target.endswith("." + o)), None)
        if old is None:
            kept.add(target)
            continue
        if renames[old] not in params:
            params.append(renames[old])
        fused_seen.setdefault(renames[old], set()).add(old)
    rank_add, alpha_add = {}, {}
    for fused, parts in PEFT_MOE_FUSED[family].items():
        seen = fused_seen.get(fused, set())
        if 0 < len(seen) < len(parts):
            raise TargetError(f"target_modules names {sorted(seen)} but not {sorted(set(parts) - seen)}: on "
                              f"{model_type(model)} these are fused into one parameter, {fused}; name all of them")
        if len(seen) == len(parts) > 1:
            rank_add[rf".*\.{re.escape(fused)}"] = r * len(parts)
            alpha_add[rf".*\.{re.escape(fused)}"] = lora_alpha * len(parts)
    return sorted(kept), sorted(params), rank_add, alpha_add


def _regex_leaf_names(model: nn.Module, pattern: str, renames: dict[str, str]) -> set[str]:
    """PEFT's reading of a regex on these families: the leaf names of the module and parameter names it matches,
    plus each old expert name whose would-be module name (beside the fused parameter) it matches."""
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    matched = {n.rsplit(".", 1)[-1] for n in names if n and re.fullmatch(pattern, n)}
    containers: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in renames.items():
        if old not in matched and any(re.fullmatch(pattern, f"{c}.{old}") for c in containers.get(new, ())):
            matched.add(old)
    return matched


def warn_unmatched_patterns(config, adapted_names: list[str]) -> None:
    """RuntimeWarning (PEFT's text) naming the rank_pattern / alpha_pattern keys that matched none of the adapted
    modules (or parameters) and so changed nothing: usually a typo."""
    from ..config import _match_pattern

    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None) or {}
        sentinel = object()
        matched = {k for k in patterns for name in adapted_names
                   if _match_pattern({k: True}, name, sentinel) is not sentinel}
        unmatched = sorted(set(patterns) - matched)
        if unmatched:
            warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: "
                          f"{unmatched}.", RuntimeWarning, stacklevel=5)
