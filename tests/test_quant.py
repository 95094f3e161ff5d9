"""QLoRA: NF4 base weights under LoRA. Forward close to fp32, only LoRA trains, merge and file round trips."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tests.conftest import assert_close, rel_err, tiny_llama

pytest.importorskip("torchao")

from lorakit import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from lorakit.errors import AdapterError, ConfigError  # noqa: E402
from lorakit.quant import (dequantize_model, is_quantized, quantize_model, quantized_bytes,  # noqa: E402
                           quantized_layers)
from lorakit.quant.nf4 import scaler_block_size, why_not_quantizable  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# NF4 keeps 16 levels per block: a Gaussian weight comes back with ~10% relative error per matrix, and the
# error of a 2-layer model's logits stays in that range. Not in conftest's table: it is quantization, not dtype.
NF4_TOLERANCE = 0.15


def _ids(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(1, 128, (2, 12))


def _qlora(seed: int = 0):
    """(QLoRA model with non-zero B, so the adapter acts; the unquantized base it came from)."""
    base = tiny_llama(seed=seed)
    reference = copy.deepcopy(base)
    quantize_model(base, "nf4")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    return model, reference


def test_every_linear_but_the_head_becomes_nf4():
    model = quantize_model(tiny_llama(), "nf4")
    names = quantized_layers(model)
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert not is_quantized(model.lm_head.weight) and not is_quantized(model.model.embed_tokens.weight)
    report = model.lorakit_quantization
    assert report["skipped"] == {} and report["compute_dtype"] == "float32"
    assert report["quantized_bytes"] < report["dense_bytes"] / 6  # ~0.52 byte vs 4 bytes a value
    assert all(not p.requires_grad for n, p in model.named_parameters() if is_quantized(p))


def test_a_task_head_stays_dense_and_trains_as_a_copy():
    """seq-cls / token-cls / qa QLoRA crashed: the new head was quantized, then copied for training."""
    model = quantize_model(tiny_llama("seq_cls"), "nf4")
    assert "score" not in quantized_layers(model) and len(quantized_layers(model)) == 2 * 7
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    peft_model(_ids()).logits.sum().backward()
    head = peft_model.base_model.model.score.modules_to_save["default"].weight
    assert head.requires_grad and head.grad is not None


def test_quantized_forward_is_close_to_full_precision():
    dense = tiny_llama()
    quantized = quantize_model(copy.deepcopy(dense), "nf4")
    ids = _ids()
    with torch.no_grad():
        err = rel_err(quantized(ids).logits, dense(ids).logits)
    assert 0 < err < NF4_TOLERANCE


def test_lora_wraps_the_quantized_layers_and_only_lora_trains():
    model, _ = _qlora()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "LoraLinear" and is_quantized(q_proj.base_layer.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_quantized(p)}
    base_before = [p.get_original_weight().clone() for p in model.parameters() if is_quantized(p)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not is_quantized(p) and not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert len(changed) == 2 * 7 * 2  # A and B of every target
    for p, old in zip([p for p in model.parameters() if is_quantized(p)], base_before):
        assert torch.equal(p.get_original_weight(), old)


def test_merge_dequantizes_and_matches_the_unmerged_output():
    model, _ = _qlora()
    ids = _ids()
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        model.merge_adapter()
        merged_in_place = model(ids).logits
        model.unmerge_adapter()
        again = model(ids).logits
        plain = model.merge_and_unload()
        unloaded = plain(ids).logits
    assert_close(merged_in_place, unmerged)
    assert_close(again, unmerged)
    assert_close(unloaded, unmerged)
    assert quantized_layers(plain) == [] and all(type(m).__name__ != "LoraLinear" for m in plain.modules())


def test_a_refused_safe_merge_leaves_the_4bit_weights_4bit():
    model, _ = _qlora()
    packed = quantized_bytes(model)
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(AdapterError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert quantized_bytes(model) == packed and len(quantized_layers(model)) == 2 * len(ALL)


def test_qlora_adapter_is_a_plain_adapter_that_loads_on_the_unquantized_base(tmp_path):
    model, reference = _qlora()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and (tmp_path / "adapter_model.safetensors").is_file()
    ids = _ids()
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    with torch.no_grad():
        quantized_out = model.eval()(ids).logits
        dense_out = loaded(ids).logits
        base_out = reference(ids).logits
    # the same adapter on the full-precision base: as close as the base models are to each other
    assert rel_err(dense_out, quantized_out) < NF4_TOLERANCE
    assert rel_err(dense_out, base_out) > 0.01  # the adapter does act (B != 0)
    again = PeftModel.from_pretrained(quantize_model(copy.deepcopy(reference), "nf4"), tmp_path)
    with torch.no_grad():
        assert_close(again(ids).logits, quantized_out)


def test_merged_qlora_model_saves_in_bf16_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _qlora()
    merged = dequantize_model(model.merge_and_unload(), torch.bfloat16)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        assert_close(reloaded(ids).logits, merged(ids).logits, torch.bfloat16)  # rotary buffers differ in dtype


def test_dequantize_and_requantize_on_request():
    model, _ = _qlora()
    merged = model.merge_and_unload()
    quantize_model(merged, "nf4", skip_modules=("q_proj",))  # merge dequantized the targets: requantize
    assert len(quantized_layers(merged)) == 2 * 6
    packed = quantized_bytes(merged)
    dequantize_model(merged, torch.bfloat16)
    assert quantized_layers(merged) == []
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}  # one dtype, ready to save
    assert quantized_bytes(merged) > packed


def test_shapes_nf4_cannot_take_are_skipped_with_a_warning():
    assert scaler_block_size(192 * 576) == 216  # SmolLM2's k_proj: 1,728 blocks, not a multiple of 256
    assert scaler_block_size(64) is None and "multiple of the NF4 block size" in why_not_quantizable(torch.ones(3, 7))
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))  # 96 values: not a multiple of 64
    with pytest.warns(UserWarning, match="left unquantized"):
        quantize_model(net, "nf4")
    assert set(net.lorakit_quantization["skipped"]) == {"2"} and is_quantized(net[0].weight)


def test_bad_requests_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="quantize='int3' is not supported"):
        quantize_model(tiny_llama(), "int3")
    model, _ = _qlora()
    with pytest.raises(ConfigError, match="quantize the base model first"):
        quantize_model(model, "nf4")


def test_cli_train_with_quantize_nf4_writes_a_plain_adapter(tmp_path, monkeypatch):
    """`lorakit train --quantize nf4` on a tiny model folder: it trains, and the adapter loads on the dense base.
    The data file is read once, for the calibration and the training both."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import lorakit.data
    from lorakit.cli.main import main
    from tests.test_data_helpers import tiny_tokenizer

    reads = []
    read_records = lorakit.data.read_records
    monkeypatch.setattr(lorakit.data, "read_records", lambda *a, **k: reads.append(a[0]) or read_records(*a, **k))

    tok, folder = tiny_tokenizer(), tmp_path / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"instruction": f"what is item {i}", "input": "", "output": f"item {i} is blue"} for i in range(24)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    main(["train", "--model", str(folder), "--data", str(data), "--max-steps", "4", "--batch-size", "4",
          "--seq-len", "32", "--lr", "5e-3", "--r", "4", "--alpha", "8", "--quantize", "nf4", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert reads == [str(data)]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert json.loads((out / "adapter" / "lorakit.json").read_text())["training"]["quantize"] == "nf4"
    dense = AutoModelForCausalLM.from_pretrained(folder)
    loaded = PeftModel.from_pretrained(dense, out / "adapter")  # fingerprint: shapes, not 4-bit values
    assert not quantized_layers(loaded) and loaded.get_nb_trainable_parameters()[0] == 0


def _nf4_of(w: torch.Tensor):
    from lorakit.fast.kernels.nf4 import block_scales
    from lorakit.quant.nf4 import quantize_weight

    q = quantize_weight(w, torch.float32)
    return q, block_scales(q)


def test_gptq_rounding_is_nearest_for_uncorrelated_inputs_and_better_for_correlated_ones():
    """With H a multiple of the identity no error can be pushed anywhere useful: GPTQ's codes are the nearest
    levels (of the stored, double-quantized scales). With correlated inputs its output error ‖(W − Q) X‖ is
    smaller than round-to-nearest's."""
    from lorakit.quant.gptq import nf4_codes, requantize_nf4_

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    q, scales = _nf4_of(w)
    per_weight = scales.repeat_interleave(q.block_size).reshape(w.shape)
    nearest_codes = (w[..., None] / per_weight[..., None] - q.nf4).abs().argmin(-1)
    codes = nf4_codes(w, scales, q.nf4, 3.0 * torch.eye(128), q.block_size)
    assert torch.equal(codes.long(), nearest_codes)
    requantize_nf4_(q, nearest_codes.to(torch.uint8))
    nearest = q.get_original_weight()

    mix = torch.randn(128, 128, generator=g)
    x = torch.randn(4096, 128, generator=g) @ mix * torch.linspace(0.1, 3, 128)  # (tokens, in), correlated
    codes = nf4_codes(w, scales, q.nf4, x.T @ x, q.block_size)
    requantize_nf4_(q, codes)
    chosen = q.get_original_weight()
    assert torch.equal(chosen.reshape(-1, 64), q.nf4[codes.long()].reshape(-1, 64) * scales[:, None])  # NF4 levels
    rtn_error, gptq_error = ((w - nearest) @ x.T).norm(), ((w - chosen) @ x.T).norm()
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_calibrated_quantization_lowers_the_output_error_of_a_model():
    from lorakit.quant.nf4 import is_nf4

    dense = tiny_llama()
    batches = [{"input_ids": _ids(seed)} for seed in range(4)]
    with torch.no_grad():
        reference = [dense(**b).logits for b in batches]
    nearest, calibrated = quantize_model(copy.deepcopy(dense), "nf4"), \
        quantize_model(copy.deepcopy(dense), "nf4", calibration=batches)
    assert calibrated.lorakit_quantization["rounding"] == "gptq (4 calibration batches)"
    assert nearest.lorakit_quantization["rounding"] == "nearest"
    assert all(is_nf4(m.weight) for m in calibrated.modules() if type(m) is nn.Linear and m is not calibrated.lm_head)
    with torch.no_grad():
        errors = [sum(rel_err(model(**b).logits, r) for b, r in zip(batches, reference)) for model in (nearest, calibrated)]
    assert errors[1] < errors[0], errors
    assert calibrated.training is dense.training  # calibration ran in eval mode and left the mode alone


def test_the_moments_are_of_real_tokens_shared_by_layers_on_one_input_and_stop_after_the_last_layer():
    """H = Σ x xᵀ over the non-padding positions only; q, k and v (and gate and up) read one tensor: one
    matrix between them with each one's own values; batches after the first stop before the LM head."""
    from lorakit.quant.gptq import input_moments

    model = tiny_llama()
    layers = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    batches = []
    for seed in range(3):
        ids = _ids(seed)
        mask = torch.ones_like(ids)
        mask[0, 7 + seed:] = 0  # the first row padded at the end
        batches.append({"input_ids": ids, "attention_mask": mask})
    seen = {}

    def record(name):
        return lambda module, args: seen.setdefault(name, []).append(args[0])

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    moments = input_moments(model, layers, batches)
    assert len(head_calls) == 1  # the first batch's whole forward; the others stopped after the last layer
    attention, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert moments[attention + "q_proj"] is moments[attention + "k_proj"] is moments[attention + "v_proj"]
    assert moments[mlp + "gate_proj"] is moments[mlp + "up_proj"]
    assert moments[attention + "o_proj"] is not moments[attention + "q_proj"]
    assert moments[mlp + "down_proj"] is not moments[mlp + "up_proj"]
    for name, xs in seen.items():
        x = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, batches)]).float()  # real tokens only
        assert x.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
        assert_close(moments[name], x.T @ x)


