"""CPU bf16 training: `--dtype auto` picks it only on a CPU with native bf16 that measures faster; frozen
weights in bf16, LoRA factors and optimizer state in fp32; loss and LoRA gradients on the fast path agree with
the fp32 reference within the table below."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lorakit import LoraConfig, get_peft_model
from lorakit.train import runtime
from tests.conftest import rel_err
from tests.test_train_fixtures import write_chat_data, write_tiny_model_dir

# bf16 against fp32 on the same weights, batch and LoRA factors: what bf16's 8-bit mantissa allows.
BF16_VS_FP32 = {
    "loss (relative)": 1e-2,
    "lora_A gradient (relative, whole model)": 5e-2,
    "lora_B gradient (relative, whole model)": 5e-2,
    "gradient direction (1 - cosine)": 2e-3,
}


@pytest.fixture
def fresh_choice(monkeypatch):
    """training_dtype's CPU answer recomputed in this test (it is asked once per process otherwise)."""
    monkeypatch.delenv("LORAKIT_CPU_BF16", raising=False)
    runtime._cpu_choice.cache_clear()
    yield monkeypatch
    runtime._cpu_choice.cache_clear()


def _hardware(monkeypatch, native: bool, fp32: float, bf16: float) -> None:
    import lorakit.models.device as device

    monkeypatch.setattr(device, "cpu_native_bf16", lambda: native)
    monkeypatch.setattr(device, "cpu_matmul_rates", lambda: {"float32": fp32, "bfloat16": bf16})


def test_auto_picks_bf16_only_on_a_native_cpu_where_it_measures_faster(fresh_choice):
    _hardware(fresh_choice, native=True, fp32=40.0, bf16=400.0)
    word, why = runtime.training_dtype("auto", "cpu")
    assert word == "bfloat16" and "400 vs fp32 40 GFLOP/s" in why
    runtime._cpu_choice.cache_clear()
    _hardware(fresh_choice, native=True, fp32=40.0, bf16=50.0)  # native, but not worth it
    assert runtime.training_dtype("auto", "cpu")[0] == "float32"
    runtime._cpu_choice.cache_clear()
    _hardware(fresh_choice, native=False, fp32=40.0, bf16=400.0)
    word, why = runtime.training_dtype("auto", "cpu")
    assert word == "float32" and "no native bf16" in why
    runtime._cpu_choice.cache_clear()
    fresh_choice.setenv("LORAKIT_CPU_BF16", "1")
    assert runtime.training_dtype("auto", "cpu")[0] == "bfloat16"
    assert runtime.training_dtype("float32", "cpu")[0] == "float32"  # a word the user typed wins


def test_auto_autocasts_on_cpu_exactly_when_the_frozen_weights_are_bf16():
    cpu = torch.device("cpu")
    assert runtime.autocast_dtype(cpu, "auto", torch.bfloat16) is torch.bfloat16
    assert runtime.autocast_dtype(cpu, "auto", torch.float32) is None
    assert runtime.autocast_dtype(cpu, "float32", torch.bfloat16) is None
    assert runtime.autocast_dtype(cpu, "bfloat16", torch.float32) is torch.bfloat16


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def _loss_and_lora_grads(model, ids: torch.Tensor, dtype) -> tuple[float, dict[str, torch.Tensor]]:
    from lorakit.fast import use_fast_kernels

    use_fast_kernels(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_loss_and_lora_gradients_match_fp32_within_the_table():
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = get_peft_model(_llama().to(dtype), config)
        runtime.keep_trainable_in_fp32(model)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype is torch.float32 for p in lora)
        assert model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.dtype is dtype
        results[dtype] = _loss_and_lora_grads(model.train(), ids, dtype)
    (loss32, grads32), (loss16, grads16) = results[torch.float32], results[torch.bfloat16]
    assert grads16.keys() == grads32.keys() and all(g.dtype is torch.float32 for g in grads16.values())
    flat = {kind: [torch.cat([g[n].flatten() for n in grads32 if kind in n]) for g in (grads16, grads32)]
            for kind in ("lora_A", "lora_B")}
    cosine = F.cosine_similarity(torch.cat([*flat["lora_A"][:1], *flat["lora_B"][:1]]),
                                 torch.cat([*flat["lora_A"][1:], *flat["lora_B"][1:]]), dim=0).item()
    measured = {"loss (relative)": abs(loss16 - loss32) / abs(loss32),
                "lora_A gradient (relative, whole model)": rel_err(*flat["lora_A"]),
                "lora_B gradient (relative, whole model)": rel_err(*flat["lora_B"]),
                "gradient direction (1 - cosine)": 1 - cosine}
    over = {k: f"{v:.3g} > {BF16_VS_FP32[k]:.1g}" for k, v in measured.items() if v > BF16_VS_FP32[k]}
    assert not over, over
    assert measured["loss (relative)"] > 0  # the bf16 run did compute in bf16


def test_lorakit_train_in_bf16_keeps_fp32_masters_and_saves_an_fp32_adapter(tmp_path, monkeypatch):
    from safetensors import safe_open

    from lorakit.cli.main import main

    monkeypatch.setenv("LORAKIT_CPU_BF16", "1")
    runtime._cpu_choice.cache_clear()
    try:
        model_dir = write_tiny_model_dir(tmp_path / "model")
        data = write_chat_data(tmp_path / "chats.jsonl", 12)
        main(["train", "--model", model_dir, "--data", data, "--max-steps", "3", "--batch-size", "4",
              "--seq-len", "128", "--r", "4", "--out", str(tmp_path / "run"), "--save-every", "0",
              "--eval-every", "0", "--device", "cpu"])
    finally:
        runtime._cpu_choice.cache_clear()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16" and summary["steps"] == 3
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32}
    b_norms = []
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        b_norms = [f.get_tensor(k).norm().item() for k in f.keys() if "lora_B" in k]
    assert max(b_norms) > 0  # B starts at zero: the fp32 masters did take the optimizer's steps


def test_packed_attention_in_bf16_computes_in_fp32_and_returns_bf16():
    """CPU flash attention is ~3x slower in bf16 than in fp32: the packed path upcasts (also under autocast, which
    would cast back) and hands bf16 back, equal to fp32 attention on the same bf16 inputs."""
    from torch import nn

    from lorakit.fast.attention import packed_sdpa_attention

    module = nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 10, 8, generator=g).bfloat16().requires_grad_() for h in (4, 2, 2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])  # two packed examples: 4 and 6 tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=positions)
    assert out.dtype is torch.bfloat16 and out.shape == (1, 10, 4, 8)
    expected = torch.cat([F.scaled_dot_product_attention(*(t[:, :, s:e].float() for t in (q, k, v)), is_causal=True,
                                                         enable_gqa=True) for s, e in ((0, 4), (4, 10))], dim=2)
    assert torch.equal(out, expected.transpose(1, 2).bfloat16())
    out.float().sum().backward()
    assert q.grad.dtype is torch.bfloat16 and q.grad.abs().sum() > 0
