"""How an adapter starts (init strategies) and how it acts (plain LoRA or DoRA), as small tables.

Everything here works on a layer's canonical matrices: W (out, in), A (r, in), B (out, r).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from .layer import LoraLayer


# ---------------------------------------------------------------------- init strategies
def _init_kaiming(layer: "LoraLayer", name: str) -> None:
    """A Kaiming-uniform, B zero: the update starts at exactly zero (embeddings: A zero, B normal)."""
    A, B = layer.factor_matrices(name)
    if layer.factor_names[0] == "lora_embedding_A":
        nn.init.zeros_(A)
        nn.init.normal_(B)
        return
    nn.init.kaiming_uniform_(layer.factor_params(name)[0], a=math.sqrt(5))
    nn.init.zeros_(B)


def _init_gaussian(layer: "LoraLayer", name: str) -> None:
    A, B = layer.factor_matrices(name)
    if layer.factor_names[0] == "lora_embedding_A":
        return _init_kaiming(layer, name)
    nn.init.normal_(A, std=1.0 / layer.r[name])
    nn.init.zeros_(B)


def _init_random(layer: "LoraLayer", name: str) -> None:
    """Both factors random, so the update is non-zero from the start (tests of merge and I/O)."""
    if layer.factor_names[0] == "lora_embedding_A":
        for t in layer.factor_matrices(name):
            nn.init.normal_(t)
    # Linear and Conv factors keep their constructors' random init.


def _init_orthogonal(layer: "LoraLayer", name: str) -> None:
    """PEFT's "orthogonal": A and B random (scale 1/10) with rows drawn from two orthogonal halves of a random
    orthogonal (r, r) matrix, so B A = 0 while neither factor is zero. Embeddings: the default init."""
    r = layer.r[name]
    if r % 2:
        raise ConfigError([f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead."])
    if layer.factor_names[0] == "lora_embedding_A":
        return _init_kaiming(layer, name)
    if layer.factor_params(name)[0].dim() != 2:
        raise ConfigError([f"init_lora_weights='orthogonal' is supported for linear layers only (as in PEFT), not "
                           f"{type(layer.base_layer).__name__}; exclude those from target_modules or use another init"])
    A, B = layer.factor_matrices(name)  # (r, in), (out, r)
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = Q[0::2, :], Q[1::2, :]  # (r/2, r) each, q_even @ q_odd.T = 0
    A.copy_((torch.randn(A.shape[1], r // 2) @ q_odd).T / 10.0)  # (r, in)
    B.copy_(torch.randn(r // 2, B.shape[0]).T @ q_even / 10.0)  # (out, r)


def _move_principal_part(layer: "LoraLayer", name: str, A0: torch.Tensor, B0: torch.Tensor) -> None:
    """Set A, B to A0, B0 and remove their product from W, so the layer's output is unchanged."""
    A, B = layer.factor_matrices(name)
    with torch.no_grad():  # through the parameters: their version moves (layers key cached casts on it)
        A.copy_(A0.to(A.dtype))
        B.copy_(B0.to(B.dtype))
    W = layer.weight_matrix().float()
    layer._write_weight(W - (layer.scaling[name] * B0) @ A0)  # (PEFT's order of operations: the same rounding)
    layer._initial_factors[name] = tuple(p.detach().clone() for p in layer.factor_params(name))


def _init_pissa(layer: "LoraLayer", name: str, niter: int | None = None) -> None:
    """PiSSA: the top-r singular directions of W become A, B; W keeps the residual."""
    W, r, s = layer.weight_matrix().float(), layer.r[name], layer.scaling[name]
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S[:r] / s)  # (r,)
    A0 = root[:, None] * Vh[:r]  # (r, in)
    B0 = U[:, :r] * root[None, :]  # (out, r)
    _move_principal_part(layer, name, A0, B0)


def _init_olora(layer: "LoraLayer", name: str) -> None:
    """OLoRA: W = Q R; the first r columns of Q become B and the first r rows of R become A."""
    Q, R = torch.linalg.qr(layer.weight_matrix().float())
    r = layer.r[name]
    _move_principal_part(layer, name, R[:r].contiguous(), Q[:, :r].contiguous())


