"""A merged model (base + adapter, `merge_and_unload`) as a full GGUF that llama.cpp and Ollama run.

The weights come from the transformers model; the tokenizer (vocabulary, merges, special tokens), the chat
template and the descriptive `general.*` fields are copied from the GGUF the base model was loaded from (the
embedded SmolLM2 is one), key for key; the architecture's hyperparameters are written from the model's config.
A base that came from a transformers folder has no GGUF to copy a tokenizer from: the error says to convert
the merged folder with llama.cpp's convert_hf_to_gguf.py instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import ExportError
from .gguf_names import GgufArch, gguf_arch, gguf_tensor_name, permute_rows, row_permutation_heads

# --quant name -> (tensor type of 2-D weights, llama.cpp file type); 1-D tensors (norms) stay f32, as in llama.cpp
QUANTS = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
          "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# Fields of the source GGUF that describe the file, not the model: the writer sets its own.
_NOT_COPIED = {"general.architecture", "general.type", "general.file_type", "general.quantization_version",
               "general.alignment"}


def source_gguf(model_name: str) -> Path | None:
    """The GGUF file a model name loads from (an embedded model, a .gguf path or a folder holding one), or None."""
    from ..models.sources import resolve_source

    try:
        source = resolve_source(model_name)
    except Exception:  # a name that no longer resolves: no GGUF to copy from
        return None
    if source.kind != "gguf":
        return None
    location = Path(source.location)
    if location.is_file():
        return location
    found = sorted(location.glob("*.gguf"))
    return found[0] if found else None


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _check_rope(config) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind != "default":
        raise ExportError(f"this model uses RoPE scaling {kind!r}, which lorakit's GGUF writer does not carry yet; "
                          "merge it (`lorakit merge`) and convert the folder with llama.cpp's convert_hf_to_gguf.py")


def add_hyperparameters(writer, config, file_type: int) -> None:
    """The architecture's `<arch>.*` fields, from a transformers config (as convert_hf_to_gguf.py writes them)."""
    _check_rope(config)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(file_type)


def copy_metadata(writer, source: Path, vocab_size: int, skip: frozenset[str] = frozenset()) -> int:
    """Copy `tokenizer.*` and descriptive `general.*` fields from the GGUF `source`; returns how many.

    Raises:
        ExportError: the source's vocabulary does not match the model's embedding rows.
    """
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(source).fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ExportError(f"{source} has no tokenizer (tokenizer.ggml.tokens); a GGUF without one cannot run")
    if len(tokens.data) != vocab_size:
        raise ExportError(f"{source} holds {len(tokens.data)} tokens but the model has {vocab_size} embedding rows; "
                          "export from the GGUF the adapter's base model was loaded from")
    copied = 0
    for key, field in fields.items():
        if not key.startswith(("tokenizer.", "general.")) or key in _NOT_COPIED or key in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
        copied += 1
    return copied


def _weights(model: nn.Module, arch: GgufArch) -> dict[str, torch.Tensor]:
    """{gguf name: fp32 tensor in llama.cpp's layout} for every weight of a plain transformers causal LM."""
    config = model.config
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp falls back to token_embd when there is no output tensor
        module, _, suffix = key.rpartition(".")
        name = f"{gguf_tensor_name(arch, config.num_hidden_layers, module)}.{suffix}"
        value = value.detach().float().cpu()
        heads = row_permutation_heads(arch, config, name.rsplit(".", 1)[0])
        out[name] = permute_rows(value, heads) if heads is not None else value
    return out


def _encode(value: torch.Tensor, quant: str):
    """(numpy data, raw GGML type or None) for one tensor at `quant`; 1-D tensors and rows that do not fill
    whole quantization blocks fall back to f32 / f16 as llama.cpp's quantizer does."""
    import gguf

    array = value.numpy()
    type_name = QUANTS[quant][0]
    if array.ndim < 2 or type_name == "F32":
        return array.astype(np.float32), None
    if type_name == "F16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[type_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def write_merged_gguf(model: nn.Module, path: str | os.PathLike, source: str | os.PathLike | None,
                      quant: str = "f16", name: str | None = None) -> dict:
    """Write a plain (merged) transformers causal LM as a full GGUF at `path`, atomically.

    Args:
        model: a transformers model with no LoRA layers left (`merge_and_unload()`), on CPU.
        source: the GGUF to copy the tokenizer, chat template and descriptive fields from.
        quant: one of QUANTS.
        name: general.name to write (default: the source's).

    Raises:
        ExportError: no source GGUF, an unknown quant, an architecture llama.cpp lacks, or a task head.
    """
    import gguf

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r} is not one the gguf package can write; use one of {', '.join(QUANTS)}")
    if source is None:
        raise ExportError("a merged GGUF needs the base model's tokenizer in GGUF form, and this base was not loaded "
                          "from a GGUF file. Write the merged model as a folder (`lorakit merge --adapter RUN/adapter "
                          "--out DIR`) and convert it with llama.cpp's convert_hf_to_gguf.py DIR --outtype f16")
    architectures = getattr(model.config, "architectures", None) or []
    if not hasattr(model, "lm_head") or any(not a.endswith("ForCausalLM") for a in architectures):
        raise ExportError(f"only causal language models export to GGUF; this is {type(model).__name__} (a task head "
                          "llama.cpp cannot run). Serve it with `lorakit serve` or export the adapter as PEFT")
    arch = gguf_arch(model.config)
    tensors = _weights(model, arch)
    file_type = int(getattr(gguf.LlamaFileType, QUANTS[quant][1]))

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.MODEL)
        copy_metadata(writer, Path(source), int(model.config.vocab_size),
                      skip=frozenset({"general.name"} if name else ()))
        if name:
            writer.add_name(name)
        add_hyperparameters(writer, model.config, file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in tensors.items():
            data, raw = _encode(value, quant)
            writer.add_tensor(key, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "quant": quant, "architecture": arch.name,
            "tensors": len(tensors)}
