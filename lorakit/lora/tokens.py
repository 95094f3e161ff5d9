"""Trainable token rows (PEFT's `trainable_token_indices`): only chosen rows of an embedding train and are saved.

    LoraConfig(trainable_token_indices=[32000, 32001])                      # rows of the input embedding
    LoraConfig(trainable_token_indices={"embed_tokens": [32000], "lm_head": [32000]})   # named layers

Each adapter holds the chosen rows' values (not differences from the base: PEFT's meaning) as
`<layer>.token_adapter.trainable_tokens_delta.<adapter>`, shape (k, dim), saved under PEFT's key
`<layer>.token_adapter.trainable_tokens_delta`; the rest of the embedding stays frozen and is not saved.
Where the output head shares the input embedding's weight (tied embeddings), the head follows the input's rows
(PEFT's rule), through a wrapper that holds no rows of its own and saves nothing.

The forward looks the base layer up as usual and replaces what the chosen rows give: the embedding of those
tokens (an nn.Embedding), or their logits (an nn.Linear head). No vocabulary-sized copy of the weight is made.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterError, ConfigError, TargetError
from .layer import BASE_ADAPTER, ROW_ADAPTERS, LoraLayer, rows_by_adapter
from .targets import name_matches


class BufferStore(nn.Module):
    """Buffers by adapter name, as PEFT's BufferDict: `name in store` asks whether that adapter has one."""

    def __contains__(self, name: str) -> bool:
        return name in self._buffers