def _init_corda(layer: "LoraLayer", name: str) -> None:
    """CorDA (PEFT's corda_init): the decomposition preprocess_corda left on the base layer as `eigens` (U_WC (out, r),
    S_WC (r,), V_WC (in, r), already cropped to this rank) gives A = sqrt(S/s) V^T and B = U sqrt(S/s); W keeps the
    residual W - s B A. The eigens are consumed (deleted), as in PEFT."""
    base, r = layer.base_layer, layer.r[name]
    if layer.base_weight().dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("Please initialize CorDA under float32, float16, or bfloat16. Subsequently, re-quantize the "
                        "residual model to help minimize quantization errors.")
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ConfigError(["`eigens` attribute not found for layer, please run `preprocess_corda` first "
                           f"(on {type(base).__name__} {tuple(layer.weight_matrix().shape)}: "
                           "lorakit.preprocess_corda(model, config, run_model=...) before get_peft_model, or before "
                           "loading a CorDA adapter saved with convert_to_lora=False)"],
                          where="init_lora_weights='corda'")
    U, S, V = eigens.U_WC, eigens.S_WC, eigens.V_WC
    for label, t in (("S", S), ("U", U), ("V", V)):
        if not torch.isfinite(t).all():
            raise ConfigError([f"Invalid value found in matrix {label}: the CorDA decomposition holds NaN or inf; "
                               "check the sample data run by preprocess_corda"], where="init_lora_weights='corda'")
    out_dim, in_dim = layer.weight_matrix().shape
    expected = {"U": (U, (out_dim, r)), "S": (S, (r,)), "V": (V, (in_dim, r))}
    for label, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ConfigError([f"Matrix {label} size mismatch: {t.size()} vs. {shape}. Please make sure the "
                               "`lora_config` and `model` argument of `preprocess_corda` is consistent with "
                               "`get_peft_model`. If you're using cache in `preprocess_corda`, please make sure the "
                               "cache is built with the same model and LoRA rank."], where="init_lora_weights='corda'")
    root = (S.float() / layer.scaling[name]).sqrt()  # (r,)
    A0 = (V.float().T * root[:, None]).contiguous()  # (r, in)
    B0 = (U.float() * root[None, :]).contiguous()  # (out, r)
    _move_principal_part(layer, name, A0.to(layer.base_weight().device), B0.to(layer.base_weight().device))
    del base.eigens


def _refuse_eva(layer: "LoraLayer", name: str) -> None:
    raise ConfigError(["init_lora_weights='eva' starts from a data pass (PEFT's initialize_lora_eva_weights), which "
                       "lorakit does not have: use PEFT for EVA, or init_lora_weights=True (an EVA adapter PEFT saved "
                       "loads in lorakit as plain LoRA)"], where="init_lora_weights")


INITS: dict[object, Callable[["LoraLayer", str], None]] = {
    True: _init_kaiming,
    "gaussian": _init_gaussian,
    False: _init_random,
    "pissa": _init_pissa,
    "olora": _init_olora,
    "orthogonal": _init_orthogonal,
    "corda": _init_corda,
    "eva": _refuse_eva,
}


@torch.no_grad()
def init_factors(layer: "LoraLayer", name: str, init) -> None:
    if getattr(layer, "grouped", False) and init not in (True, False, "gaussian"):
        raise ConfigError([f"init_lora_weights={init!r} needs the update as a matrix of W's shape, which a grouped "
                           "convolution's LoRA is not; use init_lora_weights=True, or exclude this layer"])
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        return _init_pissa(layer, name, niter=int(init.rsplit("_", 1)[1]))
    INITS[init](layer, name)
    bias = layer.lora_bias(name)
    if bias is not None and init is not False:  # as PEFT: lora_bias starts at zero unless init is False
        nn.init.zeros_(bias)


def place_and_init(layer: "LoraLayer", name: str, init) -> None:
    """Put adapter `name`'s new parameters on the base weight's device and dtype, then initialise them. Parameters
    made on the meta device (low_cpu_mem_usage: a load fills them next) only take the dtype: no values, no init."""
    weight = layer.base_weight()
    params = layer._adapter_parameters(name)
    dtype = weight.dtype if weight.is_floating_point() else None
    on_meta = any(p.is_meta for p in params)
    for p in params:
        p.data = p.data.to(dtype=dtype or p.dtype) if on_meta else \
            p.data.to(device=weight.device, dtype=dtype or p.dtype)
    if on_meta:
        VARIANTS[layer.variant[name]].init_empty(layer, name)
        return
    init_factors(layer, name, init)
    VARIANTS[layer.variant[name]].init(layer, name)


