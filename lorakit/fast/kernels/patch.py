"""Put the Triton kernels into a transformers Llama-family model, where they compute the same thing.

Per module instance: the RMSNorms and the SwiGLU MLPs get a forward that takes the kernel on tensors
it can run on (CUDA; see `triton_runs`), for norms elsewhere the kernel's equations in torch ops,
and the model's own code otherwise. Rotary embedding is a
function the attention calls by its module-level name, so that name is wrapped (once per modeling
module) the same way: kernel where it runs, the kernel's arithmetic in torch ops elsewhere (fewer passes
than transformers' function, same values), transformers' function for shapes neither takes.

The LoRA projections that read the same input run as one fused node (lorakit.fast.lora_linear_group) on
every device: the MLP's gate and up inside its forward; the attention's q, k and v made before the
attention's own forward runs, each projection handing back its output when that forward calls it.
"""
from __future__ import annotations

import functools
import importlib

import torch
from torch import nn

from lorakit.fast.kernels.rms_norm import rms_norm, rms_norm_torch
from lorakit.fast.kernels.rotary import rotary, rotary_supported, rotary_torch
from lorakit.fast.kernels.runtime import triton_runs
from lorakit.fast.kernels.swiglu import silu_mul
from lorakit.fast.lora_linear import lora_linear, lora_linear_group

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""transformers model types whose RMSNorm, MLP and rotary embedding are the ones the kernels compute."""
NORMS = {f"{name}RMSNorm" for name in ("Llama", "Mistral", "Qwen2", "Qwen3")}
MLPS = {f"{name}MLP" for name in ("Llama", "Mistral", "Qwen2", "Qwen3")}
ATTENTIONS = {f"{name}Attention" for name in ("Llama", "Mistral", "Qwen2", "Qwen3")}


def _norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if not weight.requires_grad:
        if triton_runs(x):
            return rms_norm(x, weight, self.variance_epsilon)
        if x.dtype == weight.dtype and x.dtype.is_floating_point and not torch.compiler.is_compiling():
            return rms_norm_torch(x, weight, self.variance_epsilon)
    return type(self).forward(self, x)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    projections = (self.gate_proj, self.up_proj)
    grouped = _grouped_outputs(self, projections, x)
    gate, up = (grouped[i] if i in grouped else p(x) for i, p in enumerate(projections))
    if triton_runs(gate) and gate.shape == up.shape and gate.dtype == up.dtype:
        return self.down_proj(silu_mul(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def _attention_forward(self: nn.Module, *args, **kwargs):
    """The attention's own forward, with q_proj, k_proj and v_proj's outputs on its hidden states made
    beforehand as one fused node (see _grouped_outputs); each projection hands back its own when the
    forward calls it on those same hidden states (`_projection_forward`)."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    projections = (self.q_proj, self.k_proj, self.v_proj)
    grouped = _grouped_outputs(self, projections, x)
    for i, out in grouped.items():
        projection = projections[i]
        if "forward" not in projection.__dict__:  # LoRA put in after use_fast_kernels: hand back from now on
            projection.forward = functools.partial(_projection_forward, projection)
        projection.__dict__["_lorakit_made"] = (x, out)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        for i in grouped:
            projections[i].__dict__.pop("_lorakit_made", None)


def _projection_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    made = self.__dict__.pop("_lorakit_made", None)
    if made is not None and made[0] is x and not args and not kwargs:
        return made[1]
    return type(self).forward(self, x, *args, **kwargs)


