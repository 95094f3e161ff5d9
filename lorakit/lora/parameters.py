"""LoRA on a parameter rather than a module (PEFT's `target_parameters`, its `ParamWrapper`).

Mixture-of-experts models (transformers 5 Mixtral, Qwen3-MoE, gpt-oss ...) hold each layer's experts as fused
3-D parameters, `gate_up_proj` and `down_proj` of shape (E, out, in) (or (E, in, out) where the experts module
says `is_transposed`), not as nn.Linear modules. Each expert e gets its own low-rank update:

    W_e' = W_e + (alpha / r) · B_e A_e          A_e (r, in), B_e (out, r), e = 0 .. E-1

and a 2-D parameter (a router's weight) is the case E = 1. The forward computes every expert's W_e' at once (one
batched matmul, no loop over experts or tokens), puts it in place of the parameter for the base module's own
forward, and puts the frozen parameter back afterwards; gradients reach A and B through it.

Storage is PEFT's, so files move both ways: A is one nn.Linear(in, r·E) whose rows are expert-major
(row e·r + k), B one nn.Linear(r·E, out) whose columns are rank-major (column k·E + e). Several parameters of
one module nest, as in PEFT: the parameter registered last wraps the others, so its factors are saved under
`experts.lora_A.weight` and the inner one's under `experts.base_layer.lora_A.weight`.

Mixed batches (`adapter_names`, which PEFT refuses here): the module runs once per adapter on its rows' share of
the inputs (see LoraParameter._forward_grouped), so `lorakit serve` batches requests of several adapters.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import AdapterError, ConfigError
from .layer import BASE_ADAPTER, ROW_ADAPTERS, LoraLayer, route_rows
from .variants import init_factors

PARAMETER_INITS = (True, False, "gaussian")
"""init_lora_weights a parameter update accepts (PEFT's PiSSA/OLoRA read a module's `.weight`, which experts lack)."""


class LoraParameter(LoraLayer):
    """A module whose parameter `parameter_name` gets a low-rank update per expert, one per adapter name."""

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer, fan_in_fan_out=False)
        self.parameter_name = parameter_name
        shape = tuple(self.parameter().shape)
        if len(shape) not in (2, 3):
            raise ConfigError([f"target_parameters: {parameter_name} of {type(self.owner()).__name__} has shape "
                               f"{shape}; LoRA adapts 2-D weights and 3-D expert stacks only"])
        # (E, out, in) unless the experts module stores (E, in, out); a 2-D weight is (out, in), one "expert".
        self.transposed = len(shape) == 3 and bool(getattr(self.owner(), "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        if len(shape) == 2:
            out_features, in_features = shape
        elif self.transposed:
            in_features, out_features = shape[1:]
        else:
            out_features, in_features = shape[1:]
        self._features = (in_features, out_features)  # what in_features / out_features read

    def _io_features(self) -> tuple[int, int]:
        return self._features

    # ------------------------------------------------------------------ the parameter
    def owner(self) -> nn.Module:
        """The model's own module holding the parameter (below any other LoraParameter wrapped around it)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def parameter(self) -> torch.Tensor:
        return self.owner()._parameters[self.parameter_name]

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False) -> None:
        """Adapter `name` with rank r per expert (A: r·E rows); PEFT's limits: no dropout (x cannot be factored
        out of W'x), no DoRA, and only the inits that do not read the module's weight."""
        problems = []
        if lora_dropout:
            problems.append(f"lora_dropout={lora_dropout}: the update is folded into the weight, so there is no "
                            "separate input to drop; set lora_dropout=0")
        if use_dora:
            problems.append("use_dora=True: DoRA is not defined for parameter updates; turn it off")
        if init_lora_weights not in PARAMETER_INITS:
            problems.append(f"init_lora_weights={init_lora_weights!r}: use one of {PARAMETER_INITS}")
        if problems:
            raise ConfigError(problems, where=f"target_parameters ({self.parameter_name})")
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[name] = nn.Identity()
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)
        self.variant[name] = "lora"
        weight = self.parameter()
        for p in self._adapter_parameters(name):
            p.data = p.data.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else p.dtype)
        init_factors(self, name, init_lora_weights)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def expert_factors(self, name: str, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e (E, r, in), B_e (E, out, r)): views of PEFT's storage, cast to `dtype` when given."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r·E, in), (out, r·E)
        E = self.num_experts
        A_e = A.reshape(E, -1, A.shape[-1])  # rows expert-major: (E, r, in)
        B_e = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # columns rank-major: (out, r, E) -> (E, out, r)
        return (A_e, B_e) if dtype is None else (A_e.to(dtype), B_e.to(dtype))

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · B_e A_e for every expert, in the parameter's own layout and shape, computed in `dtype`."""
        A_e, B_e = self.expert_factors(name, dtype)
        delta = self.scaling[name] * torch.bmm(B_e, A_e)  # (E, out, r) @ (E, r, in) -> (E, out, in)
        if self.transposed:
            delta = delta.transpose(-2, -1)  # (E, in, out)
        return delta.reshape(self.parameter().shape)

    def adapted_weight(self, names: Sequence[str]) -> torch.Tensor:
        """W + Σ scaling · B_e A_e over `names`, in W's dtype: one batched multiply-add per adapter."""
        W = self.parameter()
        out = W.unsqueeze(0) if W.dim() == 2 else W  # a 2-D weight as one expert: (1, out, in)
        for name in names:
            A_e, B_e = self.expert_factors(name, W.dtype)
            lhs, rhs = (A_e.transpose(-2, -1), B_e.transpose(-2, -1)) if self.transposed else (B_e, A_e)
            out = torch.baddbmm(out, lhs, rhs, alpha=self.scaling[name])  # W_e + s · B_e A_e (in W's layout)
        return out.reshape(W.shape)

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        rows = ROW_ADAPTERS.get()
        if rows is not None and not self.disabled and len(set(rows)) > 1:
            return self._forward_grouped(rows, args, kwargs)
        return self._forward_with(self._names_for_forward(), args, kwargs)

    def _forward_with(self, names: list[str], args: tuple, kwargs: dict):
        """The base module's forward with W + Σ ΔW of `names` in place of the parameter."""
        if not names:
            return self.base_layer(*args, **kwargs)
        with self._parameter_replaced(self.adapted_weight(names)):
            return self.base_layer(*args, **kwargs)

    def _names_for_forward(self) -> list[str]:
        """The adapters whose update this forward applies (none when disabled or merged into W already)."""
        if self.disabled:
            return []
        rows = ROW_ADAPTERS.get()
        if rows is not None:  # one adapter for every row
            self._refuse_routing_when_merged()
            return [n for n in set(rows) if n != BASE_ADAPTER and n in self.r]
        if self.merged_adapters:
            return []
        return [n for n in self.active_adapters if n in self.r]

    def _refuse_routing_when_merged(self) -> None:
        if self.merged_adapters:
            raise AdapterError("Cannot pass `adapter_names` when there are merged adapters, please call "
                               "`unmerge_adapter` first. (per-row routing needs the unmerged weights)")

    def _forward_grouped(self, rows: list[str], args: tuple, kwargs: dict):
        """Rows with different adapters (PEFT refuses these): the base module runs once per adapter, on the share
        of every tensor argument's leading dim that its rows own (row-major: a (batch, seq, ...) input, or its
        (batch·seq, ...) flattening as MoE experts take it), and the outputs go back in place."""
        self._refuse_routing_when_merged()
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        n = tensors[0].shape[0] if tensors else 0
        if not n or n % len(rows) or any(t.shape[0] != n for t in tensors):
            raise AdapterError(f"adapter_names with {len(rows)} rows: cannot tell which entries of the inputs of "
                               f"{type(self.owner()).__name__} belong to which row; send one adapter per batch")
        per_row, groups = n // len(rows), {}
        for i, name in enumerate(rows):
            groups.setdefault(name, []).extend(range(i * per_row, (i + 1) * per_row))
        outputs: list = []
        for name, positions in groups.items():
            idx = torch.tensor(positions, device=tensors[0].device)
            with route_rows([name]):  # layers inside (nested wrappers) see one adapter for these rows
                part = self._forward_with([name] if name in self.r else [], tuple(_take(a, idx) for a in args),
                                          {k: _take(v, idx) for k, v in kwargs.items()})
            outputs.append((idx, part))
        return _scatter_rows(outputs, n)

    @contextlib.contextmanager
    def _parameter_replaced(self, value: torch.Tensor) -> Iterator[None]:
        """The owner module sees `value` as its parameter within the block (not thread-safe: one forward at a
        time per model, as with PEFT's parametrization)."""
        params = self.owner()._parameters
        original = params[self.parameter_name]
        params[self.parameter_name] = value
        try:
            yield
        finally:
            params[self.parameter_name] = original

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """W <- W + ΔW per adapter (in fp32, cast back). Idempotent; safe_merge leaves W as it was on a
        non-finite result."""
        if safe_merge and (bad := self.non_finite_merge(adapter_names)):
            raise AdapterError(f"merging adapter {bad!r} into {self.parameter_name} gives non-finite weights; "
                               "the base weights were left unchanged")
        W = self.parameter()
        for name in self._to_merge(adapter_names):
            W.copy_((W.float() + self.delta_weight(name)).to(W.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def non_finite_merge(self, adapter_names: Optional[Sequence[str]] = None) -> Optional[str]:
        W = self.parameter().float()
        for name in self._to_merge(adapter_names):
            W = (W + self.delta_weight(name)).to(self.parameter().dtype).float()
            if not torch.isfinite(W).all():
                return name
        return None

    @torch.no_grad()
    def unmerge(self) -> None:
        W = self.parameter()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            W.copy_((W.float() - self.delta_weight(name)).to(W.dtype))

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        W = self.parameter().float()
        for name in reversed(self.merged_adapters):
            W = W - self.delta_weight(name)
        return W

    def extra_repr(self) -> str:
        experts = f", experts={self.num_experts}" if self.num_experts > 1 else ""
        return f"parameter_name={self.parameter_name!r}{experts}, {super().extra_repr()}"


def _take(value, idx: torch.Tensor):
    """The entries `idx` of a tensor's leading dim; anything else as it is."""
    return value.index_select(0, idx) if isinstance(value, torch.Tensor) else value


def _scatter_rows(parts: list[tuple[torch.Tensor, object]], n: int):
    """Put each group's outputs (a tensor, or a tuple of them, whose leading dim is k per input entry) back at
    its entries' places in outputs for all n entries."""
    first = parts[0][1]
    if isinstance(first, (tuple, list)):
        return type(first)(_scatter_rows([(idx, out[i]) for idx, out in parts], n) for i in range(len(first)))
    if not isinstance(first, torch.Tensor):
        raise AdapterError(f"per-row adapters through a module returning {type(first).__name__}: send one adapter "
                           "per batch")
    result = None
    for idx, out in parts:
        k = out.shape[0] // len(idx)
        rows = (idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1)  # (len(idx)·k,)
        result = out.new_empty((n * k,) + out.shape[1:]) if result is None else result
        result[rows] = out
    return result


def wrapped_parameter(module: nn.Module, parameter_name: str) -> Optional[LoraParameter]:
    """The LoraParameter (in a nest of them) that adapts `parameter_name`, or None."""
    while isinstance(module, LoraParameter):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def owner_of(module: nn.Module) -> nn.Module:
    """The model's own module under a nest of LoraParameters (the module itself when it is not wrapped)."""
    return module.owner() if isinstance(module, LoraParameter) else module


ADAPTER_INTERNALS = ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
                     "lora_magnitude_vector", "modules_to_save", "original_module", "token_adapter")


def find_target_parameters(model: nn.Module, target_parameters: Optional[Sequence[str]]) -> list[tuple[str, str]]:
    """(module name, parameter name) of every parameter `target_parameters` names, by PEFT's rule: the parameter's
    full name (wrappers' '.base_layer' left out) equals an entry or ends with '.' + entry. In module order, and
    within a module in the order it registers its parameters (which decides how wrappers nest, as in PEFT)."""
    wanted = sorted(set(target_parameters or []))
    found: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraParameter) or any(p in ADAPTER_INTERNALS for p in name.split(".")):
            continue
        module_name = ".".join(p for p in name.split(".") if p != "base_layer")
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{pname}" if module_name else pname
            if any(key == t or key.endswith("." + t) for t in wanted) and (module_name, pname) not in found:
                found.append((module_name, pname))
    return found


