"""The LoRA invariants on every layer type and on tiny transformers models.

merged == unmerged == merge_and_unload; disabled == base exactly; only adapter parameters change
under an optimizer step; save -> load is exact. Inits are non-identity (B = 0 hides every bug).
"""
import copy

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from tests.conftest import ToyNet, assert_close, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(batch=2, seq=7, seed=3):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "llama": (lambda: tiny_llama(), ALL_LLAMA, lambda m, x: m(input_ids=x).logits),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], lambda m, x: m(input_ids=x).logits),
    "bert": (lambda: tiny_bert("base"), ["query", "key", "value", "dense"], lambda m, x: m(input_ids=x).last_hidden_state),
    "t5": (tiny_t5, ["q", "k", "v", "o", "wi", "wo"], lambda m, x: m(input_ids=x, decoder_input_ids=x[:, :3]).logits),
}
VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_equals_unmerged_equals_unloaded(arch, variant):
    make, targets, run = MODELS[arch]
    base = make().requires_grad_(False)  # frozen as get_peft_model leaves it: some kernels differ bitwise otherwise
    x = _ids()
    ref = run(base, x)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                            **VARIANTS[variant])).eval()
    out = run(model, x)
    assert (out - ref).abs().max() > 1e-3, "non-identity init must change the output"
    with model.disable_adapter():
        assert torch.equal(run(model, x), ref), "disabled must be the base model exactly"
    model.merge_adapter()
    model.merge_adapter()  # idempotent
    assert_close(run(model, x), out)
    with model.disable_adapter():
        assert_close(run(model, x), ref)
    assert_close(run(model, x), out)  # re-merged after the block
    model.unmerge_adapter()
    assert_close(run(model, x), out)
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert_close(run(merged, x), out)


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head"]])
def test_merging_into_a_tied_embedding_or_head_leaves_the_other_as_it_was(tmp_path, targets):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tie_word_embeddings=True).requires_grad_(False)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    x = _ids()
    ref, shared = base(input_ids=x).logits, base.lm_head.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
    out = model(input_ids=x).logits
    model.merge_adapter()
    with model.disable_adapter():  # unmerged, then merged again on the way out
        assert_close(model(input_ids=x).logits, ref)
    assert_close(model(input_ids=x).logits, out)
    model.unmerge_adapter()  # the shared tensor itself back, untouched: tied as before
    head = base.lm_head.weight
    assert head is base.model.embed_tokens.weight and base.config.tie_word_embeddings and torch.equal(head, shared)
    with model.disable_adapter():
        assert_close(model(input_ids=x).logits, ref)
    merged = model.merge_and_unload()
    assert_close(merged(input_ids=x).logits, out)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight and not merged.config.tie_word_embeddings
    merged.save_pretrained(tmp_path)
    assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=x).logits, out)


def test_toy_layers_conv_embedding_linear(toy_inputs):
    base = ToyNet().eval()
    ref = base(*toy_inputs)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv", "conv1d", "fc1", "fc2"],
                                            init_lora_weights=False)).eval()
    out = model(*toy_inputs)
    assert (out - ref).abs().max() > 1e-3
    model.merge_adapter()
    assert_close(model(*toy_inputs), out)
    model.unmerge_adapter()
    assert_close(model.merge_and_unload()(*toy_inputs), out)


def test_conv_dora_merge(toy_inputs):
    model = get_peft_model(ToyNet().eval(), LoraConfig(r=2, target_modules=["conv", "fc1"], use_dora=True,
                                                       init_lora_weights=False)).eval()
    out = model(*toy_inputs)
    assert_close(model.merge_and_unload()(*toy_inputs), out)


@pytest.mark.parametrize("kinds", [("dora", "dora", "dora"), ("lora", "dora", "lora", "dora")])
def test_several_active_dora_and_lora_adapters_merge_to_their_unmerged_output(kinds, toy_inputs):
    """Each DoRA adapter normalises by the norm of the *unmerged* weight: merged one after another, the later ones
    must not take the norm of a weight holding the earlier ones; unmerging gives the base weights back."""
    torch.manual_seed(0)
    base = ToyNet().eval()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    names = [f"a{i}" for i in range(len(kinds))]
    model = None
    for name, kind in zip(names, kinds):
        config = LoraConfig(r=2, target_modules=["conv", "fc1"], use_dora=kind == "dora", init_lora_weights=False)
        model = get_peft_model(base, config, adapter_name=name) if model is None else model
        if name != names[0]:
            model.add_adapter(name, config)
    model.base_model.set_adapter(names)
    model.eval()
    with torch.no_grad():
        out = model(*toy_inputs)
        model.merge_adapter()
        assert_close(model(*toy_inputs), out)
        model.unmerge_adapter()
        assert_close(model(*toy_inputs), out)
    restored = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    for key, value in weights.items():
        assert torch.allclose(restored[key], value, atol=1e-6), key