def _grouped_outputs(owner: nn.Module, projections: tuple, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """{index: output on x} for the projections that are LoRA linears the fused functions compute, as one
    node (lora_linear_group) where they fit and one fused node each otherwise; empty (call them all as
    usual) unless two or more are, or when another kind of LoRA layer is among them. Each member's fused
    arguments, dropout mask included, are made once, in the plain path's order."""
    from lorakit.lora.layer import LoraLayer, LoraLinear

    names = [p._fusable_adapter(x) if type(p) is LoraLinear else None for p in projections]
    if sum(n is not None for n in names) < 2 or any(
            n is None and isinstance(p, LoraLayer) for p, n in zip(projections, names)):
        return {}
    members = {i: p.fused_args(x, n) for i, (p, n) in enumerate(zip(projections, names)) if n is not None}
    outputs = lora_linear_group(x, list(members.values()), owner.__dict__.setdefault("_lorakit_group_cache", {}))
    if outputs is None:
        outputs = [lora_linear(x, *args) for args in members.values()]
    return dict(zip(members, outputs))


def _fast_rotary(q, k, cos, sin, *args, unsqueeze_dim=1, **kwargs):
    """The kernel's rotary (Triton where it runs, its arithmetic in torch ops elsewhere), or None where
    transformers' own function should run: other arguments, other shapes, or while torch.compile traces."""
    if args or kwargs or unsqueeze_dim != 1 or not rotary_supported(q, k, cos, sin):
        return None
    if triton_runs(q):
        return rotary(q, k, cos, sin)
    if not torch.compiler.is_compiling():  # traced, its writes into halves of one output come out
        return rotary_torch(q, k, cos, sin)  # wrong; the compiler fuses transformers' function anyway
    return None


def _wrap_rotary(original):
    """For a modeling module whose apply_rotary_pos_emb is a plain function: a function in its place."""
    @functools.wraps(original)  # its module and name: pickled by reference, it resolves to the module's name
    def apply_rotary_pos_emb(*args, **kwargs):
        out = _fast_rotary(*args, **kwargs)
        return original(*args, **kwargs) if out is None else out

    apply_rotary_pos_emb.lorakit_original = original
    return apply_rotary_pos_emb


def _rotary_module_forward(self: nn.Module, *args, **kwargs):
    """For a modeling module whose apply_rotary_pos_emb is the `kernels` package's function module
    (transformers with `kernels` installed): the forward of that same object. The object itself stays the
    module's global, because kernels rebuilds each attention's private copy of it, when a model is
    unpickled, from the type of the global of that name; its own forward still routes to a model's hub
    kernel where the fast rotary does not apply."""
    out = _fast_rotary(*args, **kwargs)
    return type(self).forward(self, *args, **kwargs) if out is None else out


def _switch_rotary(modeling) -> bool:
    """Route `modeling.apply_rotary_pos_emb` through the fast rotary, once; False where it has none."""
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if isinstance(current, nn.Module):
        if "_lorakit_rotary" not in current.__dict__:
            current.__dict__["_lorakit_rotary"] = True
            current.forward = functools.partial(_rotary_module_forward, current)  # a partial pickles
    elif not hasattr(current, "lorakit_original"):
        modeling.apply_rotary_pos_emb = _wrap_rotary(current)
    return True


def use_fast_kernels(model: nn.Module) -> list[str]:
    """Route `model`'s RMSNorms, SwiGLU MLPs and rotary embedding through the Triton kernels where they
    run (CUDA tensors, Triton installed) and norms and rotary elsewhere through the same equations in
    torch ops, and its attentions' q/k/v and MLPs' gate/up LoRA projections through one fused node each;
    every other call computes what it did. Returns what was switched (e.g. ["rms_norm x33", "silu_mul
    x16", "qkv_group x16", "rotary"]); empty for other model types. Norms whose weight trains and non-SiLU
    MLPs keep their own forward. Without Triton installed everything but the Triton kernels is switched."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        return []
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    if getattr(base, "use_kernels", False):
        # transformers (5.x, with the `kernels` package installed) kernelizes by default, and again at each
        # train()/eval() that changes the mode: that puts the class's own forward back on every hub-kernel layer
        # (the RMSNorms), over these; reset first, so no later mode change undoes them
        base.use_kernels = False
    rotary_switched = _switch_rotary(modeling)
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    original_rotary = getattr(current, "lorakit_original", None)
    norms = mlps = attentions = 0
    for module in base.modules():
        name = type(module).__name__
        if name in NORMS and hasattr(module, "variance_epsilon"):
            module.forward = functools.partial(_norm_forward, module)  # a partial pickles, a bound method not
            norms += 1
        elif name in MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = functools.partial(_mlp_forward, module)
            mlps += 1
        elif name in ATTENTIONS and all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj")):
            module.forward = functools.partial(_attention_forward, module)
            attentions += 1
        if original_rotary is not None and module.__dict__.get("rotary_fn") is original_rotary:
            # transformers 5.0 keeps the function on each attention (for its hub kernels): the original no
            # longer pickles by its module's name, the wrapper does
            module.rotary_fn = current
    switched = [f"rms_norm x{norms}", f"silu_mul x{mlps}", f"qkv_group x{attentions}"]
    return switched + (["rotary"] if rotary_switched else [])
