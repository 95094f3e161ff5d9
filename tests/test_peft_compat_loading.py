"""PEFT's low_cpu_mem_usage (adapter factors made empty on the meta device, filled by a load) and the PEFT rules
and messages around several adapters, from lorakit (issue 23)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import (AdapterError, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict,
                     inject_adapter_in_model, set_peft_model_state_dict)

from .conftest import tiny_llama


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin0 = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 1)
        self.lin1 = nn.Linear(8, 4)
        self.gru = nn.GRU(4, 4, batch_first=True)

    def forward(self, x):
        h = self.lin0(self.emb(x))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.gru(self.lin1(h))[0]


X = torch.tensor([[1, 2, 3], [4, 5, 6]])
TARGETS = ["emb", "lin0", "conv", "lin1"]


def _lora_devices(model) -> set[str]:
    return {p.device.type for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("use_dora", [False, True])
def test_low_cpu_mem_usage_loads_the_same_model(tmp_path, use_dora):
    torch.manual_seed(0)
    trained = get_peft_model(Net(), LoraConfig(target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora))
    trained.save_pretrained(tmp_path)
    expected = trained(X)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Net(), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(loaded(X), expected)
    torch.manual_seed(0)
    fresh = get_peft_model(Net(), LoraConfig(target_modules=["lin0"]), low_cpu_mem_usage=True)
    assert _lora_devices(fresh) == {"meta"}  # nothing initialised, as PEFT
    fresh.load_adapter(tmp_path, "other", low_cpu_mem_usage=True)
    assert {p.device.type for n, p in fresh.named_parameters() if ".other" in n} == {"cpu"}
    fresh.set_adapter("other")
    torch.testing.assert_close(fresh(X), expected)


def test_low_cpu_mem_usage_with_the_low_level_api():
    torch.manual_seed(0)
    trained = get_peft_model(Net(), LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(trained).items()}
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(target_modules=TARGETS), Net(), low_cpu_mem_usage=True)
    assert _lora_devices(model) == {"meta"}
    set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    torch.testing.assert_close(model(X), trained(X))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the loaded factors still train


def test_two_active_adapters_cannot_both_have_a_copy_of_one_module():
    model = get_peft_model(Net(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]  # refused before anything changed
    with pytest.raises(ValueError, match=r"Cannot add weighted adapters if they target the same module with "
                                         r"modules_to_save, but found 1 such instance\(s\)\."):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "merged", combination_type="linear")
    model.add_adapter("third", LoraConfig(target_modules=["lin0"]))
    model.set_adapter(["default", "third"])  # one copy each: fine


def test_peft_wording_for_adapter_name_errors():
    model = get_peft_model(Net(), LoraConfig(target_modules=["lin0"], modules_to_save=["gru"])).eval()
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): a, b"):
        model(X, adapter_names=["b", "a"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(torch.tensor([[1], [2], [3]]), adapter_names=["default", "__base__"])
    with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules"):
        model(X, adapter_names=["default", "__base__"])  # the GRU copy returns a tuple: rows cannot be routed
    model.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        model(X, adapter_names=["default", "default"])


def test_trained_token_rows_answer_in_for_their_adapters():
    model = get_peft_model(Net(), LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [1]}))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [2]}))
    originals = model.base_model.model.emb.token_adapter.trainable_tokens_original
    assert "default" in originals and "other" in originals
    model.delete_adapter("other")
    assert "other" not in originals and "default" in originals


def test_save_embedding_layers_warnings_say_what_peft_says(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True` as embedding layers found"):
        model.save_pretrained(tmp_path / "a")
    custom = get_peft_model(Net(), LoraConfig(target_modules=["emb"]))
    with pytest.warns(UserWarning, match=r"Could not identify embedding layer\(s\) because the model is not a"):
        custom.save_pretrained(tmp_path / "b", save_embedding_layers=True)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_uses_the_given_config_object_itself(tmp_path, is_trainable):
    torch.manual_seed(0)
    trained = get_peft_model(Net(), LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    trained.save_pretrained(tmp_path)
    expected = trained(X)
    config = LoraConfig(target_modules=TARGETS, init_lora_weights="gaussian", inference_mode=is_trainable)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Net(), tmp_path, is_trainable=is_trainable, config=config)
    assert loaded.peft_config["default"] is config  # PEFT: the object, not a copy
    assert config.inference_mode is (not is_trainable)
    assert config.init_lora_weights == "gaussian"  # the caller's values stay; the file's weights are loaded
    torch.testing.assert_close(loaded(X), expected)
    assert {p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n} == {is_trainable}
    loaded.save_pretrained(tmp_path / "again")
    assert LoraConfig.from_pretrained(tmp_path / "again").target_modules == config.target_modules