def test_conv_dora_saved_with_the_flat_magnitude_of_earlier_lorakit_still_loads(tmp_path, toy_inputs):
    from safetensors.torch import load_file, save_file

    base = ToyNet().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["conv"], use_dora=True)).eval()
    with torch.no_grad():
        model.base_model.model.conv.lora_magnitude_vector["default"].weight.mul_(1.5)
    out = model(*toy_inputs)
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v.reshape(-1) if k.endswith("magnitude_vector") else v for k, v in load_file(file).items()}, file)
    assert_close(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(*toy_inputs), out)
    old_state = {k.removesuffix(".weight") if "magnitude" in k else k: v.reshape(-1) if "magnitude" in k else v
                 for k, v in model.state_dict().items()}
    again = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["conv"], use_dora=True)).eval()
    again.load_state_dict(old_state)
    assert_close(again(*toy_inputs), out)


@pytest.mark.parametrize("init", [True, "gaussian", "pissa", "pissa_niter_4", "olora"])
def test_inits_keep_the_output_at_start(init):
    base = tiny_llama()
    x = _ids()
    ref = base(input_ids=x).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=ALL_LLAMA, init_lora_weights=init))
    assert_close(model(input_ids=x).logits, ref)


def test_pissa_saves_as_plain_lora_for_the_original_base(tmp_path):
    x = _ids()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    for p in model.parameters():  # move away from the init so the conversion matters
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn_like(p))
    out = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].r == 8
    assert_close(loaded(input_ids=x).logits, out)


def test_only_adapter_parameters_change_after_steps():
    base = tiny_llama("seq_cls")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                                            init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=_ids(4), labels=torch.tensor([0, 1, 2, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"


def test_save_load_round_trip_exact_and_keys(tmp_path):
    x = _ids()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=ALL_LLAMA + ["embed_tokens"],
                                                    init_lora_weights=False, use_dora=False))
    out = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert not any("default" in k for k in keys)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(input_ids=x).logits, out)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference: frozen"
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_base_checkpoint_loads_without_key_remapping():
    base = tiny_llama()
    state = copy.deepcopy(base.state_dict())
    model = get_peft_model(tiny_llama(seed=5), LoraConfig(r=2, target_modules=["q_proj"]))
    model.get_base_model().load_state_dict(state, strict=False)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, state["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(q.weight, q.base_layer.weight)  # base attributes pass through


def test_caller_config_is_not_modified():
    config = LoraConfig(r=2, task_type="CAUSAL_LM")
    snapshot = copy.deepcopy(config)
    model = get_peft_model(tiny_gpt2(), config)
    assert config == snapshot
    assert model.peft_config["default"].fan_in_fan_out is True
    assert model.peft_config["default"].target_modules == ["c_attn"]


def test_bf16_base_keeps_bf16_adapter_and_activations():
    base = tiny_llama().to(torch.bfloat16)
    x = _ids()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=ALL_LLAMA, init_lora_weights=False))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = model(input_ids=x).logits
    assert out.dtype == torch.bfloat16
    model.merge_adapter()
    assert_close(model(input_ids=x).logits, out, torch.bfloat16)
    fp32 = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]),
                          adapter_dtype=torch.float32)
    assert {p.dtype for p in fp32.parameters() if p.requires_grad} == {torch.float32}
    assert fp32(input_ids=x).logits.dtype == torch.bfloat16


def test_bias_modes():
    lora_only = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], bias="lora_only"))
    names = {n for n, p in lora_only.named_parameters() if p.requires_grad}
    assert any(n.endswith("query.base_layer.bias") for n in names)
    assert not any(n.endswith("key.bias") for n in names)
    every = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], bias="all"))
    assert any(n.endswith("key.bias") for n, p in every.named_parameters() if p.requires_grad)


def test_rank_and_alpha_patterns():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    rank_pattern={"layers.1.self_attn.q_proj": 2},
                                                    alpha_pattern={r".*v_proj": 16}))
    layers = model.get_base_model().model.layers
    assert layers[1].self_attn.q_proj.r["default"] == 2 and layers[0].self_attn.q_proj.r["default"] == 4
    assert layers[0].self_attn.v_proj.scaling["default"] == 4.0  # 16 / 4


def test_layers_to_transform_and_exclude():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear", layers_to_transform=[1],
                                                    exclude_modules=["o_proj"]))
    names = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert names and all(".layers.1." in n for n in names)
    assert not any(n.endswith("o_proj") for n in names)
    assert not any(n.endswith("lm_head") for n in names)


def test_get_peft_model_on_1b_llama_config_is_fast():
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000)
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)  # shapes only: what's timed is lorakit, not the base's random init
    base.to_empty(device="cpu")
    start = time.perf_counter()
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LLAMA))
    elapsed = time.perf_counter() - start
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192))
    assert elapsed < 2.0, f"get_peft_model took {elapsed:.2f}s"