class TokenRows(nn.Module):
    """PEFT's `token_adapter`: the base layer and, per adapter, the chosen row indices, their trainable values
    (`trainable_tokens_delta`) and their original values (for unmerge, and for the base while merged)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()
        self.trainable_tokens_original = BufferStore()  # by adapter name, not saved
        self.token_indices: dict[str, list[int]] = {}


class TrainableTokens(nn.Module):
    """An nn.Embedding (or a linear output head) of which each adapter trains the rows it names."""

    adapter_layer_names = ("token_adapter.trainable_tokens_delta",)  # PEFT's names (TrainableTokensWrapper)
    other_param_names = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, tied_to: Optional["TrainableTokens"] = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TargetError(f"trainable_token_indices names a {type(base_layer).__name__}; only an embedding "
                              "(nn.Embedding) or a linear output head can train token rows")
        self.token_adapter = TokenRows(base_layer)
        self._tied_to = [tied_to] if tied_to is not None else []  # a list: not a submodule, nothing saved twice
        self.active_adapters: list[str] = []
        self.disabled = False
        self._merged: list[str] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("token_adapter", "_tied_to"):
                raise
            return getattr(self.token_adapter.base_layer, name)  # weight, embedding_dim, padding_idx ... pass through

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def rows(self) -> TokenRows:
        """The TokenRows that holds the adapters' rows: this layer's own, or the tied input embedding's."""
        return self._tied_to[0].token_adapter if self._tied_to else self.token_adapter

    @property
    def merged_adapters(self) -> list[str]:
        return self._tied_to[0].merged_adapters if self._tied_to else self._merged

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, indices: Sequence[int]) -> None:
        """Give adapter `name` the rows `indices`, starting from the base's values (PEFT's init)."""
        if self._tied_to:  # the tied input embedding holds the rows
            return
        weight = self.base_layer.weight
        _check_indices(indices, weight.shape[0], where=name)
        rows = self.token_adapter
        idx = torch.tensor(list(indices), dtype=torch.long, device=weight.device)
        original = self.unmerged_rows(idx)
        rows.token_indices[name] = list(indices)
        rows.trainable_tokens_delta[name] = nn.Parameter(original.clone(), requires_grad=True)
        rows.trainable_tokens_original.register_buffer(name, original, persistent=False)

    def delete_adapter(self, name: str) -> None:
        remerge = [n for n in self.merged_adapters if n != name]
        if name in self.merged_adapters and not self._tied_to:  # its rows out of W, the others' kept in
            self.unmerge()
            self.merge(remerge)
        if name in self.token_adapter.token_indices:
            del self.token_adapter.trainable_tokens_delta[name]
            delattr(self.token_adapter.trainable_tokens_original, name)
            del self.token_adapter.token_indices[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def has_adapter(self, name: str) -> bool:
        return name in self.rows.token_indices

    def _adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters this layer trains for `name` (none on a tied head: the input embedding's train)."""
        own = self.token_adapter.trainable_tokens_delta
        return [own[name]] if not self._tied_to and name in own else []

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """{PEFT key relative to this layer: tensor}; a tied head saves nothing (PEFT's rule)."""
        params = self._adapter_parameters(name)
        return {"token_adapter.trainable_tokens_delta": params[0]} if params else {}

    def _indices(self, name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.rows.token_indices[name], dtype=torch.long, device=device)

    def _check_disjoint(self, names: Sequence[str]) -> None:
        if len(set(names)) < 2:
            return
        seen: set[int] = set()
        for name in dict.fromkeys(names):
            rows = set(self.rows.token_indices[name])
            if seen & rows:
                raise AdapterError(f"adapter {name!r} trains token rows {sorted(seen & rows)[:8]} that another "
                                   "active or merged adapter trains too; token rows of adapters used together "
                                   "must be disjoint (as in PEFT)")
            seen |= rows

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        routed = ROW_ADAPTERS.get()
        if routed is None or self.disabled:
            wanted = [] if self.disabled else [a for a in self.active_adapters if self.has_adapter(a)]
            return self._patched(x, out, wanted)
        result = out
        for name, idx in rows_by_adapter(routed, x.shape[0], x.device).items():
            wanted = [name] if name != BASE_ADAPTER and self.has_adapter(name) else []
            result = result.index_copy(0, idx, self._patched(x.index_select(0, idx), out.index_select(0, idx), wanted))
        return result

    def _patched(self, x: torch.Tensor, out: torch.Tensor, wanted: list[str]) -> torch.Tensor:
        """`out` (the base layer's output on `x`) with the rows of the `wanted` adapters in place, and the rows of
        merged adapters that are not wanted back at their original values."""
        merged = self.merged_adapters
        self._check_disjoint(merged + wanted)
        rows = self.rows
        for name in merged:
            if name not in wanted:
                original = getattr(rows.trainable_tokens_original, name)
                out = self._replace(x, out, self._indices(name, out.device), original)
        for name in wanted:
            if name not in merged:
                out = self._replace(x, out, self._indices(name, out.device), rows.trainable_tokens_delta[name])
        return out

    def _replace(self, x: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """What the base layer gives for rows `idx` (k,) of its weight, computed with `values` (k, dim) instead."""
        base = self.base_layer
        if isinstance(base, nn.Linear):  # an output head: the logits of these tokens
            bias = base.bias.index_select(0, idx) if base.bias is not None else None
            cols = F.linear(x, values.to(x.dtype), bias)  # (..., k)
            return out.index_copy(out.dim() - 1, idx, cols.to(out.dtype))
        lookup = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=x.device)
        lookup[idx] = torch.arange(idx.numel(), device=x.device)
        pos = lookup[x]  # (batch, seq): the token's row in `values`, or -1
        scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma 3) multiply in their forward
        rows = values[pos.clamp_min(0)].to(out.dtype)  # (batch, seq, dim)
        if scale is not None:
            rows = rows * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
        return torch.where((pos >= 0).unsqueeze(-1), rows, out)

    # ------------------------------------------------------------------ merge
    def _to_merge(self, adapter_names: Optional[Sequence[str]]) -> list[str]:
        names = adapter_names if adapter_names is not None else self.active_adapters
        return [n for n in names if self.has_adapter(n) and n not in self.merged_adapters]

    def non_finite_merge(self, adapter_names: Optional[Sequence[str]] = None) -> Optional[str]:
        """The first adapter whose rows are not all finite, else None."""
        rows = self.rows.trainable_tokens_delta
        return next((n for n in self._to_merge(adapter_names) if not torch.isfinite(rows[n]).all()), None)

    @torch.no_grad()
    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Write the adapters' rows into the base weight (a tied head's weight is the input's: it follows)."""
        if self._tied_to:
            return
        names = self._to_merge(adapter_names)
        self._check_disjoint(self._merged + names)
        if safe_merge and (bad := self.non_finite_merge(names)):
            raise AdapterError(f"merging adapter {bad!r} gives non-finite token rows; the weights were left unchanged")
        weight = self.base_layer.weight
        for name in names:
            weight.index_copy_(0, self._indices(name, weight.device),
                               self.token_adapter.trainable_tokens_delta[name].to(weight.dtype))
            self._merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original rows back, last merged first."""
        if self._tied_to:
            return
        weight = self.base_layer.weight
        while self._merged:
            name = self._merged.pop()
            original = getattr(self.token_adapter.trainable_tokens_original, name)
            weight.index_copy_(0, self._indices(name, weight.device), original.to(weight.dtype))

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """The base weight as it is without any merged adapter's rows (a copy; W is left as it is)."""
        weight = self.base_layer.weight.detach().clone()
        for name in reversed(self.merged_adapters):
            weight.index_copy_(0, self._indices(name, weight.device),
                               getattr(self.rows.trainable_tokens_original, name).to(weight.dtype))
        return weight

    @torch.no_grad()
    def unmerged_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The base weight's rows `idx` as they are without any merged adapter."""
        values = self.base_layer.weight.detach().index_select(0, idx).clone()
        for name in self.merged_adapters:
            where = {t: i for i, t in enumerate(self.rows.token_indices[name])}
            for j, t in enumerate(idx.tolist()):
                if t in where:
                    values[j] = getattr(self.rows.trainable_tokens_original, name)[where[t]]
        return values

    def extra_repr(self) -> str:
        rows = self.rows.token_indices
        tied = " (tied to the input embedding)" if self._tied_to else ""
        return ", ".join(f"{n}: {len(v)} rows" for n, v in rows.items()) + tied


def _check_indices(indices: Sequence[int], size: int, where: str) -> None:
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size]
    if bad:
        raise ConfigError([f"trainable_token_indices of adapter {where!r}: {bad[:8]} are not rows of an embedding "
                           f"with {size} rows; resize the model's embeddings first "
                           "(model.resize_token_embeddings(len(tokenizer))) or fix the indices"])
    if len(set(indices)) != len(indices):
        raise ConfigError([f"trainable_token_indices of adapter {where!r} lists a row twice; list each once"])


