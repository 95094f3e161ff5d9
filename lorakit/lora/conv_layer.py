"""LoRA for nn.Conv1d/2d/3d, grouped convolutions included (PEFT's layout and rules).

A is a conv with the base's kernel (r filters over all input channels), B a 1x1 conv from r to the output
channels with the base's groups. With groups G > 1, output channel o only sees the r/G ranks of its group,
so the update is not a (out, in/G · k) matrix the base weight could absorb: as in PEFT, r must divide by G
and merging is refused.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import AdapterError
from .layer import LoraLayer


class LoraConv(LoraLayer):
    """LoRA for nn.Conv1d/2d/3d: A is a conv with the base's kernel (r filters), B a 1x1 conv to out."""

    def _make_factors(self, name: str, r: int, bias: bool = False) -> None:
        base = self.base_layer
        groups = base.groups
        if r % groups:
            raise AdapterError(
                f"Targeting a {type(base).__name__} with groups={groups} and rank {r}. Currently, support is limited "
                "to conv layers where the rank is divisible by groups. Either choose a different rank or do not "
                "target this specific layer.")
        if groups > 1 and not self.r.keys() - {name}:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        conv = type(base)
        ones = (1,) * len(base.kernel_size)
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                 base.dilation, bias=False, padding_mode=base.padding_mode)
        self.lora_B[name] = conv(r, base.out_channels, ones, ones, groups=groups, bias=bias)

    @property
    def grouped(self) -> bool:
        return self.base_layer.groups > 1

    def weight_matrix(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.view(w.shape[0], -1)

    def _to_weight_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.base_layer.weight.shape)

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *([1] * len(self.base_layer.kernel_size)))

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B[name](self.lora_A[name](x))  # (b, in, *sp) -> (b, r, *sp') -> (b, out, *sp')

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return base._conv_forward(x, base.weight.to(x.dtype), None)

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · B @ A as (out, in_flat). Grouped: the matrix PEFT's DoRA normalises by, B (out·r/G/r, r) @ A
        (r, in·k) read in W's (out, in/G·k) layout, so a DoRA adapter's magnitudes mean the same in both
        libraries; it is not an update W could absorb (merging grouped convs is refused)."""
        if not self.grouped:
            return super().delta_weight(name, dtype)
        A, B = self.factor_params(name)
        r = A.shape[0]
        product = B.to(dtype).reshape(-1, r) @ A.to(dtype).reshape(r, -1)
        return self.scaling[name] * product.reshape(self.weight_matrix().shape)

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        if self.grouped and self._to_merge(adapter_names):
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1! lorakit (as "
                                      "PEFT) keeps grouped-conv adapters unmerged: use the model without merging")
        super().merge(adapter_names, safe_merge=safe_merge)


class LoraConv1d(LoraConv):
    """LoRA for nn.Conv1d (one class per dimension, as PEFT has, so code that asks which kind it is can tell)."""


class LoraConv2d(LoraConv):
    """LoRA for nn.Conv2d."""


class LoraConv3d(LoraConv):
    """LoRA for nn.Conv3d."""


CONV_LAYERS = {nn.Conv1d: LoraConv1d, nn.Conv2d: LoraConv2d, nn.Conv3d: LoraConv3d}
"""The LoRA layer class for each convolution type."""
