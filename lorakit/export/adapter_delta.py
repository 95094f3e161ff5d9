"""Each adapted layer of a loaded adapter: its factors, its scaling, and the exact weight difference it makes.

Exporters read adapters through a model that holds them (`PeftModel.from_pretrained(base, folder)`), so every
variant (plain LoRA, rsLoRA, rank/alpha patterns, DoRA) is interpreted by the same code that trains and merges it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..lora.inject import ModulesToSave, lora_layers
from ..lora.layer import LoraEmbedding, LoraLayer, LoraLinear
from ..lora.variants import VARIANTS


@dataclass
class AdaptedLayer:
    """One module an adapter changes."""

    module: str
    """The transformers module name, e.g. `model.layers.0.self_attn.q_proj`."""
    kind: str
    """"linear", "embedding" or "conv"."""
    variant: str
    """"lora" or "dora"."""
    A: torch.Tensor
    """(r, in) fp32 copy (for an embedding: (r, vocab))."""
    B: torch.Tensor
    """(out, r) fp32 copy (for an embedding: (dim, r))."""
    scaling: float
    """alpha / r (alpha / sqrt(r) with rsLoRA)."""
    layer: LoraLayer

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def _kind(layer: LoraLayer) -> str:
    if isinstance(layer, LoraEmbedding):
        return "embedding"
    if isinstance(layer, LoraLinear) and not layer.fan_in_fan_out:
        return "linear"
    return "conv"


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapted_layers(model: nn.Module, adapter: str = "default") -> list[AdaptedLayer]:
    """Every layer `adapter` changes, in module order."""
    out = []
    for name, layer in lora_layers(base_model_of(model)):
        if adapter not in layer.r:
            continue
        A, B = layer.factor_matrices(adapter)
        out.append(AdaptedLayer(name, _kind(layer), layer.variant[adapter], A.detach().float().clone(),
                                B.detach().float().clone(), float(layer.scaling[adapter]), layer))
    return out


@torch.no_grad()
def exact_delta(item: AdaptedLayer, adapter: str = "default") -> torch.Tensor:
    """W' - W as a canonical (out, in) fp32 matrix: what merging `adapter` adds to this layer's weight, for any
    variant (for DoRA it is not low-rank: the magnitude rescales every row of W). The layer is left as it was."""
    layer = item.layer
    W = layer._unmerged_matrix()  # the frozen weight as it was before any merge
    state = dict(layer._merge_state)
    try:
        return VARIANTS[item.variant].merged_delta(layer, adapter, W)  # (out, in)
    finally:
        layer._merge_state = state


def saved_modules(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module]]:
    """(module name, trained copy) for each `modules_to_save` module (a trained head, a resized embedding)."""
    out = []
    for name, module in base_model_of(model).named_modules():
        if isinstance(module, ModulesToSave) and adapter in module.modules_to_save:
            out.append((name, module.modules_to_save[adapter]))
    return out