# ---------------------------------------------------------------------- variants
class LoraVariant:
    """Plain LoRA: output += scaling · B A dropout(x); merge W += scaling · B A."""

    @staticmethod
    def init(layer: "LoraLayer", name: str) -> None:
        pass

    @staticmethod
    def init_empty(layer: "LoraLayer", name: str) -> None:
        """The variant's own parameters, shaped but empty on the meta device (low_cpu_mem_usage)."""

    @staticmethod
    def forward(layer: "LoraLayer", name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        return layer.scaling[name] * layer._lora_branch(name, layer.lora_dropout[name](x))

    @staticmethod
    def merged_delta(layer: "LoraLayer", name: str, W: torch.Tensor) -> torch.Tensor:
        """What merging adds to the weight, for the unmerged canonical weight W: ΔW, whatever W is."""
        return layer.delta_weight(name)


class DoraVariant:
    """DoRA: W' = m · (W + ΔW) / ||W + ΔW|| per output row, with the norm detached (as in the paper).

    Unmerged forward: base + (g - 1) · W x_d + g · scaling · B A x_d, where g = m / ||W + ΔW||
    and x_d = dropout(x); in eval this equals the merged layer exactly.
    """

    @staticmethod
    def _norm(layer: "LoraLayer", name: str, W: Optional[torch.Tensor] = None) -> torch.Tensor:
        """||W + ΔW|| per output row, of the unmerged weight W (the layer's own when none is given)."""
        W = layer.weight_matrix() if W is None else W
        return (W.float() + layer.delta_weight(name)).norm(dim=1)  # (out,)

    @staticmethod
    def init(layer: "LoraLayer", name: str) -> None:
        if not hasattr(layer, "base_matmul"):
            raise ConfigError([f"use_dora is not supported for {type(layer.base_layer).__name__} layers; "
                               "exclude them from target_modules or turn DoRA off"])
        with torch.no_grad():
            magnitude = DoraVariant._norm(layer, name).to(layer.weight_matrix().dtype)
        layer.lora_magnitude_vector[name] = DoraMagnitude(layer._channel_view(magnitude))

    @staticmethod
    def init_empty(layer: "LoraLayer", name: str) -> None:
        W = layer.weight_matrix()
        empty = torch.empty(W.shape[0], dtype=W.dtype, device="meta")  # (out,), filled by the load
        layer.lora_magnitude_vector[name] = DoraMagnitude(layer._channel_view(empty))

    @staticmethod
    def _magnitude(layer: "LoraLayer", name: str) -> torch.Tensor:
        return layer.lora_magnitude_vector[name].weight.reshape(-1)  # (out,)

    @staticmethod
    def forward(layer: "LoraLayer", name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        dropout = layer.lora_dropout[name]
        x_d = dropout(x)
        if x_d is x:  # no dropout: reuse the base output, minus its bias
            bias = getattr(layer.base_layer, "bias", None)
            wx = base_result if bias is None else base_result - layer._channel_view(bias)
        else:
            wx = layer.base_matmul(x_d)
        with torch.no_grad():
            norm = DoraVariant._norm(layer, name)
        dtype = x.dtype if x.is_floating_point() else base_result.dtype  # (an embedding's x holds token ids)
        g = layer._channel_view((DoraVariant._magnitude(layer, name) / norm.to(dtype)).to(dtype))
        lora = layer.scaling[name] * layer._lora_branch(name, x_d)
        return (g - 1) * wx.to(dtype) + g * lora

    @staticmethod
    def merged_delta(layer: "LoraLayer", name: str, W: torch.Tensor) -> torch.Tensor:
        """What merging adds to the weight, for the unmerged canonical weight W: f·(W + ΔW) − W with the row factor
        f = m / ||W + ΔW||, kept (layer._merge_state) for the merged weight to be undone. Against the unmerged W,
        not the weight with other adapters merged in already, as the unmerged forward computes it."""
        factor = DoraVariant._magnitude(layer, name).float() / DoraVariant._norm(layer, name, W)  # (out,)
        layer._merge_state[name] = factor
        return (factor - 1)[:, None] * W + factor[:, None] * layer.delta_weight(name)


class DoraMagnitude(nn.Module):
    """DoRA's learned per-output magnitude m, held as PEFT holds it: `.weight`, shaped (out,) for linear layers and
    (1, out, 1, ...) for convolutions, so state dicts and adapter files match PEFT's key for key."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


VARIANTS = {"lora": LoraVariant, "dora": DoraVariant}