def inject_parameters(model: nn.Module, config, adapter_name: str, modules_matched: bool = False) -> list[str]:
    """Add adapter `adapter_name` to every parameter `config.target_parameters` names; returns their full names.
    When none matches but target_modules adapted some module (`modules_matched`), a RuntimeWarning, as PEFT.

    Raises:
        TargetError: nothing matched (and no module either), a parameter sits on the model itself, or its module
            already has LoRA as a module (target it one way only).
    """
    import warnings

    from ..errors import TargetError

    found = find_target_parameters(model, config.target_parameters)
    if config.target_parameters and not found:
        hint = (f"they matched no parameter of {type(model).__name__}; give names such as "
                "'mlp.experts.gate_up_proj' (see model.named_parameters())")
        if modules_matched:
            warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched. "
                          f"({hint})", RuntimeWarning, stacklevel=5)
            return []
        lead = ("No `target_modules` passed but also no `target_parameters` found. Please check the values for these "
                "arguments." if not config.target_modules else
                f"Target modules {config.target_modules} not found in the base model, nor target_parameters.")
        raise TargetError(f"{lead} target_parameters={config.target_parameters}: {hint}")
    for module_name, pname in found:
        if not module_name:
            raise TargetError(f"target_parameters: {pname} belongs to the model itself, not to a sub-module; "
                              "LoRA can adapt parameters of sub-modules only")
        top = model.get_submodule(module_name)
        if isinstance(top, LoraLayer) and not isinstance(top, LoraParameter):
            raise TargetError(f"Trying to wrap an `nn.Parameter` of layer '{module_name}' of type "
                              f"{type(top.get_base_layer()).__name__}, which is not a valid target. Make sure that "
                              f"this layer is not also targeted with `target_modules` (target_parameters names its "
                              f"{pname}): target it one way only")
        layer = wrapped_parameter(top, pname)
        if layer is None:
            layer = LoraParameter(top, pname)
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        key = f"{module_name}.{pname}"
        layer.add_adapter(adapter_name, r=config.rank_for(key), lora_alpha=config.alpha_for(key),
                          lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
                          use_rslora=config.use_rslora, use_dora=config.use_dora)
    return [f"{m}.{p}" for m, p in found]


