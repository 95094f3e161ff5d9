"""How much rank a LoRA update uses, and SVD truncation to a smaller adapter, from the small factors only.

With ΔW = s · B A, B (out, r) and A (r, in), take thin QRs B = Q_B R_B and Aᵀ = Q_A R_A. Then

    ΔW = Q_B (s · R_B R_Aᵀ) Q_Aᵀ

and Q_B, Q_A have orthonormal columns, so the singular values of ΔW are those of the small core
s · R_B R_Aᵀ (at most r × r), and its singular vectors are Q_B U and Q_A V. The out × in matrix is
never formed: a layer costs O((out + in) r²), which is what makes a rank report of a 7B adapter cheap.

The *energy* of an update is ‖ΔW‖²_F = Σ σ_i²; its effective rank at level p is the fewest singular
directions that keep a fraction p of it. Truncating to k directions keeps exactly that fraction and
is the best rank-k approximation of ΔW (Eckart–Young).

Adapters are handled as files (PEFT's key names), so any LoRA adapter, lorakit's or PEFT's, can be
analysed and resized without loading its base model.
"""
from __future__ import annotations

import collections
import datetime
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from ..atomic import atomic_directory
from ..config import LoraConfig
from ..errors import AdapterError, ConfigError
from .files import CONFIG_NAME, META_NAME, PREFIX, WEIGHTS_NAME, read_adapter_tensors, read_meta

ENERGY_LEVELS = (0.90, 0.95, 0.99)
"""The energy fractions at which every report gives the effective rank."""
DEFAULT_ENERGY = 0.99
"""The energy a suggested rank keeps."""
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
"""PEFT's keys of (A, B): linear and conv layers, then embeddings."""
_ROUNDING = 1e-12  # energy fractions within this of the level count as reaching it


