"""`lorakit inspect MODEL`: what a model is made of, and what LoRA on it would cost."""
from __future__ import annotations

import json
from collections import OrderedDict

from torch import nn


def module_table(model: nn.Module) -> list[dict]:
    """One row per distinct leaf name (e.g. q_proj): type, count, weight shape, parameters."""
    rows: "OrderedDict[str, dict]" = OrderedDict()
    for name, module in model.named_modules():
        if list(module.children()) or not list(module.parameters(recurse=False)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        weight = getattr(module, "weight", None)
        row = rows.setdefault(leaf, {"name": leaf, "type": type(module).__name__, "count": 0,
                                     "shape": list(weight.shape) if weight is not None else None, "params": 0})
        row["count"] += 1
        row["params"] += sum(p.numel() for p in module.parameters(recurse=False))
    return list(rows.values())


def expert_table(model: nn.Module, ranks: list[int]) -> list[dict]:
    """One row per fused expert weight (a 3-D parameter, e.g. experts.gate_up_proj): count, shape (E, ., .),
    parameters, and the LoRA parameters of rank r on all of them (r · E · (in + out) each)."""
    from ..lora.parameters import parameter_lora_size

    rows: "OrderedDict[str, dict]" = OrderedDict()
    for name, p in model.named_parameters():
        if p.dim() == 3:
            key = ".".join(name.split(".")[-2:])
            row = rows.setdefault(key, {"name": key, "count": 0, "shape": list(p.shape), "params": 0,
                                        "lora_params": {r: 0 for r in ranks}})
            row["count"] += 1
            row["params"] += p.numel()
            for r in ranks:
                row["lora_params"][r] += parameter_lora_size(p.shape, r)
    return list(rows.values())


def lora_param_count(model: nn.Module, targets, r: int) -> int:
    """Trainable parameters of rank-r LoRA on `targets`: r * (in + out) per adapted layer."""
    from ..config import LoraConfig
    from ..lora.inject import find_targets
    from ..lora.model import resolve_config

    from ..lora.parameters import target_parameters_size

    config = resolve_config(model, LoraConfig(r=r, target_modules=targets))
    total = target_parameters_size(model, config)  # MoE experts (and routers) as parameters
    for name in ([] if config.target_parameters and not config.target_modules else find_targets(model, config)):
        w = model.get_submodule(name).weight
        if isinstance(model.get_submodule(name), nn.Conv2d | nn.Conv1d):
            total += r * (w[0].numel() + w.shape[0])
        else:
            total += r * (w.shape[0] + w.shape[1])
    return total


def run_inspect(model_name: str, ranks: list[int], as_json: bool) -> dict:
    from ..lora.targets import ATTENTION_MLP_TARGETS, DEFAULT_TARGETS, expert_parameters, model_type
    from ..models import load_model

    model = load_model(model_name, task=None).model
    kind = model_type(model)
    total = sum(p.numel() for p in model.parameters())
    train_default = "all-linear" if expert_parameters(model) else ATTENTION_MLP_TARGETS.get(kind)
    choices = {"peft default": DEFAULT_TARGETS.get(kind), "attention+mlp (lorakit train)": train_default,
               "all-linear": "all-linear"}
    counts = {label: {r: lora_param_count(model, t, r) for r in ranks} for label, t in choices.items() if t}
    facts = {"model": model_name, "class": type(model).__name__, "model_type": kind, "total_params": total,
             "modules": module_table(model), "expert_parameters": expert_table(model, ranks),
             "default_targets": choices, "lora_params": counts}
    if as_json:
        print(json.dumps(facts, indent=2))
        return facts
    print(f"{model_name}: {type(model).__name__} ({kind}), {total:,} parameters\n")
    name_w = max([len("module")] + [len(row["name"]) for row in facts["modules"]]) + 2
    type_w = max([len("type")] + [len(row["type"]) for row in facts["modules"]]) + 2
    print(f"{'module':<{name_w}}{'type':<{type_w}}{'count':>6}  {'weight shape':<16}{'params':>14}")
    for row in facts["modules"]:
        print(f"{row['name']:<{name_w}}{row['type']:<{type_w}}{row['count']:>6}  {str(row['shape']):<16}"
              f"{row['params']:>14,}")
    if facts["expert_parameters"]:
        print("\nexpert parameters (LoRA through target_parameters: one update per expert):")
        for row in facts["expert_parameters"]:
            sizes = ", ".join(f"r={r}: {n:,}" for r, n in row["lora_params"].items())
            print(f"  {row['name']:<24}x{row['count']:<4}{str(row['shape']):<16}{row['params']:>12,}  LoRA {sizes}")
    print("\ndefault LoRA targets:")
    for label, t in choices.items():
        print(f"  {label:<32}{t}")
    print("\ntrainable LoRA parameters (and % of the model) by rank:")
    print(f"  {'targets':<32}" + "".join(f"{'r=' + str(r):>22}" for r in ranks))
    for label, by_rank in counts.items():
        print(f"  {label:<32}" + "".join(f"{n:>14,} {100 * n / total:6.2f}%" for n in by_rank.values()))
    return facts
