"""Bad input gets a clear error naming what and where; adapter files are safe to read and write."""
import copy
import json
import os

import pytest
import torch

from lorakit import AdapterError, ConfigError, LoraConfig, PeftModel, TargetError, get_peft_model
from lorakit.atomic import atomic_directory, atomic_write_text
from lorakit.lora.files import read_adapter_tensors
from tests.conftest import tiny_gpt2, tiny_llama


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as e:  # (an unknown bias is refused by get_peft_model, as PEFT refuses it)
        LoraConfig(r=0, lora_alpha=-1, lora_dropout=2, init_lora_weights="magic")
    text = str(e.value)
    for fragment in ("r must be", "lora_alpha", "lora_dropout", "init_lora_weights"):
        assert fragment in text
    assert len(e.value.problems) == 4


def test_target_that_matches_nothing_lists_closest_names():
    with pytest.raises(TargetError) as e:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_projj", "v_prj"]))
    assert "q_proj" in str(e.value) and "v_proj" in str(e.value)


def test_a_target_like_no_name_lists_the_layers_lora_can_wrap():
    with pytest.raises(TargetError) as e:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["query"]))
    assert "(the layers LoRA can wrap)" in str(e.value) and "gate_proj" in str(e.value)
    assert "layers," not in str(e.value)  # containers and norms are not offered


def test_target_on_unsupported_module_type():
    with pytest.raises(TargetError, match="cannot wrap"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


def test_unknown_architecture_without_targets():
    with pytest.raises(TargetError, match="no default target_modules"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig())


def test_modules_to_save_typo_warns_with_the_closest_names_and_runs_on_as_peft():
    with pytest.warns(UserWarning, match=r"\['lm_haed'\] matched no module of LlamaForCausalLM.*Closest module names: lm_head"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"]))
    with pytest.warns(UserWarning, match="embed_tokens, layers, lm_head, model, norm, .*outside the repeated layers"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["zzz"]))


def _saved(tmp_path, make=tiny_llama):
    model = get_peft_model(make(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    return model


def test_wrong_base_shapes_are_refused(tmp_path):
    _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(AdapterError, match="different base model"):
        PeftModel.from_pretrained(other, tmp_path)


def test_wrong_base_weights_are_refused_unless_overridden(tmp_path):
    _saved(tmp_path)
    with pytest.raises(AdapterError, match="weights of .* differ"):
        PeftModel.from_pretrained(tiny_llama(seed=99), tmp_path)
    PeftModel.from_pretrained(tiny_llama(seed=99), tmp_path, ignore_base_mismatch=True)


def test_same_base_in_bf16_is_accepted(tmp_path):
    _saved(tmp_path)
    PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path)


def test_shape_mismatch_without_metadata_names_keys(tmp_path):
    _saved(tmp_path)
    os.remove(tmp_path / "lorakit.json")  # a PEFT adapter: no fingerprint, the shapes still decide
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight: adapter \(2, 32\) vs model \(2, 64\)"):
        PeftModel.from_pretrained(other, tmp_path)


def test_pickle_is_refused_unless_allowed(tmp_path):
    model = _saved(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    x = torch.randint(1, 128, (1, 5))
    assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_damaged_files_give_clear_errors(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="damaged"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")


def test_lorakit_metadata_file(tmp_path):
    model = _saved(tmp_path)
    meta = json.loads((tmp_path / "lorakit.json").read_text())
    assert meta["base_fingerprint"]["architecture"] == "llama"
    assert meta["base_fingerprint"]["shapes"]["model.layers.0.self_attn.q_proj"] == [32, 32]
    assert {"lorakit", "torch", "safetensors"} <= set(meta["versions"])
    model.adapter_metadata["default"]["metrics"] = {"eval_loss": 1.5}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "lorakit.json").read_text())["metrics"] == {"eval_loss": 1.5}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(tmp):
        open(tmp, "w").write("partial")
        raise OSError("disk full")

    from lorakit.atomic import atomic_write

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "d") as d:
            (d / "x").write_text("1")
            raise RuntimeError
    assert not (tmp_path / "d").exists()


def test_dora_on_multihead_attention_is_a_clear_error():
    # (DoRA on embeddings is supported since issue 23: tests/test_peft_layers_extra.py)
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    with pytest.raises(AdapterError, match="MultiheadAttention does not support DoRA"):
        get_peft_model(model, LoraConfig(target_modules=["0"], use_dora=True))


def test_safe_merge_refuses_non_finite():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, init_lora_weights=False))
    layer = model.get_base_model().transformer.h[1].attn.c_attn  # a layer merged after others
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(AdapterError, match=r"into transformer\.h\.1\.attn\.c_attn .*non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "base_layer" in n)  # bit for bit
    assert not any(l.merged_adapters for l in model.modules() if hasattr(l, "merged_adapters"))
    assert type(model.get_base_model().transformer.h[0].attn.c_attn).__name__ == "LoraLinear"  # nothing unwrapped


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    import os
    import stat

    from lorakit.atomic import atomic_directory, atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    (tmp_path / "plain_dir").mkdir()
    with atomic_directory(tmp_path / "atomic_dir") as d:
        (d / "f").write_text("x")
        (d / "private").write_text("x")
        os.chmod(d / "private", 0o600)  # as safetensors' save_file makes its files
    assert stat.S_IMODE(os.stat(tmp_path / "atomic_dir").st_mode) == \
        stat.S_IMODE(os.stat(tmp_path / "plain_dir").st_mode)
    assert stat.S_IMODE(os.stat(tmp_path / "atomic_dir" / "private").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_weights_past_2_to_the_24_elements_fingerprint_and_load_back(tmp_path):
    # float32 cannot count every index past 2^24: sampling must pick the same elements on save and on load
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Embedding(70_000, 256), torch.nn.Linear(256, 8)).to(torch.bfloat16)
    fresh = copy.deepcopy(base)
    get_peft_model(base, LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path)
    PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path)
    with torch.no_grad():
        fresh[0].weight.mul_(3)
    with pytest.raises(AdapterError, match="weights of 0 differ"):
        PeftModel.from_pretrained(fresh, tmp_path)


