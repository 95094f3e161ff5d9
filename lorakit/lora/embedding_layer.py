"""LoRA for nn.Embedding (PEFT's lora.Embedding layout: lora_embedding_A (r, V), lora_embedding_B (d, r))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from .layer import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA for nn.Embedding: A (r, num_embeddings) is looked up, then B (dim, r) projects.

    Canonically the embedding is a linear map from one-hot ids, so W_canonical = weight.T.
    """

    factor_names = ("lora_embedding_A", "lora_embedding_B")
    _factor_store = nn.ParameterDict

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = True):
        super().__init__(base_layer, fan_in_fan_out=True)

    def _make_factors(self, name: str, r: int, bias: bool = False) -> None:
        if bias:
            raise AdapterError("lora_bias=True is not supported for Embedding layers (as in PEFT); exclude the "
                               "embedding from target_modules or set lora_bias=False")
        num, dim = self.base_layer.weight.shape
        # drawn as PEFT draws them (then overwritten by the init), so one seed gives PEFT's factors here too
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r))

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)  # (batch, seq, r)
        return after_a @ self.lora_embedding_B[name].T  # (batch, seq, dim)

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """W x for one-hot ids: the rows looked up (DoRA's W x_d)."""
        base = self.base_layer
        return F.embedding(x, base.weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)
