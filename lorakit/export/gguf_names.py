"""How llama.cpp names and lays out a transformers model's tensors.

The names come from the `gguf` package's `TensorNameMap` (the table llama.cpp's convert_hf_to_gguf.py uses):
`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q`. For the `llama` architecture (Llama, Mistral, SmolLM)
llama.cpp's converter also reorders the rows of q_proj and k_proj (`LlamaModel.permute`: its RoPE pairs
neighbouring dimensions where transformers pairs the two halves of each head); transformers undoes that when it
reads a GGUF, so every q/k weight, and the B factor of every q/k LoRA (its rows are the weight's rows), is
permuted again on the way out. Qwen2 and Qwen3 are written unpermuted, as llama.cpp's converter writes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ExportError


@dataclass(frozen=True)
class GgufArch:
    """One transformers model family llama.cpp runs."""

    name: str
    """llama.cpp's architecture name (`general.architecture`)."""
    permute_qk: bool
    """Whether q_proj / k_proj rows are reordered for llama.cpp's RoPE layout."""


# transformers `model_type` -> llama.cpp architecture (as convert_hf_to_gguf.py registers them)
ARCHITECTURES: dict[str, GgufArch] = {
    "llama": GgufArch("llama", True),
    "mistral": GgufArch("llama", True),
    "qwen2": GgufArch("qwen2", False),
    "qwen3": GgufArch("qwen3", False),
}


def gguf_arch(config) -> GgufArch:
    """The llama.cpp architecture of a transformers config.

    Raises:
        ExportError: lorakit cannot export this architecture to GGUF.
    """
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export supports the model types {', '.join(sorted(ARCHITECTURES))} (Llama, Mistral, SmolLM, "
            f"Qwen2, Qwen3); this model is {model_type!r}. Export it as a merged transformers folder instead "
            "(`lorakit merge --adapter RUN/adapter --out DIR`) and convert that with llama.cpp's own "
            "convert_hf_to_gguf.py, which knows more architectures, or serve it with `lorakit serve`.")
    return arch


def _name_map(arch: GgufArch, n_blocks: int):
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    return gguf.get_tensor_name_map(arch_id, n_blocks)


def gguf_tensor_name(arch: GgufArch, n_blocks: int, module: str) -> str:
    """llama.cpp's tensor name (without `.weight`) for a transformers module name.

    `module` may carry a leading `base_model.model.` or `model.model.`-style wrapper; a task model's
    `model.` prefix is what the map expects.

    Raises:
        ExportError: llama.cpp has no tensor for this module.
    """
    name = module.removeprefix("base_model.model.")
    mapped = _name_map(arch, n_blocks).get_name(name + ".weight", try_suffixes=(".weight",))
    if mapped is None:
        raise ExportError(f"llama.cpp has no tensor for the module {module!r} of a {arch.name} model; "
                          "only the attention, MLP, embedding and output layers can be exported")
    return mapped.removesuffix(".weight")


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (or of its LoRA B factor) from transformers' RoPE layout to
    llama.cpp's: within each head, the rows (0, d/2, 1, d/2+1, ...) become consecutive pairs.
    weight: (n_head * head_dim, ...)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def row_permutation_heads(arch: GgufArch, config, gguf_name: str) -> int | None:
    """The head count to permute `gguf_name`'s rows with, or None when it is written as it is."""
    if not arch.permute_qk:
        return None
    if gguf_name.endswith(".attn_q"):
        return int(config.num_attention_heads)
    if gguf_name.endswith(".attn_k"):
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None
