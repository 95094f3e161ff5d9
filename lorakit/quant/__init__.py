"""QLoRA: the frozen base weights in 4-bit NF4, LoRA trained on top in bf16 (CUDA) or fp32 (CPU).

    from lorakit.quant import quantize_model
    model = quantize_model(model, "nf4")              # every nn.Linear but the output head
    model = get_peft_model(model, LoraConfig(...))    # LoRA wraps the 4-bit layers as usual
    ... train; model.save_pretrained(...)             # an ordinary PEFT adapter: loads on an unquantized base
    merged = model.merge_and_unload()                 # adapted layers are dequantized, then merged
    merged = dequantize_model(merged, torch.bfloat16) # any layer LoRA did not target, too; save as usual
    quantize_model(merged, "nf4")                     # requantize, if asked

What is quantized: the weights of the base's `nn.Linear` layers, except the output head (lm_head, and
whatever `get_output_embeddings()` returns) and anything already holding LoRA; embeddings, norms and
biases stay dense (as in QLoRA). A layer whose shape torchao's NF4 cannot take (its size not a
multiple of 64 values) is left dense, reported in `model.lorakit_quantization["skipped"]`, with a warning.

Compute dtype (compute_dtype=None): bf16 on CUDA, QLoRA's choice. On CPU the model's own float dtype
(fp32 by lorakit's default): CPU bf16 matmuls are slow on CPUs without AMX and give larger rounding,
while the 4-bit storage is the same whatever the compute dtype. The backend is torchao; see
lorakit/quant/nf4.py for why.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..fast.kernels.nf4 import block_scales
from . import gptq, nf4

QUANT_METHODS = ("nf4",)
"""The values `quantize=` accepts."""
MOMENT_BYTES = 2 << 30
"""Input moments (GPTQ's H) held at once while calibrating: layers are calibrated in groups this big."""


def default_compute_dtype(model: nn.Module) -> torch.dtype:
    """bf16 on CUDA; on other devices the model's float dtype (fp32 or bf16), else fp32."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is None:
        return torch.float32
    if first.device.type == "cuda":
        return torch.bfloat16
    return first.dtype if first.dtype in (torch.float32, torch.bfloat16) else torch.float32


def quantize_model(model: nn.Module, method: str = "nf4", compute_dtype: Optional[torch.dtype] = None,
                   skip_modules: tuple[str, ...] = (), calibration: Optional[Sequence[dict]] = None) -> nn.Module:
    """Replace the frozen weights of `model`'s linear layers by 4-bit NF4, in place; returns `model`.

    Args:
        model: a torch / transformers model without LoRA layers yet (quantize first, then get_peft_model).
        method: "nf4" (the only method so far).
        compute_dtype: the dtype weights are dequantized to for each matmul; None = bf16 on CUDA, the
            model's float dtype elsewhere (see the module docstring).
        skip_modules: names (exact or `.suffix`) of more linear layers to keep dense.
        calibration: batches of the model's inputs (input_ids, attention_mask): each weight's NF4 level is
            then chosen against them (GPTQ's rounding, lorakit/quant/gptq.py) instead of being the nearest;
            the result is the same NF4 format. None: round to nearest.

    Returns:
        The same model. `model.lorakit_quantization` records the method, compute dtype, the quantized
        and skipped layer names, and the bytes of the linear weights before and after.

    Raises:
        ConfigError: an unknown method, a model that already holds LoRA layers or no quantizable layer,
            or torchao is not installed (the message says how to install it).
    """
    if method not in QUANT_METHODS:
        raise ConfigError([f"quantize={method!r} is not supported; choose one of {QUANT_METHODS}"],
                          where="quantize_model")
    _check_no_lora(model)
    compute_dtype = compute_dtype or default_compute_dtype(model)
    report: dict[str, Any] = {"method": method, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                              "quantized": [], "skipped": {}, "dense_bytes": 0, "quantized_bytes": 0}
    report["rounding"] = f"gptq ({len(calibration)} calibration batches)" if calibration else "nearest"
    for group in _calibration_groups(_quantizable_linears(model, skip_modules), calibration):
        moments = gptq.input_moments(model, dict(group), calibration) if calibration else {}
        for members in _sharing_moments(group, moments):
            done = []  # (name, module, dense weight) of the members NF4 takes
            for name, module in members:
                dense = module.weight.detach()
                try:
                    nf4.quantize_linear_(module, compute_dtype)
                except ValueError as err:
                    report["skipped"][name] = str(err)
                    continue
                done.append((name, module, dense))
            if done and done[0][0] in moments:
                _round_against(moments[done[0][0]], [(m.weight, dense) for _, m, dense in done])
            for name, module, dense in done:
                _record(report, name, dense.numel() * dense.element_size(), module)
            for name, _ in members:
                moments.pop(name, None)
    return _finish(model, report, method)


def _sharing_moments(group: list[tuple[str, nn.Linear]], moments: dict) -> list[list[tuple[str, nn.Linear]]]:
    """The group's layers in runs of neighbours that share one moment matrix (q, k, v; gate, up): they are
    rounded together. Without calibration every layer is a run of its own."""
    runs: list[list[tuple[str, nn.Linear]]] = []
    for name, module in group:
        h = moments.get(name)
        if runs and h is not None and moments.get(runs[-1][-1][0]) is h:
            runs[-1].append((name, module))
        else:
            runs.append([(name, module)])
    return runs


def _round_against(h: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """GPTQ's rounding of NF4 weights [(NF4 weight, its dense original)] that share the input moments H:
    GPTQ treats each output row on its own, so their rows stacked take one pass of its column loop
    (one Cholesky, one loop for q, k and v) and give each row the codes it would get alone."""
    weights = [w for w, _ in layers]
    joint = len({(w.block_size, w.shape[1]) for w in weights}) == 1 and all(torch.equal(w.nf4, weights[0].nf4)
                                                                             for w in weights)
    for part in ([layers] if joint else [[layer] for layer in layers]):
        first = part[0][0]
        dense = torch.cat([d for _, d in part])  # (sum of out, in)
        scales = torch.cat([block_scales(w) for w, _ in part])  # each weight's blocks, row-major, in turn
        codes = gptq.nf4_codes(dense, scales, first.nf4, h, first.block_size)
        for (w, _), rows in zip(part, codes.split([w.shape[0] for w, _ in part])):
            gptq.requantize_nf4_(w, rows)


def _calibration_groups(layers: list[tuple[str, nn.Linear]], calibration) -> list[list[tuple[str, nn.Linear]]]:
    """The layers in groups whose input moments (in² fp32 values each) fit MOMENT_BYTES together: each
    group takes one calibration pass, through the model with the earlier groups already quantized (so
    later layers see their quantized inputs, as GPTQ does). Without calibration: one group."""
    if not calibration:
        return [layers]
    groups, size = [[]], 0
    for name, module in layers:
        need = 4 * module.in_features ** 2
        if groups[-1] and size + need > MOMENT_BYTES:
            groups, size = groups + [[]], 0
        groups[-1].append((name, module))
        size += need
    return groups


def _record(report: dict, name: str, dense_bytes: int, module: nn.Linear) -> None:
    report["quantized"].append(name)
    report["dense_bytes"] += dense_bytes
    report["quantized_bytes"] += nf4.nf4_bytes(module.weight)


def _finish(model: nn.Module, report: dict, method: str) -> nn.Module:
    if report["skipped"]:
        first = next(iter(report["skipped"].items()))
        warnings.warn(f"{len(report['skipped'])} linear layer(s) left unquantized (dense), e.g. {first[0]}: "
                      f"{first[1]}. See model.lorakit_quantization['skipped'].", stacklevel=3)
    if not report["quantized"]:
        raise ConfigError([f"no linear layer of {type(model).__name__} could be quantized to {method}: "
                           f"{report['skipped'] or 'it has no nn.Linear layers besides the output head'}"],
                          where="quantize_model")
    model.lorakit_quantization = report
    return model


def _check_no_lora(model: nn.Module) -> None:
    from ..lora.layer import LoraLayer

    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ConfigError(["this model already holds LoRA layers; quantize the base model first, then call "
                           "get_peft_model (QLoRA: quantize_model(base) -> get_peft_model)"], where="quantize_model")


def _quantizable_linears(model: nn.Module, skip_modules: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """(name, layer) for every dense nn.Linear except the output head, a task head (trained in full, as a dense
    copy) and the names in skip_modules."""
    from ..config import TASK_HEADS
    from ..lora.targets import name_matches, output_head_names

    head_names = {"lm_head"} | {h for heads in TASK_HEADS.values() for h in heads if h != "fc"}  # (fc: also MLPs')
    heads = output_head_names(model) | {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in head_names}
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name in heads or name_matches(list(skip_modules), name):
            continue
        if is_quantized(module.weight):
            continue
        out.append((name, module))
    return out


def is_quantized(weight: torch.Tensor) -> bool:
    """True when `weight` is a 4-bit NF4 tensor made by quantize_model."""
    return nf4.is_nf4(weight)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules whose weight is NF4 (inside a LoRA wrapper: `....q_proj.base_layer`)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and is_quantized(m.weight)]


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = torch.bfloat16) -> nn.Module:
    """Turn every NF4 weight of `model` back into a dense frozen weight, then cast the whole model to
    `dtype` (bf16: what a merged QLoRA model is saved in); in place; returns `model`.

    Use it after `merge_and_unload()` on a QLoRA model before `save_pretrained` (safetensors stores
    dense tensors only). dtype=None keeps each layer's compute dtype and casts nothing. The values are
    the 4-bit ones: dequantizing does not bring back the original weights.
    """
    for _, module in model.named_modules():
        if type(module) is nn.Linear and is_quantized(module.weight):
            nf4.dequantize_linear_(module, dtype)
    if dtype is not None:
        model.to(dtype)  # safe now: no NF4 tensor is left for .to(dtype) to dequantize behind our back
    if hasattr(model, "lorakit_quantization"):
        del model.lorakit_quantization
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by all parameters and buffers of `model`, counting NF4 weights at their packed size."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += nf4.nf4_bytes(t) if is_quantized(t) else t.numel() * t.element_size()
    return total


__all__ = ["QUANT_METHODS", "quantize_model", "dequantize_model", "is_quantized", "quantized_layers",
           "quantized_bytes", "default_compute_dtype"]
