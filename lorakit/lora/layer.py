"""The LoRA layer: y = base(x) + scaling * lora_B(lora_A(dropout(x))), for any number of named adapters.

Every supported base layer is seen through one *canonical matrix* view: the frozen weight as
W (out, in_flat), A as (r, in_flat) and B as (out, r), so ΔW = scaling · B @ A. nn.Linear is that
already; GPT-2's Conv1D and nn.Embedding store W transposed; a ConvNd flattens (in, *kernel).
Merging, DoRA, PiSSA/OLoRA init, combination and rank analysis all work on that view.
"""
from __future__ import annotations

import contextlib
import math
import operator
import warnings
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import AdapterError, PeftWarning
from ..fast.lora_linear import compute_factors, lora_linear
from ..fast.recompute import recomputing
from .layer_names import PeftLayerNames
from .peft_classes import register_with_peft
from .variants import VARIANTS, place_and_init

BASE_ADAPTER = "__base__"
"""In `adapter_names=[...]`, the rows that use no adapter at all."""

# Per-row adapter names for mixed-batch inference; a ContextVar so concurrent requests don't collide.
ROW_ADAPTERS: ContextVar[Optional[list[str]]] = ContextVar("lorakit_row_adapters", default=None)


@contextlib.contextmanager
def route_rows(adapter_names: Sequence[str]) -> Iterator[None]:
    """Within this block, row i of every batch goes through adapter `adapter_names[i]` only."""
    token = ROW_ADAPTERS.set(list(adapter_names))
    try:
        yield
    finally:
        ROW_ADAPTERS.reset(token)


