"""Put the Triton kernels into a transformers Llama-family model, where they compute the same thing.

Per module instance: the RMSNorms and the SwiGLU MLPs get a forward that takes the kernel on tensors
it can run on (CUDA; see `triton_runs`) and the model's own code otherwise. Rotary embedding is a
function the attention calls by its module-level name, so that name is wrapped (once per modeling
module) the same way: kernel where it runs, transformers' function otherwise.
"""
from __future__ import annotations

import functools
import importlib

import torch
from torch import nn

from lorakit.fast.kernels.rms_norm import rms_norm
from lorakit.fast.kernels.rotary import rotary, rotary_supported
from lorakit.fast.kernels.runtime import HAS_TRITON, triton_runs
from lorakit.fast.kernels.swiglu import silu_mul
from lorakit.fast.lora_linear import lora_linear, lora_linear_pair

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""transformers model types whose RMSNorm, MLP and rotary embedding are the ones the kernels compute."""
NORMS = {f"{name}RMSNorm" for name in ("Llama", "Mistral", "Qwen2", "Qwen3")}
MLPS = {f"{name}MLP" for name in ("Llama", "Mistral", "Qwen2", "Qwen3")}


def _norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if triton_runs(x) and not self.weight.requires_grad:
        return rms_norm(x, self.weight, self.variance_epsilon)
    return type(self).forward(self, x)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = _gate_and_up(self, x)
    if triton_runs(gate) and gate.shape == up.shape and gate.dtype == up.dtype:
        return self.down_proj(silu_mul(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def _gate_and_up(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_proj(x) and up_proj(x): one fused node for two LoRA layers where it fits (lora_linear_pair).
    Each layer's fused arguments (its dropout mask included) are made once, in the plain path's order."""
    from lorakit.lora.layer import LoraLinear

    projections = (mlp.gate_proj, mlp.up_proj)
    args = [p.fused_args(x) if type(p) is LoraLinear else None for p in projections]
    if None not in args:
        pair = lora_linear_pair(x, *args)
        if pair is not None:
            return pair
    gate, up = (lora_linear(x, *a) if a is not None else p(x) for p, a in zip(projections, args))
    return gate, up


def _wrap_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim == 1 and triton_runs(q) and rotary_supported(q, k, cos, sin):
            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.lorakit_original = original
    return apply_rotary_pos_emb


def use_fast_kernels(model: nn.Module) -> list[str]:
    """Route `model`'s RMSNorms, SwiGLU MLPs and rotary embedding through the Triton kernels where they
    run (CUDA tensors, Triton installed); every other call computes exactly what it did. Returns what was
    switched (e.g. ["rms_norm x33", "silu_mul x16", "rotary"]); empty for other model types or without
    Triton. Norms whose weight trains and non-SiLU MLPs keep their own forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if not HAS_TRITON or model_type not in FAMILIES:
        return []
    norms = mlps = 0
    for module in base.modules():
        name = type(module).__name__
        if name in NORMS and hasattr(module, "variance_epsilon"):
            module.forward = functools.partial(_norm_forward, module)  # a partial pickles, a bound method not
            norms += 1
        elif name in MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = functools.partial(_mlp_forward, module)
            mlps += 1
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    if current is not None and not hasattr(current, "lorakit_original"):
        modeling.apply_rotary_pos_emb = _wrap_rotary(current)
    switched = [f"rms_norm x{norms}", f"silu_mul x{mlps}"]
    return switched + (["rotary"] if current is not None else [])
