"""PEFT's get_base_model_state_dict / set_base_model_state_dict and PeftWarning, from `lorakit` (issue 23)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit import (LoraConfig, PeftWarning, get_base_model_state_dict, get_peft_model, get_peft_model_state_dict,
                     inject_adapter_in_model, set_base_model_state_dict)

from .conftest import tiny_gpt2


class Net(nn.Module):
    """Every kind of wrapper lorakit puts in: LoRA on Linear / Embedding / MultiheadAttention (whose out_proj is
    wrapped inside its base layer), a modules_to_save copy, and trained token rows."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lin0 = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin1 = nn.Linear(8, 4)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x):
        h = self.lin0(self.emb(x)) * self.scale
        return self.lin1(self.mha(h, h, h)[0])


def _net_config(targets=("lin0", "emb", "mha"), **kw):
    return LoraConfig(target_modules=list(targets), modules_to_save=["lin1"], init_lora_weights=False, **kw)


def _perturbed(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)


@pytest.mark.parametrize("config", [_net_config(),
                                    _net_config(("lin0", "mha"), trainable_token_indices={"emb": [1, 3]})],
                         ids=["lora+saved", "lora+tokens"])
def test_base_state_dict_has_the_base_keys_and_values(config):
    torch.manual_seed(0)
    base = Net()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    state = get_base_model_state_dict(model)
    assert set(state) == set(original)
    for key, value in original.items():
        assert torch.equal(state[key], value), key


def test_set_base_state_dict_restores_the_base_and_keeps_the_adapter():
    torch.manual_seed(0)
    base = Net()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, _net_config())
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    _perturbed(model)
    result = set_base_model_state_dict(model, original, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    restored = get_base_model_state_dict(model)
    assert all(torch.equal(restored[k], original[k]) for k in original)
    after = get_peft_model_state_dict(model)
    assert all(not torch.equal(after[k], adapter[k]) for k in adapter)  # perturbed, and set_... left them alone


def test_set_base_state_dict_strict_names_missing_and_unexpected_keys():
    model = get_peft_model(Net(), _net_config())
    state = get_base_model_state_dict(model)
    state.pop("lin0.weight")
    state["not.a.key"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*lin0\.weight.*Unexpected key\(s\).*not\.a\.key"):
        set_base_model_state_dict(model, state)
    result = set_base_model_state_dict(model, state, strict=False)
    assert result.missing_keys == ["lin0.weight"] and result.unexpected_keys == ["not.a.key"]


def test_base_state_dict_of_a_transformers_model_and_of_inject_adapter_in_model():
    base = tiny_gpt2()
    keys = set(base.state_dict())
    model = get_peft_model(base, LoraConfig(target_modules=["c_attn", "c_proj"], modules_to_save=["lm_head"]))
    assert set(get_base_model_state_dict(model)) == keys
    plain = tiny_gpt2()
    inject_adapter_in_model(LoraConfig(target_modules=["c_attn"]), plain)
    assert set(get_base_model_state_dict(plain)) == keys


def test_peft_warning_is_exported_and_used_for_lora_bias_without_a_base_bias():
    assert issubclass(PeftWarning, UserWarning) and "PeftWarning" in lorakit.__all__
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.warns(PeftWarning, match=r"`lora_bias=True` was passed but the targeted layer of type Linear"):
        get_peft_model(model, LoraConfig(target_modules=["0"], lora_bias=True))


def test_saving_an_ungathered_shard_warns_and_still_writes(tmp_path):
    model = get_peft_model(Net(), _net_config())
    model.base_model.model.lin0.lora_A["default"].weight.data = torch.zeros(32)  # as ZeRO-3 leaves a shard: 1-D
    with pytest.warns(PeftWarning, match=r"DeepSpeed ZeRO-3 / FSDP shards"):
        model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    with pytest.warns(PeftWarning, match=r"lin0\.lora_A"):
        get_peft_model_state_dict(model)


def test_saving_a_normal_adapter_with_lora_bias_does_not_warn(tmp_path):
    model = get_peft_model(Net(), LoraConfig(target_modules=["lin0"], lora_bias=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)
        model.save_pretrained(tmp_path / "b")