def test_layers_sharing_moments_are_rounded_together_with_the_codes_each_gets_alone(monkeypatch):
    """q, k and v (gate and up) take one pass of GPTQ's column loop: the same codes as one pass each."""
    from lorakit.fast.kernels.nf4 import block_scales
    from lorakit.quant import gptq

    dense = tiny_llama()
    batches = [{"input_ids": _ids(seed)} for seed in range(3)]
    passes = []
    nf4_codes = gptq.nf4_codes
    monkeypatch.setattr(gptq, "nf4_codes", lambda w, *a: passes.append(w.shape[0]) or nf4_codes(w, *a))
    together = quantize_model(copy.deepcopy(dense), "nf4", calibration=batches)
    assert passes == [32 + 16 + 16, 32, 64 + 64, 32] * 2  # per layer: q+k+v rows, o, gate+up, down
    probe = copy.deepcopy(dense)
    layers = {n: m for n, m in probe.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    moments = gptq.input_moments(probe, layers, batches)  # the first group's: no layer quantized yet
    attention = "model.layers.0.self_attn."
    for proj in ("q_proj", "k_proj", "v_proj"):
        w = dict(together.named_modules())[attention + proj].weight
        alone = nf4_codes(layers[attention + proj].weight.detach(), block_scales(w), w.nf4,
                          moments[attention + proj], w.block_size)
        packed = w.quantized_data
        assert torch.equal(torch.stack([packed >> 4, packed & 15], dim=1).flatten(), alone.flatten()), proj


def test_calibration_refuses_inputs_shared_on_the_first_batch_only():
    from lorakit.quant.gptq import input_moments

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(4, 4), nn.Linear(4, 4), 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x.clone())

    model = Branches()
    with pytest.raises(RuntimeError, match="b shared its input with a on the first batch"):
        input_moments(model, {"a": model.a, "b": model.b}, [{"x": torch.randn(2, 4)}] * 2)


