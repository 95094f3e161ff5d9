"""LoraConfig and get_peft_model check what PEFT checks, when PEFT checks it, with PEFT's exception type and words
(then lorakit's own detail), so code written against PEFT's errors and warnings behaves the same."""
import re
import warnings

import pytest
import torch
from torch import nn

from lorakit import ConfigError, LoraConfig, get_peft_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(12, 10)

    def forward(self, x):
        return self.linear(x)


RSLORA_WARNING = re.escape("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "corda"])
@pytest.mark.parametrize("pattern", [{"rank_pattern": {"linear": 2}}, {"alpha_pattern": {"linear": 2}}])
def test_rslora_with_a_pattern_and_a_residual_init_warns_once(init, pattern):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        config = LoraConfig(init_lora_weights=init, target_modules=["linear"], use_rslora=True,
                            corda_config={} if init == "corda" else None, **pattern)
        config.copy(r=4)  # a copy repeats no warning
    assert [str(w.message) for w in seen if re.search(RSLORA_WARNING, str(w.message))] == [str(seen[0].message)]
    assert len(seen) == 1


@pytest.mark.parametrize("kwargs", [{"init_lora_weights": "pissa", "use_rslora": True},
                                    {"init_lora_weights": True, "use_rslora": True, "rank_pattern": {"linear": 2}},
                                    {"init_lora_weights": "olora", "rank_pattern": {"linear": 2}}])
def test_no_rslora_warning_without_all_three(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig(target_modules=["linear"], **kwargs)


@pytest.mark.parametrize("pattern", [{"rank_pattern": {"linear": 2}}, {"alpha_pattern": {"linear": 2}}])
def test_weight_conversion_path_with_rslora_and_a_pattern_is_refused_as_peft_does(tmp_path, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Net(), LoraConfig(init_lora_weights="pissa", target_modules=["linear"], r=4,
                                                 use_rslora=True, **pattern))
    msg = re.escape("Passing `path_initial_model_for_weight_conversion` to `save_pretrained`")
    with pytest.raises(ValueError, match=msg) as e:
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert "convert_to_lora=True" in str(e.value)  # what works instead
    assert not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / "out")  # lorakit's own conversion takes it


def test_an_unknown_bias_is_refused_by_get_peft_model_with_peft_s_not_implemented_error():
    with pytest.warns(UserWarning, match="get_peft_model will refuse"):  # (PEFT takes it here: no error yet)
        config = LoraConfig(target_modules=["linear"], bias="invalid")
    with pytest.raises(NotImplementedError, match="Requested bias: invalid, is not implemented") as e:
        get_peft_model(Net(), config)
    assert isinstance(e.value, ConfigError) and "'lora_only'" in str(e.value)


def test_eva_config_warning_and_refusal():
    with pytest.warns(UserWarning, match="`init_lora_weights` is 'eva' but `eva_config` is not specified"):
        config = LoraConfig(init_lora_weights="eva", target_modules=["linear"])
    with pytest.raises(ConfigError, match="initialize_lora_eva_weights"):
        get_peft_model(Net(), config)


def test_dora_with_megatron_names_dora_first():
    with pytest.raises(ValueError, match="DoRA does not support megatron_core") as e:
        LoraConfig(target_modules=["linear"], use_dora=True, megatron_config={"any": "thing"})
    assert "megatron_config" in str(e.value)


def test_target_parameters_as_a_string_is_a_type_error():
    with pytest.raises(TypeError, match=re.escape("`target_parameters` must be a list of strings or None.")) as e:
        LoraConfig(target_parameters="linear.weight")
    assert isinstance(e.value, ConfigError) and "['linear.weight']" in str(e.value)


def test_base_model_name_or_path_is_the_model_s_own_with_peft_s_warning():
    net = Net()
    given = LoraConfig(target_modules=["linear"], base_model_name_or_path="custom_name")
    with pytest.warns(UserWarning, match="was renamed from 'custom_name' to 'None'"):
        model = get_peft_model(net, given)
    assert model.peft_config["default"].base_model_name_or_path is None
    assert given.base_model_name_or_path == "custom_name"  # the caller's object is not changed
    named = Net()
    named.name_or_path = "foobar"
    with pytest.warns(UserWarning, match="was renamed from 'custom_name' to 'foobar'"):
        get_peft_model(named, LoraConfig(target_modules=["linear"], base_model_name_or_path="custom_name"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(Net(), LoraConfig(target_modules=["linear"]))  # nothing given, nothing renamed