# ---------------------------------------------------------------------- the math
def factor_svd(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ΔW = scaling · B A computed from the factors, in float64.

    Args:
        A: (r, in, *kernel) or (r, in) factor; flattened to (r, in_flat).
        B: (out, r, *ones) or (out, r) factor; flattened to (out, r).
        scaling: the layer's alpha / r (or alpha / sqrt(r) with rsLoRA).

    Returns:
        (U (out, k), S (k,), Vh (k, in_flat)) with k = min(out, in_flat, r) and ΔW = U diag(S) Vh.
    """
    a = A.detach().reshape(A.shape[0], -1).double()  # (r, in)
    b = B.detach().reshape(B.shape[0], -1).double()  # (out, r)
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"factor shapes do not chain: A is {tuple(A.shape)} and B is {tuple(B.shape)}; "
                           "A must be (r, in) and B (out, r)")
    q_b, r_b = torch.linalg.qr(b)  # (out, p), (p, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, q), (q, r)
    core = scaling * (r_b @ r_a.T)  # (p, q), p and q <= r
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (p, k), (k,), (k, q)
    return q_b @ u, s, vh @ q_a.T  # (out, k), (k,), (k, in)


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular directions holding at least `energy` of Σ σ_i² (0 for a zero update)."""
    sq = singular_values.double() ** 2  # (k,)
    total = sq.sum()
    if total <= 0:
        return 0
    kept = torch.cumsum(sq, 0) / total  # (k,)
    return min(int((kept < energy - _ROUNDING).sum()) + 1, sq.numel())


def energy_kept(singular_values: torch.Tensor, k: int) -> float:
    """Fraction of Σ σ_i² in the first k singular values (1.0 for a zero update)."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    return 1.0 if total <= 0 else float(sq[:k].sum()) / total


def truncate_factors(A: torch.Tensor, B: torch.Tensor, scaling: float, k: int,
                     new_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A', B') of rank k, in the layouts and dtype of A and B, with new_scaling · B' A' equal to
    the best rank-k approximation of scaling · B A. The singular values are split evenly between them."""
    if new_scaling <= 0:
        raise ValueError(f"new_scaling must be positive, got {new_scaling}")
    u, s, vh = factor_svd(A, B, scaling)  # (out, m), (m,), (m, in)
    if not 1 <= k <= s.numel():
        raise ValueError(f"rank {k} is outside 1..{s.numel()} for factors A {tuple(A.shape)}, B {tuple(B.shape)}")
    root = (s[:k] / new_scaling).sqrt()  # (k,)
    b_new = u[:, :k] * root  # (out, k)
    a_new = root[:, None] * vh[:k]  # (k, in)
    return (a_new.reshape(k, *A.shape[1:]).to(A.dtype).contiguous(),
            b_new.reshape(B.shape[0], k, *B.shape[2:]).to(B.dtype).contiguous())


# ---------------------------------------------------------------------- adapters as files
@dataclass
class LayerSpectrum:
    """The spectrum of one adapted layer's update."""

    module: str
    """Module name in the base model, e.g. model.layers.0.self_attn.q_proj."""
    kind: str
    """Its last name segment (q_proj, v_proj ...), which groups layers in reports."""
    rank: int
    """r of the stored factors."""
    scaling: float
    """alpha / r (alpha / sqrt(r) with rsLoRA) of this layer."""
    shape: tuple[int, int]
    """(out, in_flat) of ΔW."""
    singular_values: torch.Tensor
    """(min(out, in, r),) float64, descending."""

    @property
    def energy(self) -> float:
        return float((self.singular_values ** 2).sum())

    def effective_rank(self, energy: float) -> int:
        return effective_rank(self.singular_values, energy)

    def as_dict(self, levels: tuple[float, ...] = ENERGY_LEVELS) -> dict[str, Any]:
        return {"module": self.module, "kind": self.kind, "r": self.rank, "scaling": self.scaling,
                "shape": list(self.shape), "energy": self.energy,
                "effective_rank": {f"{p:g}": self.effective_rank(p) for p in levels},
                "singular_values": [float(v) for v in self.singular_values]}


def lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """{module name: (key of A, key of B)} for every LoRA pair among an adapter file's tensors."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in tensors:
        for suffix_a, suffix_b in FACTOR_SUFFIXES:
            if key.endswith(suffix_a):
                key_b = key[: -len(suffix_a)] + suffix_b
                if key_b not in tensors:
                    raise AdapterError(f"{key} has no matching {key_b}: the adapter file is incomplete")
                pairs[key[: -len(suffix_a)].removeprefix(PREFIX)] = (key, key_b)
    return pairs


def layer_scaling(config: LoraConfig, module: str) -> float:
    """The scaling PEFT (and lorakit) give `module` under `config`."""
    r, alpha = config.rank_for(module), config.alpha_for(module)
    return alpha / (math.sqrt(r) if config.use_rslora else r)


def read_adapter(directory: str | os.PathLike,
                 allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors). The dict keeps fields lorakit does not know, for rewriting."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config_dict = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    LoraConfig.from_dict(config_dict)  # refuses non-LoRA adapters and invalid values
    return config_dict, read_adapter_tensors(directory, allow_pickle)


def model_order(module: str) -> list[Any]:
    """Sort key putting modules in model order: numbers compared as numbers (layers 2 before 10; a safetensors
    file stores its keys as text, 0, 1, 10, 11, ..., 2)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", module)]


def adapter_spectra(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[LayerSpectrum]:
    """One LayerSpectrum per adapted layer, in model order (`model_order`). Raises AdapterError when r disagrees
    with the file."""
    if config.target_parameters:  # A (r·E, in) and B (out, r·E) hold E experts' factors: B @ A is no layer's ΔW
        raise AdapterError(f"this adapter has LoRA on parameters (target_parameters={config.target_parameters}); "
                           "rank spectra and resizing cover module LoRA only: analyse an adapter without them")
    spectra = []
    for module, (key_a, key_b) in sorted(lora_pairs(tensors).items(), key=lambda item: model_order(item[0])):
        A, B = tensors[key_a], tensors[key_b]
        if A.shape[0] != config.rank_for(module):
            raise AdapterError(f"{key_a} has rank {A.shape[0]} but adapter_config.json gives {module} "
                               f"r={config.rank_for(module)}; the config and the weights do not belong together")
        scaling = layer_scaling(config, module)
        _, s, _ = factor_svd(A, B, scaling)
        spectra.append(LayerSpectrum(module, module.rsplit(".", 1)[-1], A.shape[0], scaling,
                                     (B.shape[0], A[0].numel()), s))
    if not spectra:
        raise AdapterError("the adapter holds no LoRA factors (no *.lora_A.weight / *.lora_embedding_A keys)")
    return spectra


def rank_report(spectra: list[LayerSpectrum], energy: float = DEFAULT_ENERGY) -> dict[str, Any]:
    """Per-layer spectra and effective ranks, and the suggestions.

    `suggested_rank` is the smallest uniform rank keeping at least `energy` of the adapter's total update
    energy (all layers together); `suggested_rank_every_layer` the smallest at which every layer keeps
    `energy` of its own; `suggested_ranks` gives each layer its own smallest such rank (what
    `resize --energy` writes).
    """
    per_layer = {s.module: max(1, s.effective_rank(energy)) for s in spectra}
    total = sum(s.energy for s in spectra)
    uniform = _uniform_ranks(spectra, total)
    suggested = next(row for row in uniform if row["energy_kept"] >= energy - _ROUNDING)
    kinds: dict[str, list[LayerSpectrum]] = collections.defaultdict(list)
    for s in spectra:
        kinds[s.kind].append(s)
    return {"energy": energy, "suggested_rank": suggested["rank"],
            "energy_kept_at_suggested_rank": suggested["energy_kept"],
            "min_layer_energy_kept_at_suggested_rank": suggested["min_layer_energy_kept"],
            "suggested_rank_every_layer": max(per_layer.values()), "suggested_ranks": per_layer,
            "r": max(s.rank for s in spectra), "layers_count": len(spectra),
            "lora_params": sum(s.rank * sum(s.shape) for s in spectra),
            "lora_params_at_suggested_rank": sum(min(suggested["rank"], s.singular_values.numel()) * sum(s.shape)
                                                 for s in spectra),
            "lora_params_at_suggested_ranks": sum(per_layer[s.module] * sum(s.shape) for s in spectra),
            "by_kind": {kind: _kind_summary(group, energy) for kind, group in kinds.items()},
            "uniform_ranks": uniform,
            "layers": [{**s.as_dict(), "suggested_rank": per_layer[s.module]} for s in spectra]}


def _uniform_ranks(spectra: list[LayerSpectrum], total: float) -> list[dict[str, Any]]:
    """For every uniform rank k = 1..r: the share of the adapter's total energy kept, and the worst layer's."""
    rows = []  # the last row (k = r) keeps everything, so a suggestion always exists
    for k in range(1, max(s.rank for s in spectra) + 1):
        kept = [energy_kept(s.singular_values, k) for s in spectra]
        rows.append({"rank": k, "energy_kept": sum(s.energy * f for s, f in zip(spectra, kept)) / total
                     if total > 0 else 1.0, "min_layer_energy_kept": min(kept)})
    return rows


def _kind_summary(group: list[LayerSpectrum], energy: float) -> dict[str, Any]:
    """Ranks keeping `energy` across the layers of one type (all q_proj, ...): min, median, max."""
    ranks = sorted(max(1, s.effective_rank(energy)) for s in group)
    return {"layers": len(group), "r": max(s.rank for s in group), "suggested_rank": ranks[-1],
            "median_rank": ranks[len(ranks) // 2], "min_rank": ranks[0]}


# ---------------------------------------------------------------------- resizing
@dataclass
class ResizeResult:
    """What `resize_adapter` wrote."""

    out: Path
    ranks: dict[str, int]
    """New rank of every adapted layer."""
    energy_kept: float
    """Fraction of the adapter's total update energy (all layers) that survived."""
    min_layer_energy_kept: float
    """The smallest fraction any one layer kept."""
    bytes_before: int
    bytes_after: int
    params_before: int
    params_after: int
    config: dict[str, Any]
    """The new adapter_config.json."""


def plan_ranks(spectra: list[LayerSpectrum], rank: Optional[int] = None,
               energy: Optional[float] = None) -> dict[str, int]:
    """{module: new rank}: min(rank, what the layer has), or each layer's smallest rank keeping `energy`."""
    problems = []
    if (rank is None) == (energy is None):
        problems.append("give exactly one of rank (--rank: a uniform rank) or energy (--energy: a fraction "
                        "such as 0.99)")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        problems.append(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        problems.append(f"energy must be in (0, 1], e.g. 0.99, got {energy!r}")
    if problems:
        raise ConfigError(problems, where="resize")
    if rank is not None:
        return {s.module: min(rank, s.singular_values.numel()) for s in spectra}
    return {s.module: max(1, s.effective_rank(energy)) for s in spectra}


def resized_config(config_dict: dict[str, Any], spectra: list[LayerSpectrum],
                   ranks: dict[str, int]) -> dict[str, Any]:
    """adapter_config.json for the new ranks, every layer keeping its scaling (so alpha / r is unchanged).

    The most common (rank, alpha) become r and lora_alpha; other layers get rank_pattern / alpha_pattern
    entries under their full module names. Old patterns are replaced (they may be regexes matching anything).
    """
    config = LoraConfig.from_dict(config_dict)
    grow = math.sqrt if config.use_rslora else float
    alphas = {s.module: _tidy(s.scaling * grow(ranks[s.module])) for s in spectra}
    r = _most_common(ranks.values())
    alpha = _most_common(a for m, a in alphas.items() if ranks[m] == r)
    out = {**config_dict, "r": r, "lora_alpha": alpha}
    for anchored in (False, True):  # plain names, as users write them; anchored regexes if those collide
        key = (lambda m: "^" + re.escape(m)) if anchored else (lambda m: m)
        out["rank_pattern"] = {key(m): k for m, k in ranks.items() if k != r}
        out["alpha_pattern"] = {key(m): a for m, a in alphas.items() if a != alpha}
        if all(_reads_back(out, s.module, ranks[s.module], alphas[s.module]) for s in spectra):
            return out
    raise AdapterError("could not express the new per-layer ranks as rank_pattern keys; module names collide")


def _reads_back(config_dict: dict[str, Any], module: str, rank: int, alpha: float) -> bool:
    """Whether lorakit and PEFT both give `module` this rank and alpha under `config_dict`."""
    check = LoraConfig.from_dict(config_dict)
    peft_rank = _peft_pattern_value(config_dict["rank_pattern"], module, config_dict["r"])
    peft_alpha = _peft_pattern_value(config_dict["alpha_pattern"], module, config_dict["lora_alpha"])
    return check.rank_for(module) == rank == peft_rank and check.alpha_for(module) == alpha == peft_alpha


def _peft_pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's own rule (peft.utils.other.get_pattern_key): the first key matching a '.'-bounded suffix."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _most_common(values) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _tidy(x: float) -> float | int:
    """alpha as an int when it is one (up to rounding), so configs read 16 rather than 16.000000000000004."""
    return int(round(x)) if math.isclose(x, round(x), rel_tol=1e-9) else x


def folder_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the files directly inside an adapter folder."""
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())


def resize_adapter(source: str | os.PathLike, out: str | os.PathLike, rank: Optional[int] = None,
                   energy: Optional[float] = None, allow_pickle: bool = False) -> ResizeResult:
    """SVD-truncate the adapter in `source` into a smaller PEFT adapter folder `out` (written atomically).

    The new adapter is always safetensors. Every LoRA pair (linear, conv, embedding) is truncated; any
    other tensor (modules_to_save copies, DoRA magnitudes, biases, full embeddings) is copied unchanged.
    lorakit.json keeps its facts and gains an entry under "resizes".

    Raises:
        ConfigError: not exactly one of rank / energy, or out is the source folder.
        AdapterError: the source is not a readable LoRA adapter.
    """
    if Path(out).resolve() == Path(source).resolve():
        raise ConfigError([f"--out {out} is the adapter being resized; write the smaller adapter to another "
                           "folder (the original is the only lossless copy)"], where="resize")
    config_dict, tensors = read_adapter(source, allow_pickle)
    config = LoraConfig.from_dict(config_dict)
    spectra = adapter_spectra(config, tensors)
    ranks = plan_ranks(spectra, rank, energy)
    new_config = resized_config(config_dict, spectra, ranks)
    pairs = lora_pairs(tensors)
    new_tensors = dict(tensors)
    for s in spectra:
        key_a, key_b = pairs[s.module]
        new_tensors[key_a], new_tensors[key_b] = truncate_factors(
            tensors[key_a], tensors[key_b], s.scaling, ranks[s.module], s.scaling)
    total = sum(s.energy for s in spectra)
    kept = [energy_kept(s.singular_values, ranks[s.module]) for s in spectra]
    result = ResizeResult(Path(out), ranks, sum(s.energy * k for s, k in zip(spectra, kept)) / total if total else 1.0,
                          min(kept), folder_bytes(source), 0, sum(t.numel() for t in tensors.values()),
                          sum(t.numel() for t in new_tensors.values()), new_config)
    meta = _resized_meta(read_meta(source), source, config, result, rank, energy)
    with atomic_directory(out) as tmp:
        save_file(new_tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, obj in ((CONFIG_NAME, new_config), (META_NAME, meta)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    result.bytes_after = folder_bytes(out)
    return result


def _resized_meta(meta: dict[str, Any], source, config: LoraConfig, result: ResizeResult,
                  rank: Optional[int], energy: Optional[float]) -> dict[str, Any]:
    """lorakit.json of the source (or a minimal one for a PEFT adapter) plus a note of this resize."""
    from .. import __version__

    meta = dict(meta) or {"format": 1, "base_fingerprint": {}}
    note = {"from": str(source), "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "method": "svd", "rank": rank, "energy": energy, "r_before": config.r, "r_after": result.config["r"],
            "rank_pattern": result.config["rank_pattern"], "energy_kept": result.energy_kept,
            "min_layer_energy_kept": result.min_layer_energy_kept, "params_before": result.params_before,
            "params_after": result.params_after, "lorakit": __version__,
            "note": "the metrics in this file were measured before this resize"}
    meta["resizes"] = list(meta.get("resizes", [])) + [note]
    return meta
