"""Will an adapter load where it is deployed? What an engine refuses, and a plain-LoRA rewrite it accepts.

Engines load plain LoRA (A, B, one alpha) on known projection layers, up to a rank limit. What they refuse:

    vLLM        DoRA (vllm #10849), modules_to_save and LoRA on lm_head / embed_tokens (vllm #9280, #32599),
                ranks above --max-lora-rank (default 16; the server accepts 8 ... 512 when started with a
                larger one), trained biases, target names the model's LoRA layers do not know
    llama.cpp   DoRA, modules_to_save, trained biases, layers with no llama.cpp tensor, a LoRA on the head of
                a model whose head shares the embedding

The rewrite turns each fixable layer into plain LoRA of rank k by truncated SVD of the exact weight difference
it makes (W' - W: for DoRA that includes the magnitude's rescaling of W, which is not low-rank), so
W + B_k A_k is the best rank-k approximation of W'; the relative Frobenius error ||ΔW - B_k A_k|| / ||ΔW|| is
reported per layer, and the change in logits on a few demo prompts for the whole model. What cannot be fixed
(a full trained head copy, an unknown target) is dropped from the rewrite and reported as dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from .adapter_delta import AdaptedLayer, adapted_layers, base_model_of, exact_delta, saved_modules

PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


@dataclass(frozen=True)
class Engine:
    """What one serving engine accepts."""

    name: str
    default_max_rank: int | None
    """The rank limit when the user sets none (None: no limit)."""
    rank_note: str
    head_and_embedding: bool
    """Whether LoRA on lm_head / embed_tokens loads."""


ENGINES = {
    "vllm": Engine("vllm", 16, "vLLM refuses ranks above --max-lora-rank, 16 unless the server is started with "
                   "--max-lora-rank 32 ... 512", head_and_embedding=False),
    "llama.cpp": Engine("llama.cpp", None, "llama.cpp has no rank limit", head_and_embedding=True),
}


@dataclass
class Finding:
    """One thing the engine would refuse, and what the rewrite does about it."""

    where: str
    problem: str
    action: str
    """"rewritten (SVD)", "dropped" or "kept"."""


@dataclass
class PortabilityReport:
    engine: str
    max_rank: int | None
    rank: int
    findings: list[Finding] = field(default_factory=list)
    layer_errors: dict[str, float] = field(default_factory=dict)
    """Relative Frobenius error ||ΔW - B_k A_k|| / ||ΔW|| per rewritten layer."""


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _layer_problem(item: AdaptedLayer, engine: Engine, max_rank: int | None, tied: bool) -> tuple[str, bool] | None:
    """(problem, fixable by SVD) for one adapted layer, or None when the engine takes it as it is."""
    leaf = _leaf(item.module)
    if item.kind == "conv":
        return f"LoRA on a convolution ({item.module})", False
    if leaf in ("lm_head", "embed_tokens") or item.kind == "embedding":
        if not engine.head_and_embedding or tied:  # llama.cpp applies a tied embedding's LoRA to the head too
            return f"LoRA on {leaf}: {engine.name} does not load it", False
    elif engine.name == "vllm" and leaf not in PROJECTIONS:
        return f"target {leaf!r} is not one of vLLM's LoRA layers ({', '.join(sorted(PROJECTIONS))})", False
    if item.variant == "dora":
        return "DoRA magnitude vector (the engine serves plain LoRA only)", True
    if max_rank is not None and item.rank > max_rank:
        return f"rank {item.rank} above the engine's limit {max_rank}", True
    return None


def check(model: nn.Module, engine_name: str, max_rank: int | None = None, rank: int | None = None,
          adapter: str = "default") -> tuple[PortabilityReport, list[AdaptedLayer]]:
    """What `engine_name` refuses in `adapter`, and the layers the rewrite keeps."""
    engine = ENGINES[engine_name]
    limit = max_rank if max_rank is not None else engine.default_max_rank
    config = base_model_of(model).config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layers = adapted_layers(model, adapter)
    if not layers:
        raise ExportError(f"the adapter {adapter!r} adapts no layer; there is nothing to export")
    chosen = rank or max(item.rank for item in layers)
    if limit is not None:
        chosen = min(chosen, limit)
    report = PortabilityReport(engine_name, limit, chosen)
    kept = []
    names = _llama_cpp_names(config, layers) if engine_name == "llama.cpp" else {}
    for item in layers:
        found = _layer_problem(item, engine, limit, tied)
        if found is None and engine_name == "llama.cpp" and item.module not in names:
            found = (f"llama.cpp has no tensor for {item.module}", False)
        if found is None:
            kept.append(item)
            continue
        problem, fixable = found
        report.findings.append(Finding(item.module, problem, "rewritten (SVD)" if fixable else "dropped"))
        if fixable:
            kept.append(item)
    for name, _ in saved_modules(model, adapter):
        report.findings.append(Finding(name, "modules_to_save: a full trained copy of the module, which "
                                             f"{engine_name} does not load", "dropped"))
    config = getattr(model, "peft_config", {}).get(adapter)
    bias = getattr(config, "bias", "none")
    if bias != "none":
        report.findings.append(Finding("biases", f"trained biases (bias={bias!r})", "dropped"))
    if getattr(config, "lora_bias", False):
        report.findings.append(Finding("biases", "lora_bias=True (a bias on lora_B)", "dropped"))
    return report, kept


def _llama_cpp_names(config, layers: list[AdaptedLayer]) -> set[str]:
    from .gguf_names import gguf_arch, gguf_tensor_name

    arch, known = gguf_arch(config), set()
    for item in layers:
        try:
            gguf_tensor_name(arch, config.num_hidden_layers, item.module)
            known.add(item.module)
        except ExportError:
            pass
    return known


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (k, in), B (out, k), relative Frobenius error) of the best rank-k approximation B @ A of `delta`."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out, m), (m,), (m, in)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B = U[:, :k] * root  # (out, k)
    A = root[:, None] * Vh[:k]  # (k, in)
    norm = delta.double().norm()
    error = float((delta.double() - B @ A).norm() / norm) if norm > 0 else 0.0
    return A.float(), B.float(), error


def rewrite(model: nn.Module, report: PortabilityReport, kept: list[AdaptedLayer],
            adapter: str = "default") -> dict[str, torch.Tensor]:
    """{PEFT key relative to the model: tensor} of the plain-LoRA rewrite at rank report.rank, scaling 1
    (lora_alpha = r); fills report.layer_errors."""
    tensors = {}
    for item in kept:
        A, B, error = svd_factors(exact_delta(item, adapter), report.rank)
        if A.shape[0] < report.rank:  # a tiny layer: pad with zero directions so every layer has rank r
            A = torch.cat([A, A.new_zeros(report.rank - A.shape[0], A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], report.rank - B.shape[1])], dim=1)
        report.layer_errors[item.module] = error
        if item.kind == "embedding":  # canonical ΔW is (dim, vocab): A (r, vocab), B (dim, r) as PEFT holds them
            tensors[f"{item.module}.lora_embedding_A"] = A
            tensors[f"{item.module}.lora_embedding_B"] = B
        else:
            tensors[f"{item.module}.lora_A.weight"] = A
            tensors[f"{item.module}.lora_B.weight"] = B
    return tensors


def rewritten_config(original: dict, report: PortabilityReport, kept: list[AdaptedLayer]) -> dict:
    """The adapter_config.json of the rewrite: plain LoRA, one rank, alpha = rank (scaling 1), exact targets."""
    config = dict(original)
    config.update(r=report.rank, lora_alpha=report.rank, use_dora=False, use_rslora=False, rank_pattern={},
                  alpha_pattern={}, modules_to_save=None, bias="none", init_lora_weights=True,
                  target_modules=sorted({_leaf(item.module) for item in kept}), layers_to_transform=None,
                  layers_pattern=None)
    return config


@torch.no_grad()
def logits_change(model: nn.Module, tokenizer, prompts: list[str], other: str = "rewritten") -> dict:
    """How the logits of adapter `other` differ from the original ("default") on `prompts`: relative L2 of the
    last position's logits (mean and max), the share of positions whose argmax agrees, and the share of prompts
    whose greedy answers (24 tokens) are identical."""
    from ..evaluate.generation import generate_texts

    rel, agree, total = [], 0, 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        model.set_adapter("default")
        first = model(input_ids=ids).logits[0].double()  # (seq, vocab)
        model.set_adapter(other)
        second = model(input_ids=ids).logits[0].double()
        rel.append(float((first[-1] - second[-1]).norm() / first[-1].norm()))
        agree += int((first.argmax(-1) == second.argmax(-1)).sum())
        total += first.shape[0]
    model.set_adapter("default")
    original = generate_texts(model, tokenizer, prompts, max_new_tokens=24)
    model.set_adapter(other)
    rewritten = generate_texts(model, tokenizer, prompts, max_new_tokens=24)
    model.set_adapter("default")
    same = sum(a == b for a, b in zip(original, rewritten))
    return {"prompts": len(prompts), "logits_rel_change_mean": sum(rel) / len(rel), "logits_rel_change_max": max(rel),
            "argmax_agreement": agree / total, "greedy_match_rate": same / len(prompts),
            "answers": [{"original": a, "rewritten": b} for a, b in zip(original, rewritten)]}


def write_portable(model: nn.Module, tokenizer, adapter_dir: str | Path, out: str | Path, engine: str,
                   max_rank: int | None = None, rank: int | None = None, prompts: int = 4) -> dict:
    """Check `adapter_dir` (loaded in `model` as "default") for `engine`, write the plain-LoRA rewrite to `out`,
    load it beside the original and measure what changed. Returns the facts (also written to out/export.json)."""
    from ..atomic import atomic_write_json
    from ..data import load_demo
    from ..evaluate.generation import chat_prompts
    from ..lora.files import read_json_object, read_meta, save_adapter

    report, kept = check(model, engine, max_rank, rank)
    if not kept:
        raise ExportError(f"nothing in this adapter can be served by {engine}: "
                          + "; ".join(f"{f.where}: {f.problem}" for f in report.findings))
    tensors = rewrite(model, report, kept)
    config = rewritten_config(read_json_object(Path(adapter_dir) / "adapter_config.json"), report, kept)
    meta = {**read_meta(adapter_dir), "rewritten_for": engine, "rewritten_from": str(adapter_dir)}
    save_adapter(out, tensors, config, meta)
    model.load_adapter(str(out), adapter_name="rewritten")
    questions = [q["question"] for q in load_demo().heldout[:prompts]]
    change = logits_change(model, tokenizer, chat_prompts(tokenizer, questions)) if prompts else {}
    facts = {"engine": engine, "max_rank": report.max_rank, "rank": report.rank, "out": str(out),
             "findings": [vars(f) for f in report.findings], "layer_rel_frobenius_error": report.layer_errors,
             "logits": change}
    atomic_write_json(Path(out) / "export.json", facts)
    return facts


def print_portable(facts: dict) -> None:
    """The report a user reads: what the engine refuses, what was done, and the error it introduced."""
    engine = facts["engine"]
    print(f"{engine}: " + (f"rank limit {facts['max_rank']}" if facts["max_rank"] else "no rank limit")
          + (" (" + ENGINES[engine].rank_note + ")" if facts["max_rank"] else ""))
    if not facts["findings"]:
        print(f"  nothing refused: the adapter loads in {engine} as it is (rewritten anyway at rank {facts['rank']})")
    groups: dict[tuple[str, str], list[str]] = {}
    for f in facts["findings"]:
        groups.setdefault((f["action"], f["problem"]), []).append(f["where"])
    for (action, problem), where in groups.items():
        more = f" and {len(where) - 1} more" if len(where) > 1 else ""
        print(f"  {action:<16} {problem}: {where[0]}{more}")
    errors = facts["layer_rel_frobenius_error"]
    if errors:
        worst = max(errors, key=errors.get)
        print(f"\nrank-{facts['rank']} rewrite, relative Frobenius error ||dW - BA|| / ||dW|| per layer:")
        for name, err in errors.items():
            print(f"  {err:9.2e}  {name}")  # every layer: the user judges which ones matter
        print(f"  worst {errors[worst]:.2e} ({worst}), mean {sum(errors.values()) / len(errors):.2e}")
    change = facts["logits"]
    if change:
        print(f"\nlogits on {change['prompts']} demo prompts: relative change mean {change['logits_rel_change_mean']:.2e}, "
              f"max {change['logits_rel_change_max']:.2e}; argmax agreement {100 * change['argmax_agreement']:.1f}%; "
              f"greedy answers identical: {100 * change['greedy_match_rate']:.0f}%")
    print(f"plain-LoRA adapter for {engine} -> {facts['out']}")
