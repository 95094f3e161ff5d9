"""Code written against PEFT's LoRA layer classes sees lorakit's layers as theirs, when peft is loaded.

Libraries and scripts find LoRA layers with `isinstance(module, peft.tuners.lora.LoraLayer)` (or PEFT's
`BaseTunerLayer`, or its per-type `Linear` / `Embedding`): transformers' adapter integration, PEFT's hotswap
helpers, users' own loops. PEFT's layer classes are abstract base classes, so lorakit's layers are registered as
their virtual subclasses: isinstance answers True, nothing of PEFT's is inherited or imported by lorakit. lorakit's
layers carry PEFT's attribute names (lora_A / lora_B module dicts, r, lora_alpha, scaling, merged_adapters,
active_adapters, get_base_layer ...) for such code to read.

Registration happens only when peft is already imported in this process (the core depends on torch and
safetensors only): each new lorakit layer checks, so a peft imported before the adapters are made is seen.
"""
from __future__ import annotations

import sys

_registered = [False]


def register_with_peft() -> None:
    """Register lorakit's layer classes under PEFT's, once, if peft's LoRA layer module is loaded."""
    if _registered[0]:
        return
    peft_layers = sys.modules.get("peft.tuners.lora.layer")
    if peft_layers is None:
        return
    from .attention_layer import LoraMultiheadAttention
    from .conv_layer import LoraConv1d, LoraConv2d, LoraConv3d
    from .layer import LoraEmbedding, LoraLayer, LoraLinear
    pairs = [("LoraLayer", LoraLayer), ("Linear", LoraLinear), ("Embedding", LoraEmbedding), ("Conv1d", LoraConv1d),
             ("Conv2d", LoraConv2d), ("Conv3d", LoraConv3d), ("MultiheadAttention", LoraMultiheadAttention)]
    for peft_name, ours in pairs:
        theirs = getattr(peft_layers, peft_name, None)
        if theirs is not None and hasattr(theirs, "register"):  # an ABC (PEFT's BaseTunerLayer descends from ABC)
            theirs.register(ours)
    _registered[0] = True
