"""LoRA for nn.MultiheadAttention, with PEFT's layout (its lora.MultiheadAttention).

One (A, B) pair adapts the packed in-projection in_proj_weight (3·E, E): q, k and v together; the out_proj
(an nn.Linear) is wrapped as a LoraLinear holding the same adapter, so the file's keys are PEFT's:
`mha.lora_A.weight` and `mha.base_layer.out_proj.lora_A.weight`. nn.MultiheadAttention reads its weights
directly (its out_proj's forward never runs), so the forward runs the base module with W + ΔW substituted for
both weights: the same output PEFT gets by merging around each call, with the gradients reaching A and B, and the
module's parameters never changed (one forward at a time per module: the substitution is the module's state).
As in PEFT, lora_dropout does not apply here, and only q, k, v of one size (`_qkv_same_embed_dim`) are supported.

A deliberate difference: PEFT 0.21 adds out_proj's update twice, in its forward and in merge_and_unload
(W_out + 2·ΔW_out; huggingface/peft#3774, open). lorakit adds it once, so the files are PEFT's key for key, but an
adapter whose out_proj factors are not zero gives other outputs here than in PEFT 0.21.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import AdapterError
from .layer import ROW_ADAPTERS, LoraLayer, LoraLinear


class LoraMultiheadAttention(LoraLayer):
    """A frozen nn.MultiheadAttention plus LoRA on its in-projection and (through its wrapped out_proj) output."""

    weight_name = "in_proj_weight"

    def __init__(self, base_layer: nn.MultiheadAttention, fan_in_fan_out: bool = False):
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise AdapterError("Only same embed for query/key/value is supported as of now for MultiheadAttention "
                               "(kdim/vdim differ from embed_dim here); exclude this module from target_modules")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention.")
        super().__init__(base_layer)
        base_layer.out_proj = LoraLinear(base_layer.out_proj)
        self.register_load_state_dict_pre_hook(_accept_plain_out_proj_keys)

    @property
    def out_proj_layer(self) -> LoraLinear:
        return self.base_layer.out_proj

    def _make_factors(self, name: str, r: int, bias: bool = False) -> None:
        if bias:
            raise AdapterError("lora_bias=True is not supported for nn.MultiheadAttention layers; exclude them from "
                               "target_modules or set lora_bias=False")
        embed = self.base_layer.embed_dim
        self.lora_A[name] = nn.Linear(embed, r, bias=False)
        self.lora_B[name] = nn.Linear(r, 3 * embed, bias=False)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                    lora_bias: bool = False) -> None:
        if use_dora:
            raise AdapterError("MultiheadAttention does not support DoRA (yet), please set use_dora to False "
                               "(or exclude this module from target_modules)")
        if not isinstance(init_lora_weights, bool) and init_lora_weights != "gaussian":
            raise AdapterError(f"init_lora_weights={init_lora_weights!r} is not supported for MultiheadAttention "
                               "layers; use True, False or 'gaussian', or exclude this module")
        kwargs = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                      use_rslora=use_rslora, lora_bias=lora_bias)
        super().add_adapter(name, **kwargs)
        self.out_proj_layer.add_adapter(name, **kwargs)  # as PEFT: both projections, always

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.out_proj_layer.delete_adapter(name)

    def _restore_weights(self) -> None:
        """PEFT's layer re-registers the weights its merge-around-forward unregistered; lorakit never unregisters
        them, so there is nothing to restore (kept for code written against PEFT's layer)."""

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise AdapterError("a MultiheadAttention adapter has no separate branch output; it acts through its weights")

    def _summed_delta(self, layer: LoraLayer) -> torch.Tensor | None:
        """W + the sum of the active, unmerged adapters' ΔW of `layer` (in W's dtype), or None when there are none."""
        if layer.disabled or layer.merged_adapters:
            return None
        names = [n for n in layer.active_adapters if n in layer.r]
        if not names:
            return None
        weight = layer.weight_matrix()
        delta = sum(layer.delta_weight(n) for n in names)  # (out, in), fp32, carries A's and B's gradients
        return weight + delta.to(weight.dtype)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any):
        if ROW_ADAPTERS.get() is not None:
            raise TypeError("lora.MultiheadAttention does not support mixed adapter batches.")
        weights = {}
        in_proj = self._summed_delta(self)
        if in_proj is not None:
            weights[self.base_layer, "in_proj_weight"] = in_proj  # (3·E, E)
        out_proj = self._summed_delta(self.out_proj_layer)
        if out_proj is not None:
            weights[self.out_proj_layer.base_layer, "weight"] = out_proj  # (E, E)
        with _substituted(weights):
            return self.base_layer(query, *args, **kwargs)


@contextlib.contextmanager
def _substituted(weights: dict[tuple[nn.Module, str], torch.Tensor]) -> Iterator[None]:
    """Within the block, `module.name` reads the given tensor. Put in the instance dict, which attribute lookup reads
    before nn.Module's parameters (and where FSDP with use_orig_params keeps its own views, which
    torch.func.functional_call would not replace); the dict is put back as it was after."""
    saved = {key: key[0].__dict__.get(key[1], _ABSENT) for key in weights}
    try:
        for (module, name), tensor in weights.items():
            module.__dict__[name] = tensor
        yield
    finally:
        for (module, name), old in saved.items():
            if old is _ABSENT:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = old


_ABSENT = object()


def _accept_plain_out_proj_keys(module, state_dict, prefix, *args) -> None:
    """A plain model's `mha.out_proj.weight` loads into the wrapped out_proj (whose own hook then finds its
    base layer)."""
    for key in [k for k in state_dict if k.startswith(prefix + "out_proj.")]:
        state_dict[prefix + "base_layer." + key[len(prefix):]] = state_dict.pop(key)
