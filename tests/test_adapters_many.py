"""Many adapters over one base: activation, sums, mixed batches, deletion, weighted combinations."""
import pytest
import torch

from lorakit import AdapterError, ConfigError, LoraConfig, PeftModel, get_peft_model
from tests.conftest import assert_close, tiny_bert, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids(batch=3, seed=5):
    return torch.randint(1, 128, (batch, 6), generator=torch.Generator().manual_seed(seed))


def _two_adapters(r_b=4, **kw):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kw))
    model.add_adapter("b", LoraConfig(r=r_b, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False, **kw))
    return model.eval()


def _out(model, x=None, **kw):
    return model(input_ids=_ids() if x is None else x, **kw).logits


def _delta(model, adapter):
    """ΔW of one layer for one adapter."""
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    return layer.delta_weight(adapter)


def test_set_adapter_and_sum_of_two():
    model = _two_adapters()
    a = _out(model)
    model.set_adapter("b")
    b = _out(model)
    assert model.active_adapter == "b" and (a - b).abs().max() > 1e-3
    model.set_adapter(["default", "b"])
    both = _out(model)
    merged_both = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))  # placeholder shape
    del merged_both
    model.merge_adapter()
    assert_close(_out(model), both)
    model.unmerge_adapter()
    with model.disable_adapter():
        base = _out(model)
    # The summed update equals the sum of the two updates, layer by layer.
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert_close(layer.base_layer.weight - w0, _delta(model, "default") + _delta(model, "b"))
    model.unmerge_adapter()
    assert (both - base).abs().max() > 1e-3


def test_mixed_batch_rows_equal_single_adapter_runs():
    model = _two_adapters()
    x = _ids(3)
    mixed = _out(model, x, adapter_names=["default", "__base__", "b"])
    model.set_adapter("default")
    assert_close(mixed[0], _out(model, x)[0])
    model.set_adapter("b")
    assert_close(mixed[2], _out(model, x)[2])
    with model.disable_adapter():
        assert_close(mixed[1], _out(model, x)[1])


def test_mixed_batch_generate_equals_single_runs():
    model = _two_adapters()
    x = _ids(3)
    names = ["b", "default", "__base__"]
    gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=names, max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                single = model.generate(input_ids=x[i:i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        else:
            model.set_adapter(name)
            single = model.generate(input_ids=x[i:i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(gen[i], single[0]), name


def test_mixed_batch_with_modules_to_save_heads():
    model = get_peft_model(tiny_llama("seq_cls"), LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS",
                                                             init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS", init_lora_weights=False))
    head = model.get_base_model().score.modules_to_save["other"]
    torch.nn.init.normal_(head.weight)
    model.eval()
    x = _ids(2)
    mixed = _out(model, x, adapter_names=["default", "other"])
    model.set_adapter("other")
    assert_close(mixed[1], _out(model, x)[1])


def test_unknown_adapter_names_and_merged_routing_are_refused():
    model = _two_adapters()
    with pytest.raises(AdapterError, match="non-existing adapter"):
        _out(model, adapter_names=["nope", "b", "b"])
    model.merge_adapter()
    with pytest.raises(AdapterError, match="unmerge"):
        _out(model, adapter_names=["b", "b", "b"])


def test_delete_adapter():
    model = _two_adapters()
    model.set_adapter("b")
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".b." in n for n, _ in model.named_parameters())


def test_save_several_adapters_and_load_adapter(tmp_path):
    model = _two_adapters()
    model.set_adapter("b")
    expected_b = _out(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "b" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.set_adapter("b")
    assert torch.equal(_out(loaded), expected_b)


def test_linear_of_one_adapter_is_w_times_delta():
    model = _two_adapters()
    model.add_weighted_adapter(["default"], [0.3], "scaled", combination_type="linear")
    assert_close(_delta(model, "scaled"), 0.3 * _delta(model, "default"))
    model.add_weighted_adapter(["default"], [-0.5], "negated", combination_type="linear")
    assert_close(_delta(model, "negated"), -0.5 * _delta(model, "default"))


def test_cat_is_the_exact_weighted_sum_and_svd_reproduces_it():
    model = _two_adapters(r_b=2)
    expected = 0.6 * _delta(model, "default") + 0.4 * _delta(model, "b")
    model.add_weighted_adapter(["default", "b"], [0.6, 0.4], "cat", combination_type="cat")
    assert_close(_delta(model, "cat"), expected)
    model.add_weighted_adapter(["default", "b"], [0.6, 0.4], "svd", combination_type="svd", svd_rank=6)
    assert_close(_delta(model, "svd"), expected)
    model.set_adapter(["default", "b"])
    x = _ids()
    # cat output == both adapters active with the weights folded in: check against merged weights
    model.set_adapter("cat")
    cat_out = _out(model, x)
    model.set_adapter("svd")
    assert_close(_out(model, x), cat_out)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_ties_svd"])
def test_ties_and_dare_produce_finite_adapters(method, tmp_path):
    torch.manual_seed(0)
    model = _two_adapters()
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix", combination_type=method, density=0.5)
    delta = _delta(model, "mix")
    assert torch.isfinite(delta).all() and delta.abs().max() > 0
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix")


def test_ties_with_density_one_and_agreeing_signs_is_weighted_mean():
    from lorakit.lora.combine import _ties

    a, b = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([3.0, 2.0, -1.0])
    out = _ties([a, b], torch.tensor([1.0, 1.0]), 1.0, "total")
    assert torch.allclose(out, (a + b) / 2)


def test_combination_errors_are_collected():
    model = _two_adapters(r_b=2)
    with pytest.raises(ConfigError) as e:
        model.add_weighted_adapter(["default", "zzz"], [1.0], "x", combination_type="wild")
    assert "zzz" in str(e.value) and "weights" in str(e.value) and "wild" in str(e.value)
    with pytest.raises(ConfigError, match="equal rank"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="linear")


def test_bert_modules_to_save_and_task_head():
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    assert model.peft_config["default"].target_modules == ["query", "value"]
