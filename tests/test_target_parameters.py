"""LoRA on parameters (`target_parameters`): fused MoE expert weights and 2-D weights, with PEFT's semantics and
files, and 'all-linear' on mixture-of-experts models resolving as PEFT 0.21 does (issue 26)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import AdapterError, ConfigError, TargetError
from lorakit.lora.parameters import LoraParameter

from .conftest import assert_close

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
KINDS = ["mixtral", "qwen3_moe", "gpt_oss"]


def tiny_moe(kind: str, seed: int = 0):
    """A 2-layer, 4-expert model of each transformers-5 MoE family (gpt-oss stores its experts transposed)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, num_experts_per_tok=2)
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **common)).eval()
    if kind == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=48, head_dim=8,
                                                        **common)).eval()
    return tf.GptOssForCausalLM(tf.GptOssConfig(num_local_experts=4, head_dim=8,
                                                layer_types=["sliding_attention", "full_attention"], **common)).eval()


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def expert_config(**overrides) -> LoraConfig:
    return LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "target_parameters": EXPERTS,
                         "init_lora_weights": False, **overrides})


def adapter_shapes(model) -> dict[str, tuple]:
    return {k.replace(".default", ""): tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" in k}


def peft_config(peft, config: LoraConfig):
    """The same config as PEFT's LoraConfig."""
    return peft.LoraConfig(**config.to_dict() | {"peft_type": None})


@pytest.fixture(scope="module")
def peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft
    return peft


# ---------------------------------------------------------------------- files move both ways
@pytest.mark.parametrize("kind", KINDS)
def test_expert_adapter_moves_both_ways_with_peft(kind, peft, tmp_path):
    base = logits(tiny_moe(kind))
    ours = get_peft_model(tiny_moe(kind), expert_config())
    assert logits(ours).sub(base).abs().max() > 1e-3  # the experts' update shows
    ours.save_pretrained(tmp_path / "ours")
    theirs_loaded = peft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "ours")
    assert adapter_shapes(theirs_loaded) == adapter_shapes(ours)  # PEFT's keys and shapes, (r·E, in), (out, r·E)
    assert_close(logits(theirs_loaded), logits(ours))

    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_moe(kind), peft_config(peft, expert_config()))
    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "theirs")
    assert_close(logits(ours_loaded), logits(theirs))


@pytest.mark.parametrize("kind", KINDS)
def test_all_linear_adapts_the_experts_and_peft_loads_it_identically(kind, peft, tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    ours = get_peft_model(tiny_moe(kind), config)
    resolved = ours.peft_config["default"]
    assert {"gate_up_proj", "down_proj"} <= set(resolved.target_parameters)
    assert any(isinstance(m, LoraParameter) and m.num_experts == 4 for m in ours.modules())
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] != "all-linear" and saved["target_parameters"] == resolved.target_parameters
    theirs = peft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path)
    assert adapter_shapes(theirs) == adapter_shapes(ours)
    assert_close(logits(theirs), logits(ours))
    if kind != "gpt_oss":  # PEFT's own all-linear on these families: the same targets, ranks and shapes
        peft_model = peft.get_peft_model(tiny_moe(kind), peft_config(peft, config))
        theirs_config = peft_model.peft_config["default"]
        assert sorted(theirs_config.target_modules) == resolved.target_modules
        assert sorted(theirs_config.target_parameters) == resolved.target_parameters
        assert theirs_config.rank_pattern == resolved.rank_pattern  # gate_up_proj: w1 + w3 fused, rank 2r
        assert adapter_shapes(peft_model) == adapter_shapes(ours)


# ---------------------------------------------------------------------- merge, unmerge, safe merge
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_merge_equals_adapted_and_unmerge_restores(kind):
    model = get_peft_model(tiny_moe(kind), expert_config(target_parameters=EXPERTS + ["mlp.gate.weight"]))
    experts = model.base_model.model.model.layers[0].mlp.experts
    before = experts.owner().gate_up_proj.detach().clone()
    adapted = logits(model)
    model.merge_adapter()
    assert not torch.equal(experts.owner().gate_up_proj, before)
    assert_close(logits(model), adapted)
    model.unmerge_adapter()
    assert torch.allclose(experts.owner().gate_up_proj, before, atol=1e-6)
    assert_close(logits(model), adapted)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraParameter) for m in merged.modules())
    assert type(merged.model.layers[0].mlp.experts).__name__.endswith("Experts")
    assert_close(logits(merged), adapted)


def test_safe_merge_refuses_non_finite_and_leaves_weights():
    model = get_peft_model(tiny_moe("mixtral"), expert_config())
    layer = next(m for m in model.modules() if isinstance(m, LoraParameter) and m.parameter_name == "down_proj")
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    before = layer.parameter().detach().clone()
    with pytest.raises(AdapterError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.parameter(), before) and not layer.merged_adapters


# ---------------------------------------------------------------------- training
def test_training_step_changes_only_adapter_parameters():
    model = get_peft_model(tiny_moe("qwen3_moe"), expert_config())
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any("experts.base_layer.lora_A" in n for n in trainable)  # the inner (gate_up_proj) factors train too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=IDS, labels=IDS).loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable


