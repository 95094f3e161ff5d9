"""PEFT's API surface that code written for PEFT touches: keyword arguments, properties, layer objects and the
low-level state-dict functions, with PEFT 0.21.2's meaning (issue 23, groups 2, 6, 7 and 8)."""
import peft
import pytest
import torch
from torch import nn

from lorakit import (LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model,
                     set_peft_model_state_dict)
from tests.conftest import ToyNet, assert_close, tiny_gpt2

ALL = ["emb", "conv", "conv1d", "fc1"]


def _toy(dtype=torch.float32):
    torch.manual_seed(0)  # the same base each time: loading checks the base's fingerprint
    return ToyNet().to(dtype)


def _adapter_dtypes(model, name="default"):
    return {p.dtype for n, p in model.named_parameters() if model.prefix in n and f".{name}" in n}


@pytest.mark.parametrize("autocast, expected", [(True, torch.float32), (False, torch.bfloat16),
                                                (None, torch.bfloat16)])
def test_autocast_adapter_dtype_everywhere(autocast, expected, tmp_path):
    kwargs = {} if autocast is None else {"autocast_adapter_dtype": autocast}
    model = get_peft_model(_toy(torch.bfloat16), LoraConfig(target_modules=ALL), **kwargs)
    model.add_adapter("other", LoraConfig(target_modules=["fc1"]), **kwargs)
    assert _adapter_dtypes(model) == _adapter_dtypes(model, "other") == {expected}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_toy(torch.bfloat16), tmp_path, **kwargs)
    loaded.load_adapter(tmp_path / "other", adapter_name="other", **kwargs)
    assert _adapter_dtypes(loaded) == _adapter_dtypes(loaded, "other") == {expected}


def test_get_peft_model_refuses_unknown_keywords_and_records_revision():
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_option'"):
        get_peft_model(ToyNet(), LoraConfig(target_modules=["fc1"]), not_an_option=1)
    model = get_peft_model(ToyNet(), LoraConfig(target_modules=["fc1"]), revision="v2", low_cpu_mem_usage=False)
    assert model.peft_config["default"].revision == "v2"


def test_peft_type_is_the_enum_and_names_match_peft():
    model = get_peft_model(ToyNet(), LoraConfig(target_modules=["fc1"]))
    assert model.peft_type.value == "LORA" and model.peft_type == peft.PeftType.LORA
    assert model.active_peft_config.peft_type == "LORA"
    assert model.prefix == model.base_model.prefix == model.base_model.model.fc1.prefix == "lora_"
    assert model.base_model.active_adapter == "default"
    assert LoraConfig.from_dict(model.peft_config["default"].to_dict()).to_dict()["peft_type"] == "LORA"


def test_has_active_enabled_adapter_and_requires_grad_under_disable_adapter():
    model = get_peft_model(ToyNet(), LoraConfig(target_modules=ALL, modules_to_save=["fc2"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert model.has_active_enabled_adapter and trainable
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter
        assert not any(p.requires_grad for p in model.parameters())  # as PEFT
        with model.disable_adapter():
            assert not model.has_active_enabled_adapter
        assert not any(p.requires_grad for p in model.parameters())
    assert model.has_active_enabled_adapter
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_load_adapter_returns_peft_load_result(tmp_path):
    get_peft_model(_toy(), LoraConfig(target_modules=ALL)).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(_toy(), tmp_path)
    result = model.load_adapter(tmp_path, adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_from_pretrained_refuses_a_config_that_is_not_one(tmp_path):
    get_peft_model(ToyNet(), LoraConfig(target_modules=["fc1"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="The input config must be a PeftConfig"):
        PeftModel.from_pretrained(ToyNet(), tmp_path, config={"r": 4})


def test_state_dict_functions_on_an_injected_model(toy_inputs):
    config = LoraConfig(target_modules=ALL, modules_to_save=["fc2"], init_lora_weights=False)
    torch.manual_seed(0)
    model = inject_adapter_in_model(config, ToyNet())
    expected = model(*toy_inputs)
    state = get_peft_model_state_dict(model)
    assert "fc1.lora_A.weight" in state and "fc2.weight" in state and not any(k.startswith("base_model") for k in state)
    torch.manual_seed(0)
    fresh = ToyNet()
    torch.manual_seed(1)
    fresh = inject_adapter_in_model(config, fresh)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    assert_close(fresh(*toy_inputs), expected)


def test_layer_objects_read_as_peft_layers():
    model = get_peft_model(ToyNet(), LoraConfig(target_modules=ALL))
    inner = model.base_model.model
    assert repr(inner.fc1).startswith("lora.Linear") and "in_features=14" in repr(inner.fc1)
    assert repr(inner.emb).startswith("lora.Embedding")
    assert repr(inner.conv).startswith("lora.Conv2d") and repr(inner.conv1d).startswith("lora.Conv1d")
    gpt2 = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]))
    assert repr(gpt2.base_model.model.transformer.h[0].attn.c_attn).startswith("lora.Linear")
    assert inner.fc1.get_base_layer() is inner.fc1.base_layer and isinstance(inner.fc1.get_base_layer(), nn.Linear)
    assert inner.fc1.adapter_layer_names == ("lora_A", "lora_B", "lora_magnitude_vector")
    assert inner.emb.adapter_layer_names[:2] == ("lora_embedding_A", "lora_embedding_B")
    for name in inner.emb.adapter_layer_names + inner.emb.other_param_names:
        assert "default" in getattr(inner.emb, name) or name == "lora_magnitude_vector"


def test_modules_to_save_wrapper_lists_only_its_own_active_adapters():
    model = get_peft_model(ToyNet(), LoraConfig(target_modules=["fc1"]))
    model.add_adapter("other", LoraConfig(target_modules=["fc1"], modules_to_save=["fc2"]))
    wrapper = model.base_model.model.fc2
    assert wrapper.active_adapters == [] and wrapper.adapter_layer_names == ("modules_to_save",)
    assert wrapper.modules_to_save["other"].weight.requires_grad is False
    model.set_adapter("other")
    assert wrapper.active_adapters == ["other"] and wrapper.modules_to_save["other"].weight.requires_grad is True
