"""PEFT API names and behaviours that code written for PEFT relies on (issue 23): the per-task model classes,
PeftMixedModel, PEFT's target-matching warnings and messages, and PEFT's random draws at init."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit import (ConfigError, LoraConfig, PeftMixedModel, PeftModel, PeftModelForCausalLM,
                     PeftModelForSequenceClassification, TaskType, get_peft_model)

from .conftest import tiny_llama


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 30)
        self.linear = nn.Linear(30, 20)

    def forward(self, x):
        return self.linear(self.embed(x))


def _caught(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return caught


# ---------------------------------------------------------------------- model classes
def test_get_peft_model_returns_the_task_class_peft_returns(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], task_type=TaskType.CAUSAL_LM))
    assert type(model) is PeftModelForCausalLM and isinstance(model, PeftModel)
    model.save_pretrained(tmp_path)
    loaded = PeftModelForCausalLM.from_pretrained(tiny_llama(), tmp_path)
    assert type(loaded) is PeftModelForCausalLM
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    classifier = get_peft_model(tiny_llama("seq_cls"), LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert type(classifier) is PeftModelForSequenceClassification
    assert type(get_peft_model(Net(), LoraConfig(target_modules=["linear"]))) is PeftModel


def test_mixed_model_is_a_peft_model_running_several_lora_adapters():
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(target_modules=["linear"], init_lora_weights=False), mixed=True)
    assert type(model) is PeftMixedModel
    model.add_adapter("other", LoraConfig(target_modules=["linear"], init_lora_weights=False))
    x = torch.tensor([[1, 2, 3]])
    model.set_adapter(["default", "other"])
    both = model(x)
    with model.disable_adapter():
        base = model(x)
    deltas = []
    for name in ("default", "other"):
        model.set_adapter(name)
        deltas.append(model(x) - base)
    torch.testing.assert_close(both, base + deltas[0] + deltas[1])


def test_config_answers_peft_questions_and_refuses_custom_layer_classes():
    config = LoraConfig(target_modules=["linear"])
    assert config.is_prompt_learning is False and config.is_adaption_prompt is False
    assert "is_prompt_learning" not in config.to_dict()  # not a field: the file stays PEFT's
    with pytest.raises(ConfigError, match="custom LoRA layer classes .*Embedding"):
        config._register_custom_module({nn.Embedding: object})
    assert LoraConfig(init_lora_weights="OLoRA").init_lora_weights == "olora"  # PEFT ignores case here


def test_kasa_loss_of_a_model_without_kasa_layers_is_zero():
    model = get_peft_model(Net(), LoraConfig(target_modules=["linear"]))
    assert model._get_kasa_loss() == 0.0


# ---------------------------------------------------------------------- targets: PEFT's warnings and messages
@pytest.mark.parametrize("target_modules", [None, [], ""])
def test_no_module_and_no_parameter_matched_raises_peft_message(target_modules):
    with pytest.raises(ValueError, match=r"^No `target_modules` passed but also no `target_parameters` found\."):
        get_peft_model(Net(), LoraConfig(target_modules=target_modules, target_parameters=["foobar.weight"]))


def test_target_parameters_or_modules_matching_nothing_warns_when_the_other_matched():
    caught = _caught(lambda: get_peft_model(Net(), LoraConfig(target_modules=["linear"],
                                                              target_parameters=["foobar.weight"])))
    assert [w.category for w in caught if "no parameter was matched" in str(w.message)] == [RuntimeWarning]
    caught = _caught(lambda: get_peft_model(Net(), LoraConfig(target_modules=["foobar"],
                                                              target_parameters=["linear.weight"])))
    assert any(w.category is RuntimeWarning and "target_modules={'foobar'} were set but no module was matched"
               in str(w.message) for w in caught)


def test_unmatched_rank_and_alpha_pattern_keys_warn_naming_only_them():
    config = LoraConfig(target_modules=["linear"], alpha_pattern={"linear": 100, "typo_key": 100},
                        rank_pattern={"linear": 2, "other.typo": 2})
    messages = [str(w.message) for w in _caught(lambda: get_peft_model(Net(), config))
                if w.category is RuntimeWarning]
    assert any("alpha_pattern" in m and "['typo_key']" in m for m in messages)
    assert any("rank_pattern" in m and "['other.typo']" in m for m in messages)
    good = LoraConfig(target_modules=["linear"], alpha_pattern={"linear": 100}, rank_pattern={"linear": 2})
    model = get_peft_model(Net(), good)
    assert not [w for w in _caught(lambda: get_peft_model(Net(), good)) if "did not match" in str(w.message)]
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern.*did not match any targeted module"):
        model.add_adapter("other", LoraConfig(target_modules=["linear"], alpha_pattern={"typo_key": 100}))


def test_module_and_parameter_targeted_twice_gets_peft_message():
    with pytest.raises(ValueError, match=r"Trying to wrap an `nn.Parameter` of layer 'linear' of type Linear, "
                                         r"which is not a valid target\."):
        get_peft_model(Net(), LoraConfig(target_modules=["linear"], target_parameters=["linear.weight"]))


def test_attention_with_separate_qkv_weights_is_refused_cleanly():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(10, 2, kdim=20, vdim=30)

    with pytest.raises(ValueError, match="Only same embed for query/key/value is supported"):
        get_peft_model(Attention(), LoraConfig(target_modules=["mha"]))


# ---------------------------------------------------------------------- init draws
def test_one_seed_gives_pefts_factors():
    peft = pytest.importorskip("peft")
    factors = []
    for lib in (peft, lorakit):
        torch.manual_seed(0)
        model = lib.get_peft_model(Net(), lib.LoraConfig(target_modules=["embed", "linear"]))
        factors.append({k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k})
    assert factors[0].keys() == factors[1].keys()
    for key in factors[0]:
        assert torch.equal(factors[0][key], factors[1][key]), key


def test_init_method_settings_without_the_method_warn_as_in_peft():
    with pytest.warns(UserWarning, match="`eva_config` specified but will be ignored when `init_lora_weights` is not"):
        LoraConfig(init_lora_weights=True, eva_config={"rho": 2.0})
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        LoraConfig(loftq_config={"loftq_bits": 4})
    quiet = _caught(lambda: LoraConfig(loftq_config={}, eva_config=None))  # PEFT's defaults, as its files hold them
    assert not [w for w in quiet if "specified but will be ignored" in str(w.message)]


def test_parameter_lora_reads_as_pefts_param_wrapper():
    model = get_peft_model(Net(), LoraConfig(target_modules=[], target_parameters=["linear.weight"]))
    assert repr(model.base_model.model.linear).startswith("lora.ParamWrapper(")
    assert repr(model.base_model.model.embed).startswith("Embedding(")