def _assert_pickles(model) -> None:
    """torch.save of the whole model, loaded back, gives the same logits."""
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    ids = _ids()
    assert torch.equal(restored(ids).logits, model(ids).logits)


def test_a_quantized_model_with_the_kernels_switched_in_pickles():
    """The per-instance forwards (NF4 layers, kernel norms and MLPs) survive torch.save of the whole model."""
    from lorakit.fast import use_fast_kernels

    model = quantize_model(tiny_llama(), "nf4")
    use_fast_kernels(model)
    _assert_pickles(model)


def test_kernels_keep_a_model_picklable_when_attentions_hold_the_rotary_function():
    """transformers 5.0-5.24 without `kernels` keep apply_rotary_pos_emb, a plain function, on every
    attention (`rotary_fn`); once the module's name is the kernel wrapper, the original function no longer
    pickles by reference, so the attentions get the wrapper too. (From 5.25 transformers needs `kernels`:
    the next test; `make test-transformers V=5.0.0` runs this one.)"""
    from lorakit.fast import use_fast_kernels
    from lorakit.fast.kernels.patch import _wrap_rotary
    from transformers.models.llama import modeling_llama

    current = modeling_llama.apply_rotary_pos_emb
    if isinstance(current, nn.Module):
        pytest.skip("this transformers makes apply_rotary_pos_emb a `kernels` function module (the next test)")
    original = getattr(current, "lorakit_original", current)
    model = tiny_llama()
    attentions = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    for attention in attentions:
        attention.rotary_fn = original  # as transformers 5.0's use_kernelized_func does at init
    use_fast_kernels(model)
    assert all(a.rotary_fn is modeling_llama.apply_rotary_pos_emb for a in attentions)
    assert _wrap_rotary(original).__qualname__ == original.__qualname__
    _assert_pickles(model)


