"""Combining adapters into a new one (PEFT's add_weighted_adapter), layer by layer on canonical matrices.

Factor-space methods (linear, ties, dare_linear, dare_ties, magnitude_prune) combine the A's and the B's
separately and need equal ranks; `cat` stacks them (exact weighted sum, rank = sum of ranks); `svd` and the
`*_svd` methods combine full updates ΔW_i and truncate back to low rank with an SVD.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError
from .layer import LoraLayer

# ---------------------------------------------------------------------- task-vector merging (TIES / DARE)


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude."""
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
    return t * (t.abs() >= threshold)


def random_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: drop entries with probability 1 - density and rescale the rest by 1 / density."""
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    votes = stacked.sign().sum(0) if method == "frequency" else stacked.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    return stacked.sign() == majority


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (stacked * mask).sum(0) / mask.sum(0).clamp(min=1)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))


def _ties(ts, w, density, sign):
    stacked = torch.stack([magnitude_prune(t, density) for t in ts])
    return disjoint_merge(_weighted(stacked, w), majority_sign_mask(stacked, sign))


def _dare_linear(ts, w, density, sign):
    return _weighted(torch.stack([random_prune(t, density) for t in ts]), w).sum(0)


def _dare_ties(ts, w, density, sign):
    stacked = torch.stack([random_prune(t, density) for t in ts])
    return disjoint_merge(_weighted(stacked, w), majority_sign_mask(stacked, sign))


def _magnitude(ts, w, density, sign):
    return _weighted(torch.stack([magnitude_prune(t, density) for t in ts]), w).sum(0)


def _linear(ts, w, density, sign):
    return _weighted(torch.stack(ts), w).sum(0)


TASK_MERGES: dict[str, Callable] = {"ties": _ties, "dare_linear": _dare_linear, "dare_ties": _dare_ties,
                                    "magnitude_prune": _magnitude, "linear": _linear}
COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


# ---------------------------------------------------------------------- per layer
def _signed_root(x: float) -> tuple[float, float]:
    """(a, b) with a * b == x and |a| == |b|: splits a weight between A and B, sign on A."""
    root = math.sqrt(abs(x))
    return math.copysign(root, x), root


def combined_rank(layer: LoraLayer, sources: Sequence[str], method: str, svd_rank: Optional[int]) -> int:
    """The rank k of the factors combine_layer returns for this layer (known before it draws any random mask)."""
    ranks = {n: layer.r[n] for n in sources if n in layer.r}
    if method == "cat":
        return sum(ranks.values())
    if method.endswith("svd"):
        return min(svd_rank or max(ranks.values()), *layer.weight_matrix().shape)
    if len(set(ranks.values())) > 1:
        raise ConfigError([f"combination_type={method!r} needs adapters of equal rank, got {ranks}; "
                           f"use 'cat', 'svd' or {method + '_svd'!r}"])
    return next(iter(ranks.values()))


def combine_layer(layer: LoraLayer, sources: Sequence[str], weights: Sequence[float], method: str, rank: int,
                  density: float, sign: str, svd_clamp: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """New factors (A (k, in), B (out, k)), fp32, whose product is the combined update (scaling 1); `rank` is
    combined_rank's k (which also checks that factor-space methods get equal ranks); the SVD methods keep k."""
    pairs = [(n, w) for n, w in zip(sources, weights) if n in layer.r]
    mats = [tuple(t.float() for t in layer.factor_matrices(n)) for n, _ in pairs]
    if method == "cat":
        A = torch.cat([a for a, _ in mats], 0)  # (sum r, in)
        B = torch.cat([b * w * layer.scaling[n] for (n, w), (_, b) in zip(pairs, mats)], 1)  # (out, sum r)
        return A, B
    if method.endswith("svd"):
        base = method.removesuffix("_svd").removesuffix("svd") or "linear"
        deltas = [layer.delta_weight(n) for n, _ in pairs]
        delta = TASK_MERGES[base](deltas, torch.tensor([w for _, w in pairs]), density, sign)  # (out, in)
        return _svd_factors(delta, rank, svd_clamp)
    # PEFT's convention for factor-space methods: A_i gets ±sqrt(|w_i s_i|), B_i gets sqrt(|w_i s_i|).
    roots = [_signed_root(w * layer.scaling[n]) for n, w in pairs]
    wa, wb = torch.tensor([ra for ra, _ in roots]), torch.tensor([rb for _, rb in roots])
    merge = TASK_MERGES[method]
    return merge([a for a, _ in mats], wa, density, sign), merge([b for _, b in mats], wb, density, sign)


def _svd_factors(delta: torch.Tensor, rank: int, clamp: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    B, A = U[:, :rank] * S[:rank], Vh[:rank]  # (out, k), (k, in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)  # signed values, as PEFT
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B