def parameter_targets_summary(model: nn.Module) -> Optional[str]:
    """One line naming the parameters that have LoRA (layer numbers folded), their experts and adapter sizes;
    None when no parameter has LoRA."""
    import re

    groups: dict[str, list[int]] = {}  # name pattern -> [count, experts, adapter parameters]
    for name, module in model.named_modules():
        if isinstance(module, LoraParameter):
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")  # as the model names it
            key = re.sub(r"\.\d+\.", ".*.", f"{name}.{module.parameter_name}")
            size = sum(p.numel() for a in module.r for p in module._adapter_parameters(a))
            g = groups.setdefault(key, [0, module.num_experts, 0])
            g[0], g[2] = g[0] + 1, g[2] + size
    if not groups:
        return None
    parts = [f"{key} (x{n}{f', {e} experts each' if e > 1 else ''}, {size:,d} LoRA params)"
             for key, (n, e, size) in groups.items()]
    return "LoRA on parameters: " + "; ".join(parts)


def parameter_lora_size(shape: Sequence[int], r: int) -> int:
    """Adapter parameters of rank-r LoRA on a parameter of this shape: r · E · (in + out), E = 1 for 2-D."""
    experts = shape[0] if len(shape) == 3 else 1
    return r * experts * (shape[-1] + shape[-2])


def target_parameters_size(model: nn.Module, config) -> int:
    """Adapter parameters `config.target_parameters` would add to `model` (rank_pattern honoured)."""
    total = 0
    for module_name, pname in find_target_parameters(model, config.target_parameters):
        shape = owner_of(model.get_submodule(module_name))._parameters[pname].shape
        total += parameter_lora_size(shape, config.rank_for(f"{module_name}.{pname}"))
    return total