def test_kernels_keep_a_model_picklable_when_rotary_is_a_kernels_function_module(monkeypatch):
    """transformers with the `kernels` package (a dependency from 5.25) makes apply_rotary_pos_emb a function
    module and gives each attention a private copy, which unpickling rebuilds from the type of the module's
    global of that name: the global must stay that object, and the fast rotary goes into its forward."""
    kernels_layer = pytest.importorskip("kernels._internals.layer.layer", reason="the `kernels` package is not installed")
    from lorakit.fast import use_fast_kernels
    from lorakit.fast.kernels import patch
    from transformers.models.llama import modeling_llama

    function_module = kernels_layer._create_func_module(_plain_rotary)()
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", function_module)
    model = tiny_llama()
    for attention in (m for m in model.modules() if type(m).__name__ == "LlamaAttention"):
        attention.__dict__.setdefault("_kernel_funcs", {})["apply_rotary_pos_emb"] = type(function_module)()
    reference = model(_ids()).logits
    calls = []
    monkeypatch.setattr(patch, "rotary_torch", lambda *a: calls.append(1) or _plain_rotary(*a))
    assert "rotary" in use_fast_kernels(model)
    assert modeling_llama.apply_rotary_pos_emb is function_module
    assert torch.allclose(model(_ids()).logits, reference, atol=1e-6)
    assert len(calls) == model.config.num_hidden_layers  # the attentions' calls reached the fast rotary
    monkeypatch.setattr(patch, "rotary_torch", _plain_rotary)  # the lambda above does not pickle
    _assert_pickles(model)


def _plain_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' rotary embedding, written out (a module-level function kernels can wrap)."""
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


_plain_rotary.__module__ = "transformers.models.llama.modeling_llama"
_plain_rotary.__name__ = "apply_rotary_pos_emb"