def rows_by_adapter(names: list[str], batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """{adapter: row indices}; names are repeated per row when the batch was expanded (beams, samples)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(_expand_rows(names, batch)):
        groups.setdefault(n, []).append(i)
    return {n: torch.tensor(idx, device=device) for n, idx in groups.items()}


def _expand_rows(names: list[str], batch: int) -> list[str]:
    """One name per row: each name repeated when the batch was expanded (beams, samples)."""
    if batch == len(names):
        return names
    if len(names) == 0 or batch % len(names):
        raise AdapterError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                           f"{len(names)} and {batch} respectively (or a divisor of it, for beams and samples).")
    return [n for n in names for _ in range(batch // len(names))]


class LoraLayer(PeftLayerNames, nn.Module):
    """A frozen base layer plus trainable low-rank updates, one (A, B) pair per adapter name."""

    factor_names = ("lora_A", "lora_B")  # attributes holding the per-adapter A and B (PEFT's key names)
    _factor_store: type = nn.ModuleDict
    weight_name = "weight"  # the base layer's parameter the update applies to (MultiheadAttention: in_proj_weight)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        register_with_peft()
        self.base_layer = base_layer
        for attr in self.factor_names:
            setattr(self, attr, self._factor_store())
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA only: adapter -> DoraMagnitude
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.variant: dict[str, str] = {}  # adapter -> key of VARIANTS ("lora" | "dora")
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.tied: Optional[dict] = None  # set when another module shares the base weight (note_shared_weights)
        self.disabled = False
        self._merge_state: dict[str, torch.Tensor] = {}  # DoRA: the factor applied at merge, for unmerge
        self._initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA start point
        self._factor_cache: dict[str, tuple] = {}  # LoraLinear's fused path: (key, (s·A, B) in the compute dtype)
        # Base checkpoints keep loading with no key remapping: "q_proj.weight" -> "q_proj.base_layer.weight".
        self.register_load_state_dict_pre_hook(_accept_base_keys)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # in_features, weight, padding_idx ... pass through

    # ------------------------------------------------------------------ per-type hooks
    def _make_factors(self, name: str, r: int, bias: bool = False) -> None:
        """Create adapter `name`'s A and B (B with a bias of its own when `bias`: PEFT's lora_bias)."""
        raise NotImplementedError

    def factor_params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw A and B parameters in their own layouts (2-D, or conv-shaped)."""
        a, b = (getattr(self, attr)[name] for attr in self.factor_names)
        # (a module's .weight, else the tensor itself: FSDP with use_orig_params holds plain tensors in a ParameterDict)
        return (a.weight, b.weight) if isinstance(a, nn.Module) else (a, b)

    def factor_matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in_flat), B (out, r)) as views sharing storage with the parameters."""
        A, B = self.factor_params(name)
        return A.view(A.shape[0], -1), B.view(B.shape[0], -1)

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)) without scaling, shaped like the base output."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight the update applies to, in its own layout."""
        return getattr(self.base_layer, self.weight_name)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        setattr(self.base_layer, self.weight_name, weight)

    def weight_matrix(self) -> torch.Tensor:
        """The frozen weight as a canonical (out, in_flat) view."""
        weight = self.base_weight()
        return weight.T if self.fan_in_fan_out else weight

    def _to_weight_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of weight_matrix: a canonical (out, in_flat) matrix in the base weight's layout."""
        return matrix.T if self.fan_in_fan_out else matrix

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-output vector over the base output (the last dim for linear layers)."""
        return v

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                    lora_bias: bool = False) -> None:
        """Create adapter `name` with rank r; its update starts at zero unless init says otherwise.

        lora_bias: B gets a trainable bias (PEFT's lora_bias), added to the output times scaling; merging adds
        scaling * bias to the base layer's bias, so it needs one.
        """
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._make_factors(name, r, bias=lora_bias)
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(self.base_layer).__name__}"
                          " has no bias. This means that merging LoRA weights won't be possible.", PeftWarning)
        self.variant[name] = "dora" if use_dora else "lora"
        place_and_init(self, name, init_lora_weights)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge before deleting it")
        for store in self._adapter_stores():
            if name in store:
                del store[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.variant, self._initial_factors, self._factor_cache):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _adapter_stores(self) -> list:
        return [self.lora_dropout, self.lora_magnitude_vector] + [getattr(self, a) for a in self.factor_names]

    def _adapter_parameters(self, name: str) -> list[nn.Parameter]:
        out = []
        for store in self._adapter_stores():
            if name in store:
                item = store[name]
                out.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return out

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's relative keys: the adapter-name segment dropped (and, as PEFT
        saves it, a DoRA magnitude's '.weight')."""
        out = {}
        for key, value in self.state_dict(keep_vars=True).items():
            parts = key.split(".")
            if name in parts and not key.startswith("base_layer."):
                parts.remove(name)
                out[".".join(parts).replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = value
        return out

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · B @ A as a canonical (out, in_flat) matrix, computed in `dtype`."""
        A, B = self.factor_matrices(name)
        return self.scaling[name] * (B.to(dtype) @ A.to(dtype))  # (out, r) @ (r, in) -> (out, in)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        rows = ROW_ADAPTERS.get()
        if rows is not None:
            return self._forward_routed(x, result, rows)
        if self.merged_adapters:
            return result  # the active adapters are inside W already
        for name in self.active_adapters:
            if name in self.r:
                result = result + self._delta_output(name, x, result)
        return result

    def _delta_output(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output for input x."""
        dtype = self.factor_matrices(name)[0].dtype
        x_cast = x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
        delta = VARIANTS[self.variant[name]].forward(self, name, x_cast, base_result)
        return delta.to(base_result.dtype)

    def _forward_routed(self, x: torch.Tensor, result: torch.Tensor, rows: list[str]) -> torch.Tensor:
        if self.merged_adapters:
            raise AdapterError("Cannot pass `adapter_names` when there are merged adapters, please call "
                               "`unmerge_adapter` first. (per-row routing needs the unmerged weights)")
        gathered = self._gathered_delta(x, rows)
        if gathered is not None:  # one gather + two batched matmuls, however many adapters the batch holds
            return result + gathered.to(result.dtype)
        for name, idx in rows_by_adapter(rows, x.shape[0], x.device).items():
            if name == BASE_ADAPTER or name not in self.r:
                continue
            delta = self._delta_output(name, x.index_select(0, idx), result.index_select(0, idx))
            result = result.index_add(0, idx, delta)
        return result

    def _gathered_delta(self, x: torch.Tensor, rows: list[str]) -> Optional[torch.Tensor]:
        """Every row's own update in one pass (layers that support it), else None for the grouped path."""
        return None

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """W <- W + ΔW for each adapter (computed in fp32, cast back). Idempotent.

        safe_merge: if any adapter would make W non-finite, raise and leave W exactly as it was.
        A quantized base weight (QLoRA) is first made dense for good, in its compute dtype.
        """
        if safe_merge and (bad := self.non_finite_merge(adapter_names)):
            raise AdapterError(f"NaNs detected in the merged weights. The adapter {bad} seems to be broken: merging it "
                               "gives non-finite weights in this layer; the base weights were left unchanged")
        for name in self._to_merge(adapter_names):
            self._check_bias_mergeable(name)
            self._dense_base_weight()
            self._untie()
            added = VARIANTS[self.variant[name]].merged_delta(self, name, self._unmerged_matrix())
            self._write_weight(self.weight_matrix().float() + added)
            self._add_lora_bias(name, +1)
            self.merged_adapters.append(name)

    def lora_bias(self, name: str) -> Optional[torch.Tensor]:
        """B's own bias (PEFT's lora_bias), or None."""
        return getattr(getattr(self, self.factor_names[1])[name], "bias", None)

    def _check_bias_mergeable(self, name: str) -> None:
        if self.lora_bias(name) is not None and getattr(self.base_layer, "bias", None) is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias. "
                               f"Adapter {name!r} keeps its bias on lora_B: use it unmerged")

    def _add_lora_bias(self, name: str, sign: int) -> None:
        """base bias += sign · scaling · B.bias (a merge of lora_bias, or its undoing)."""
        bias = self.lora_bias(name)
        if bias is not None:
            base_bias = self.base_layer.bias
            merged = base_bias.float() + sign * self.scaling[name] * bias.float()
            base_bias.data.copy_(merged.to(base_bias.dtype))

    def _untie(self) -> None:
        """Before a merge into a weight another module shares (a tied embedding and head): merge into a copy of
        its own, and turn the configs' tie_word_embeddings off so a saved merged model keeps them apart. The
        shared tensor is kept, untouched, for unmerge to put back."""
        if self.tied is not None and "shared" not in self.tied:
            shared = self.base_layer.weight
            self.tied["shared"] = shared
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            for config in self.tied["configs"]:
                config.tie_word_embeddings = False

    def _retie(self) -> None:
        """After the last unmerge: the shared tensor back (exactly the original), and the tie flags."""
        if self.tied is not None and "shared" in self.tied and not self.merged_adapters:
            self.base_layer.weight = self.tied.pop("shared")
            for config in self.tied["configs"]:
                config.tie_word_embeddings = True

    def _to_merge(self, adapter_names: Optional[Sequence[str]]) -> list[str]:
        names = adapter_names if adapter_names is not None else self.active_adapters
        return [n for n in names if n not in self.merged_adapters and n in self.r]

    @torch.no_grad()
    def non_finite_merge(self, adapter_names: Optional[Sequence[str]] = None) -> Optional[str]:
        """The first adapter whose merge would leave a non-finite weight (in W's dtype), else None. Tried on a
        dense copy of W (one layer's worth of memory); the layer is left exactly as it was, a 4-bit W too."""
        to_merge = self._to_merge(adapter_names)
        if not to_merge:
            return None
        weight, merged, state, tied = self.base_weight(), list(self.merged_adapters), dict(self._merge_state), \
            self.tied
        trial = weight.get_original_weight() if is_quantized_weight(weight) else weight.detach().clone()
        bias = getattr(self.base_layer, "bias", None)
        bias_copy = bias.detach().clone() if bias is not None else None
        self._set_base_weight(nn.Parameter(trial, requires_grad=False))
        self.tied = None
        try:
            for name in to_merge:
                self.merge([name])
                if not torch.isfinite(self.base_weight()).all() or (
                        bias is not None and not torch.isfinite(bias).all()):
                    return name
            return None
        finally:
            self._set_base_weight(weight)
            self.tied = tied
            if bias is not None:
                bias.data.copy_(bias_copy)
            self.merged_adapters[:], self._merge_state = merged, state

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge."""
        if self.merged_adapters:
            self._write_weight(self._unmerged_matrix())
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._merge_state.pop(name, None)
            self._add_lora_bias(name, -1)
        self._retie()

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """The base weight as it was before the merges (fp32, in its own layout), computed; W is left as it is."""
        return self._to_weight_layout(self._unmerged_matrix()).reshape(self.base_weight().shape)

    def _unmerged_matrix(self) -> torch.Tensor:
        """The canonical fp32 weight W before the merges. Each merged adapter added (f − 1)·W + f·ΔW (f: DoRA's row
        factor kept at its merge, 1 for plain LoRA; see the variants' merged_delta), so from the weight now,
        W = (W_now − Σ f·ΔW) / (1 + Σ (f − 1))."""
        W = self.weight_matrix().float()
        if not self.merged_adapters:
            return W
        added, scale = torch.zeros_like(W), torch.ones(W.shape[0], dtype=W.dtype, device=W.device)
        for name in self.merged_adapters:
            factor = self._merge_state.get(name)
            delta = self.delta_weight(name)
            if factor is None:
                added += delta
            else:
                added += factor[:, None] * delta
                scale += factor - 1
        return (W - added) / scale[:, None]

    @torch.no_grad()
    def _dense_base_weight(self) -> None:
        """Replace a quantized base weight by its dense values: rounding W + ΔW back to 4 bits would lose
        most of ΔW, and unmerge could not restore W."""
        weight = self.base_weight()
        if is_quantized_weight(weight):
            self._set_base_weight(nn.Parameter(weight.get_original_weight(), requires_grad=False))

    @torch.no_grad()
    def _write_weight(self, matrix: torch.Tensor) -> None:
        weight = self.base_weight()
        weight.data.copy_(self._to_weight_layout(matrix).reshape(weight.shape).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"adapters={ {n: self.r[n] for n in self.r} }, active={self.active_adapters}"


def module_weight(module: nn.Module) -> torch.Tensor:
    """The weight a LoRA target adapts: a LoRA layer's base weight, an nn.MultiheadAttention's in_proj_weight,
    else the module's `.weight`."""
    if isinstance(module, LoraLayer):
        return module.base_weight()
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight
    return module.weight


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """A quantized weight (torchao's NF4Tensor, made by lorakit.quant), recognised by the method that
    dequantizes it, so the core never imports a quantization library."""
    return callable(getattr(weight, "get_original_weight", None))


def _accept_base_keys(module, state_dict, prefix, *args) -> None:
    """A plain model's state dict loads into its wrapped layers, and one saved while lorakit held a DoRA
    magnitude as a bare parameter (not PEFT's module with .weight) still loads."""
    for pname, _ in module.base_layer.named_parameters(recurse=False):
        old, new = prefix + pname, prefix + "base_layer." + pname
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
    for name, magnitude in module.lora_magnitude_vector.items():
        old = f"{prefix}lora_magnitude_vector.{name}"
        if old in state_dict and old + ".weight" not in state_dict:
            state_dict[old + ".weight"] = state_dict.pop(old).reshape(magnitude.weight.shape)


_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


class LoraLinear(LoraLayer):
    """LoRA for nn.Linear and GPT-2's Conv1D (fan_in_fan_out: weight stored as (in, out))."""

    output_unused_in_recompute = False
    """Set by lorakit.fast.recompute.mark_recompute_outputs: its layer's checkpoint recompute discards
    this module's output, so the fused forward skips the base matmul there."""

    def _features(self) -> tuple[int, int]:
        w = self.base_layer.weight
        return (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])

    def _make_factors(self, name: str, r: int, bias: bool = False) -> None:
        in_f, out_f = self._features()
        self.lora_A[name] = nn.Linear(in_f, r, bias=False)
        self.lora_B[name] = nn.Linear(r, out_f, bias=bias)

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B[name](self.lora_A[name](x))  # (..., in) -> (..., r) -> (..., out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = None if args or kwargs else self.fused_args(x)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        return lora_linear(x, *fused)  # W x + b + s·B A dropout(x) in one node

    def fused_args(self, x: torch.Tensor, name: Optional[str] = None) -> Optional[tuple]:
        """The arguments after x of `lora_linear` (W, b, A, B, scaling, dropped, output_unused, factors) that compute
        this layer's output on x, or None where the fused function does not (see _fusable_adapter; `name`:
        what it returned for x, when the caller has asked it already)."""
        name = name or self._fusable_adapter(x)
        if name is None:
            return None
        base, a, b = self._linear_parts(name)
        dropout = self.lora_dropout[name]
        dropped = dropout(x) if self.training and not isinstance(dropout, nn.Identity) else None
        scaling = self.scaling[name]
        unused = self.output_unused_in_recompute and recomputing()
        return base.weight, base.bias, a, b, scaling, dropped, unused, self._factors(name, a, b, scaling, x.dtype)

    def _linear_parts(self, name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """(base layer, A, B) of adapter `name`, read from the module dicts directly: the fused path asks for
        them on every call, and nn.Module's attribute fallback costs about a microsecond a lookup."""
        modules = self._modules
        a = modules["lora_A"]._modules[name]._parameters["weight"]
        return modules["base_layer"], a, modules["lora_B"]._modules[name]._parameters["weight"]

    def _factors(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """compute_factors(A, B, scaling, dtype), kept within training while A and B are unchanged (the forward and
        a checkpoint recompute share it): any torch optimizer's step counts (fused AdamW writes without bumping
        tensor versions), an in-place change through the parameter bumps its version, new storage moves its
        pointer. Without gradients (inference, evaluation) they are computed at each call: code that writes the
        factors through `.data` (PEFT's hotswap helpers, users' own loops) bumps no version, and a cast of A and B
        costs little next to the base matmul. A tensor scaling (PEFT's compiled hotswap) is keyed on its version."""
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # (compiled: no data_ptr guards)
            return compute_factors(a, b, scaling, dtype)
        scale_key = (id(scaling), scaling._version) if isinstance(scaling, torch.Tensor) else scaling
        key = (_optimizer_steps(), a._version, b._version, a.data_ptr(), b.data_ptr(), scale_key, dtype)
        cached = self._factor_cache.get(name)
        if cached is None or cached[0] != key:
            cached = self._factor_cache[name] = (key, compute_factors(a, b, scaling, dtype))
        return cached[1]

    def _fusable_adapter(self, x: torch.Tensor) -> Optional[str]:
        """The one active plain-LoRA adapter when the fused function computes exactly this layer's output:
        a frozen nn.Linear base, no merge or per-row routing, and one dtype for input, base and factors
        (under autocast: input and base in autocast's dtype, factors in any, as autocast casts them)."""
        active = [n for n in self.active_adapters if n in self.r]
        if len(active) != 1 or self.disabled or self.merged_adapters or self.fan_in_fan_out:
            return None
        name = active[0]
        base, a, b = self._linear_parts(name)
        if self.variant[name] != "lora" or type(base) is not nn.Linear or ROW_ADAPTERS.get() is not None:
            return None
        if self._modules["lora_B"]._modules[name].bias is not None:
            return None  # lora_bias: the fused function has no term for B's bias
        weight = base.weight
        if weight.requires_grad or type(weight) not in _PLAIN_TENSORS or type(a) not in _PLAIN_TENSORS:
            return None  # e.g. a 4-bit tensor subclass (QLoRA) or a sharded one
        if x.dtype != weight.dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return name if torch.get_autocast_dtype(x.device.type) == x.dtype else None
        return name if a.dtype == b.dtype == x.dtype else None

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias."""
        return F.linear(x, self.weight_matrix().to(x.dtype))

    def _gathered_delta(self, x: torch.Tensor, rows: list[str]) -> Optional[torch.Tensor]:
        """Punica/S-LoRA style: each row's (A, B) gathered from stacks, then two batched matmuls.

        Row i's arithmetic uses only row i's input and its own adapter's factors, whatever else is in the
        batch, so a request's output does not depend on its neighbours. Plain LoRA in eval mode only.
        """
        names = _expand_rows(rows, x.shape[0])
        if x.dim() < 2:
            return None
        a_t, b_t, slots, has_dora = self._stacked_factors()  # (n+1, in, R), (n+1, R, out); slot 0 = none
        used = set(names)
        if has_dora and any(self.variant.get(n) == "dora" for n in used):
            return None
        if any(self.lora_bias(n) is not None for n in used if n in self.r):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for n in used if n in self.r for p in self.factor_params(n)):
            return None  # training: the stacks are copies, gradients must reach the parameters themselves
        if self.training and any(not isinstance(self.lora_dropout[n], nn.Identity) for n in used if n in self.r):
            return None
        idx = torch.tensor([slots.get(n, 0) for n in names], device=x.device)  # (batch,) each row's slot
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_t.dtype)  # (batch, tokens, in)
        low = torch.bmm(flat, a_t.index_select(0, idx))  # (batch, tokens, R)
        out = torch.bmm(low, b_t.index_select(0, idx))  # (batch, tokens, out), scaling folded into B
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], bool]:
        """All adapters' A^T and (scaling * B)^T stacked and zero-padded to the largest rank; rebuilt
        only when an adapter is added, removed, replaced or changed (its tensors' versions or storage)."""
        modules = (tuple(self.lora_A.items()), tuple(self.lora_B.items()), tuple(self.scaling.items()))
        cached = self.__dict__.get("_stacks")
        if cached is not None and cached[0] == modules and cached[1] == _tensor_state(cached[2]):
            return cached[3]
        params = [(n, self.lora_A[n].weight, self.lora_B[n].weight) for n, _ in modules[0]]
        in_f, out_f = self._features()
        rank = max([a.shape[0] for _, a, _ in params], default=1)
        ref = params[0][1] if params else self.base_layer.weight
        a_t = torch.zeros(len(params) + 1, in_f, rank, dtype=ref.dtype, device=ref.device)
        b_t = torch.zeros(len(params) + 1, rank, out_f, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for slot, (n, a, b) in enumerate(params, start=1):
                a_t[slot, :, :a.shape[0]] = a.T  # (in, r)
                b_t[slot, :b.shape[1], :] = (self.scaling[n] * b).T  # (r, out)
        slots = {n: i for i, (n, _, _) in enumerate(params, start=1)}
        tensors = [t for _, a, b in params for t in (a, b)]
        value = (a_t, b_t, slots, any(v == "dora" for v in self.variant.values()))
        self.__dict__["_stacks"] = (modules, _tensor_state(tensors), tensors, value)
        return value


def _tensor_state(tensors: list[torch.Tensor]) -> tuple:
    """What changes when tensors are written in place (versions, optimizer steps) or given new storage
    (pointers)."""
    return _optimizer_steps(), tuple(map(_VERSION, tensors)), tuple(map(torch.Tensor.data_ptr, tensors))


_VERSION = operator.attrgetter("_version")
_STEPS = [0]  # optimizer steps taken in this process, by any torch.optim.Optimizer


def _optimizer_steps() -> int:
    return _STEPS[0]


def _count_step(optimizer, args, kwargs) -> None:
    """Fused optimizers (torch's fused AdamW/Adam/SGD) write parameters without bumping their version
    counters, so the caches keyed on versions also key on this count, which every step moves."""
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


from .conv_layer import LoraConv  # noqa: E402  (defined beside; imported here for older import paths)
from .embedding_layer import LoraEmbedding  # noqa: E402