# ---------------------------------------------------------------------- injection
def token_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """{module name: row indices} that `config.trainable_token_indices` asks for (a list means the input
    embedding), with the names of the model's modules. Raises TargetError for a name that matches nothing."""
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    wanted = dict(spec) if isinstance(spec, dict) else {input_embedding_name(model): list(spec)}
    names = [n for n, _ in model.named_modules() if n and ".token_adapter." not in n]
    out = {}
    for key, indices in wanted.items():
        hits = [n for n in names if name_matches([key], n) and not n.endswith(".token_adapter")]
        if not hits:
            raise TargetError(f"trainable_token_indices names {key!r}, which matches no module of "
                              f"{type(model).__name__}; name the embedding layer (e.g. 'embed_tokens')")
        out.update({n: list(indices) for n in hits})
    return out


def input_embedding_name(model: nn.Module) -> str:
    """The input embedding's module name (PEFT falls back on 'embed_tokens')."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if emb is not None and m is emb), "embed_tokens")


def tied_head_name(model: nn.Module, embedding: nn.Module) -> Optional[str]:
    """The output head's name when it shares the input embedding's weight, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    base = head.base_layer if isinstance(head, TrainableTokens) else head
    emb_base = embedding.base_layer if isinstance(embedding, TrainableTokens) else embedding
    if base is None or getattr(base, "weight", None) is None or base.weight is not emb_base.weight:
        return None
    return next(n for n, m in model.named_modules() if m is head)


def add_trainable_tokens(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap the layers `config.trainable_token_indices` names (or add `adapter_name` to their wrappers), and a
    tied output head as a follower of the input embedding. Returns the wrapped names (the tied head included)."""
    targets = token_targets(model, config)
    if not targets:
        return []
    input_name = input_embedding_name(model)
    tied = tied_head_name(model, model.get_submodule(input_name)) if input_name in targets else None
    if tied is not None and tied in targets:
        if targets[tied] != targets[input_name]:
            raise ConfigError([f"{input_name} and {tied} share one weight (tied embeddings), but "
                               "trainable_token_indices gives them different rows; give only the input embedding's "
                               "(the head follows it) or the same rows for both"], where="LoraConfig")
        del targets[tied]  # the head follows the input embedding
    for name, indices in targets.items():
        module = model.get_submodule(name)
        if isinstance(module, LoraLayer):
            raise ConfigError([f"{name} is in target_modules and in trainable_token_indices; LoRA on an embedding "
                               "and trained rows of it cannot be combined: choose one"], where="LoraConfig")
        if not isinstance(module, TrainableTokens):
            module = TrainableTokens(module)
            _set_submodule(model, name, module)
        module.add_adapter(adapter_name, indices)
    if tied is not None:
        head = model.get_submodule(tied)
        if not isinstance(head, TrainableTokens):
            _set_submodule(model, tied, TrainableTokens(head, tied_to=model.get_submodule(input_name)))
        return sorted(targets) + [tied]
    return sorted(targets)


def token_layers(model: nn.Module) -> list[tuple[str, TrainableTokens]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokens)]


def is_tied_follower(module: nn.Module) -> bool:
    """A tied output head's wrapper: it holds no rows of its own and saves nothing."""
    return isinstance(module, TrainableTokens) and bool(module._tied_to)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
