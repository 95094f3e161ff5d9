"""An adapter as a llama.cpp LoRA GGUF: what `llama-cli --lora FILE`, `Llama(lora_path=FILE)` and Ollama's
`ADAPTER FILE` read.

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = alpha
    <tensor>.weight.lora_a   ggml shape [in, r]  = numpy (r, in):  PEFT's A as it is
    <tensor>.weight.lora_b   ggml shape [r, out] = numpy (out, r): PEFT's B (rows permuted for llama's q/k)

llama.cpp computes `W x + s * (alpha / r) * B (A x)` with r read from lora_b and s the user's scale (1 by
default); with alpha = 0 it uses `s` alone. For a token embedding it looks rows of lora_a up by token id, so
there lora_a is A transposed, numpy (vocab, r) (llama.cpp's `build_inp_embd`).

When every layer's scaling is alpha / r with one alpha (plain LoRA, rank_pattern) the file carries that alpha
and B unchanged, as llama.cpp's convert_lora_to_gguf.py writes it. When layers differ (rsLoRA's alpha / sqrt(r),
alpha_pattern) the scaling is folded into B and alpha is written as 0: the same product, exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import ExportError
from .adapter_delta import AdaptedLayer, adapted_layers, base_model_of, saved_modules
from .gguf_names import gguf_arch, gguf_tensor_name, permute_rows, row_permutation_heads

ADAPTER_DTYPES = {"f32": np.float32, "f16": np.float16}


def _refusals(model: nn.Module, layers: list[AdaptedLayer], adapter: str) -> list[str]:
    """Everything in the adapter that a llama.cpp LoRA file cannot carry, one line each."""
    config = base_model_of(model).config
    problems = []
    dora = [item.module for item in layers if item.variant != "lora"]
    if dora:
        problems.append(f"{len(dora)} DoRA layer(s) (e.g. {dora[0]}): llama.cpp's LoRA format has no magnitude "
                        "vector")
    other = [f"{item.module} ({item.kind})" for item in layers if item.kind not in ("linear", "embedding")]
    if other:
        problems.append(f"layers llama.cpp cannot adapt: {', '.join(other[:3])}")
    saved = [name for name, _ in saved_modules(model, adapter)]
    if saved:
        problems.append(f"modules_to_save {saved}: a LoRA GGUF holds low-rank factors only, not full trained "
                        "copies of modules")
    tied = getattr(config, "tie_word_embeddings", False)
    head = [item.module for item in layers if item.module.endswith("lm_head")]
    if tied and head:
        problems.append("a LoRA on lm_head of a model whose head shares the embedding (tie_word_embeddings): "
                        "the base GGUF has no separate output tensor to adapt")
    embedding = [item.module for item in layers if item.kind == "embedding"]
    if tied and embedding:
        problems.append("a LoRA on the token embedding of a model whose head shares it (tie_word_embeddings): "
                        "llama.cpp would apply it to the output head too, as a matrix product it cannot form")
    config = model.peft_config.get(adapter) if hasattr(model, "peft_config") else None
    bias = getattr(config, "bias", "none")
    if bias != "none":
        problems.append(f"trained biases (bias={bias!r}): a LoRA GGUF carries no bias updates")
    if getattr(config, "lora_bias", False):
        problems.append("lora_bias=True (a bias on lora_B): a LoRA GGUF carries no bias updates")
    return problems


def _common_alpha(layers: list[AdaptedLayer]) -> float | None:
    """The one alpha with scaling == alpha / r on every layer, or None when the layers need different ones."""
    alphas = [item.scaling * item.rank for item in layers]
    first = alphas[0]
    if first != 0 and all(abs(a - first) <= 1e-6 * abs(first) for a in alphas):
        return first
    return None


def lora_tensors(model: nn.Module, adapter: str = "default") -> tuple[dict[str, torch.Tensor], float, list[str]]:
    """({gguf tensor name: fp32 tensor}, alpha to write, llama.cpp tensor names adapted) for one adapter.

    Raises:
        ExportError: the architecture is not one llama.cpp runs, or the adapter holds what a LoRA GGUF cannot.
    """
    config = base_model_of(model).config
    arch = gguf_arch(config)
    layers = adapted_layers(model, adapter)
    if not layers:
        raise ExportError(f"the adapter {adapter!r} adapts no layer; there is nothing to export")
    problems = _refusals(model, layers, adapter)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ExportError(f"this adapter cannot be written as a llama.cpp LoRA GGUF:\n{lines}\nRun `lorakit export "
                          "--format peft --for llama.cpp` to rewrite it as plain LoRA (truncated SVD of the exact "
                          "weight change, error printed), or use the merged GGUF (`--quant f16`), which carries any adapter.")
    alpha = _common_alpha(layers)
    out, names = {}, []
    for item in layers:
        name = gguf_tensor_name(arch, config.num_hidden_layers, item.module)
        A, B = item.A, item.B  # (r, in), (out, r)
        if alpha is None:
            B = item.scaling * B  # the whole scaling in B; alpha 0 tells llama.cpp to apply none
        heads = row_permutation_heads(arch, config, name)
        if heads is not None:
            B = permute_rows(B, heads)
        if item.kind == "embedding":
            A = A.T  # (vocab, r): llama.cpp gathers rows of lora_a by token id
        out[f"{name}.weight.lora_a"] = A.contiguous()
        out[f"{name}.weight.lora_b"] = B.contiguous()
        names.append(name)
    return out, (alpha if alpha is not None else 0.0), names


def write_lora_gguf(model: nn.Module, path: str | os.PathLike, adapter: str = "default", dtype: str = "f32",
                    name: str = "lorakit adapter") -> dict:
    """Write `adapter` of `model` (a PeftModel holding it) as a llama.cpp LoRA GGUF at `path`, atomically.

    Returns:
        Facts for the report: path, bytes, alpha, tensors, architecture.

    Raises:
        ExportError: see `lora_tensors`; or an unknown dtype.
    """
    import gguf

    if dtype not in ADAPTER_DTYPES:
        raise ExportError(f"adapter GGUF dtype {dtype!r} is not one of {', '.join(ADAPTER_DTYPES)}")
    tensors, alpha, names = lora_tensors(model, adapter)
    arch = gguf_arch(base_model_of(model).config)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key, value in tensors.items():
            writer.add_tensor(key, value.numpy().astype(ADAPTER_DTYPES[dtype]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "alpha": alpha, "layers": len(names),
            "architecture": arch.name, "dtype": dtype}