def test_dropout_and_combination_are_refused_as_in_peft():
    with pytest.raises(ConfigError, match="lora_dropout"):
        get_peft_model(tiny_moe("mixtral"), expert_config(lora_dropout=0.1))
    with pytest.raises(TargetError, match="matched no parameter"):  # (nothing adapted at all)
        get_peft_model(tiny_moe("mixtral"), expert_config(target_modules=[], target_parameters=["experts.nope"]))
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):  # PEFT warns when modules matched
        get_peft_model(tiny_moe("mixtral"), expert_config(target_parameters=["experts.nope"]))
    model = get_peft_model(tiny_moe("mixtral"), expert_config())
    with pytest.raises(ConfigError, match="target_parameters cannot be combined"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


# ---------------------------------------------------------------------- several adapters
def test_several_adapters_switch_sum_disable_and_route():
    base = logits(tiny_moe("mixtral"))
    model = get_peft_model(tiny_moe("mixtral"), expert_config())
    torch.manual_seed(5)
    model.add_adapter("other", expert_config())
    wrappers = [m for m in model.modules() if isinstance(m, LoraParameter)]
    assert len(wrappers) == 4 and all(set(m.r) == {"default", "other"} for m in wrappers)  # one wrapper each
    first = logits(model)
    model.set_adapter("other")
    second = logits(model)
    assert (first - second).abs().max() > 1e-3
    with model.disable_adapter():
        assert_close(logits(model), base)
    model.set_adapter(["default", "other"])
    both = logits(model)
    model.merge_adapter()  # merging both adds both updates
    assert_close(logits(model), both)
    model.unmerge_adapter()
    model.set_adapter("default")
    assert_close(logits(model, adapter_names=["other", "other"]), second)  # one adapter per batch is fine
    assert_close(logits(model, adapter_names=["__base__", "__base__"]), base)
    mixed = logits(model, adapter_names=["other", "__base__"])  # each row as if alone (PEFT refuses this)
    assert_close(mixed[0], second[0])
    assert_close(mixed[1], base[1])
    with pytest.raises(ConfigError, match="same parameters"):
        model.add_adapter("third", expert_config(target_parameters=EXPERTS[:1]))
    model.delete_adapter("other")
    assert all(set(m.r) == {"default"} for m in wrappers)
    assert_close(logits(model), first)


def test_peft_refuses_the_mixed_batches_lorakit_computes(peft):
    theirs = peft.get_peft_model(tiny_moe("mixtral"), peft_config(peft, expert_config()))
    theirs.add_adapter("other", peft_config(peft, expert_config()))
    theirs.eval()
    with pytest.raises(ValueError, match="mixed"):
        logits(theirs, adapter_names=["default", "other"])


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A tiny Qwen3-MoE folder with a local tokenizer, as `lorakit train` and `inspect` read one."""
    from tests.test_data_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_moe("qwen3_moe")
    model.resize_token_embeddings(len(tok))
    model.config.update({"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                         "bos_token_id": tok.bos_token_id})
    folder = tmp_path_factory.mktemp("tiny-qwen3-moe")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_inspect_and_estimate_count_the_experts(moe_folder, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.cli.main import main

    main(["inspect", str(moe_folder), "--json", "--ranks", "2"])
    facts = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in facts["expert_parameters"]}
    assert rows["experts.gate_up_proj"]["shape"] == [4, 96, 32] and rows["experts.gate_up_proj"]["count"] == 2
    assert rows["experts.down_proj"]["lora_params"]["2"] == 2 * 2 * 4 * (32 + 48)  # layers · r · E · (in + out)
    actual = get_peft_model(AutoModelForCausalLM.from_pretrained(moe_folder),
                            LoraConfig(r=2, target_modules="all-linear"))
    assert facts["lora_params"]["all-linear"]["2"] == actual.get_nb_trainable_parameters()[0]
    assert facts["default_targets"]["attention+mlp (lorakit train)"] == "all-linear"

    main(["estimate", "--model", str(moe_folder / "config.json"), "--r", "2", "--targets", "all-linear", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["estimates"]["lora"]["trainable_params"] == actual.get_nb_trainable_parameters()[0]


def test_train_on_moe_adapts_the_experts_by_default(moe_folder, tmp_path, capsys, peft):
    from lorakit.cli.main import main

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["blue", "red", "at noon", "a key"] * 4]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    main(["train", "--model", str(moe_folder), "--data", str(data), "--max-steps", "2", "--batch-size", "4",
          "--seq-len", "32", "--r", "2", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "LoRA on parameters: " in printed
    assert "model.layers.*.mlp.experts.gate_up_proj (x2, 4 experts each" in printed
    assert "dropout 0.05 -> 0" in printed  # PEFT takes no dropout on parameters
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {"gate_up_proj", "down_proj"} <= set(saved["target_parameters"])
    from transformers import AutoModelForCausalLM

    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_folder), out / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_folder), out / "adapter")
    ids = torch.tensor([[5, 9, 14, 3, 30]])
    with torch.no_grad():
        assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_serve_engine_batches_requests_of_different_expert_adapters():
    """lorakit serve's engine runs rows of several adapters (and padding rows) in one pass: each request's greedy
    tokens equal those it gets alone."""
    from lorakit.serve.engine import Engine, SamplingParams

    model = get_peft_model(tiny_moe("qwen3_moe"), expert_config(), adapter_name="a")
    torch.manual_seed(7)
    model.add_adapter("b", expert_config())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    prompts, adapters = [[5, 9, 14, 3], [7, 7, 2], [30, 4, 8, 9, 10], [1, 2]], ["a", "b", "__base__", "a"]
    from tests.test_data_helpers import tiny_tokenizer
    from tests.test_serve_engine import concurrently

    engine = Engine(model, tiny_tokenizer(), max_batch=4, eos_token_ids=[]).start()
    try:
        params = SamplingParams(max_tokens=6)
        alone = [engine.generate(p, a, params) for p, a in zip(prompts, adapters)]
        together = concurrently(engine, params, prompts, adapters)
        assert engine.max_rows_seen >= 2 and together == alone
        assert alone[0] != alone[2]  # the expert adapters change what is generated
    finally:
        engine.stop()