def test_layers_pattern_alone_is_refused_as_in_peft_and_a_pickle_save_keeps_the_safetensors_file(tmp_path):
    with pytest.raises(ConfigError, match="set layers_to_transform too"):
        LoraConfig(layers_pattern="layers")
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_model.bin").is_file()
    pickled = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    assert pickled.keys() == read_adapter_tensors(tmp_path).keys()  # the same tensors under the same keys


def test_load_adapter_under_an_existing_name_replaces_its_weights_as_peft(tmp_path):
    model = _saved(tmp_path)
    x = torch.randint(1, 128, (1, 5))
    saved = model(input_ids=x).logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(3)
    assert not torch.allclose(model(input_ids=x).logits, saved)
    model.load_adapter(tmp_path, "default")
    torch.testing.assert_close(model(input_ids=x).logits, saved)
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"])).save_pretrained(tmp_path / "k")
    get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=64, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError, match="does not fit this model"):  # other targets: checked before any copy
        model.load_adapter(tmp_path / "k", "default")
    with pytest.raises(AdapterError, match="differ in lora_alpha 8 vs 64"):
        model.load_adapter(tmp_path / "a", "default")
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters() if "lora_" in n)
    model.merge_adapter()  # the base check sees the weights as they were before the merge
    with pytest.raises(AdapterError, match="unmerge it before loading"):
        model.load_adapter(tmp_path, "default")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))  # fingerprinted unmerged, too
    model.save_pretrained(tmp_path / "more", selected_adapters=["b"])
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "more" / "b")


def test_an_embedding_adapter_saved_while_merged_carries_the_unmerged_weight(tmp_path, monkeypatch):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    x = torch.randint(1, 128, (1, 5))
    expected = model(input_ids=x).logits
    model.merge_adapter()
    monkeypatch.chdir(tmp_path)  # a stray ./config.json is not taken for the base's (a from-config model has none)
    (tmp_path / "config.json").write_text("not json")
    model.save_pretrained(tmp_path / "a")
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")(input_ids=x).logits, expected)
