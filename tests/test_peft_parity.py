"""Corners where lorakit once differed from PEFT 0.21 for the same code: each test runs both libraries."""
import pytest
import torch

import lorakit
from tests.conftest import tiny_llama, tiny_t5
from tests.test_peft_interop import _ids, _randomise

peft = pytest.importorskip("peft", reason="PEFT is a test dependency (pip install -e .[test])")


def _assert_loads_like(model, fresh_base, folder) -> None:
    """PEFT's `model`, saved to `folder`, loads in lorakit onto `fresh_base` with the same logits."""
    model.save_pretrained(folder)
    loaded = lorakit.PeftModel.from_pretrained(fresh_base, str(folder))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


def _lora_modules(model) -> dict[str, tuple[int, float]]:
    """{module name: (rank, scaling)} of the default adapter, for either library."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
            found[name.split("model.", 1)[-1]] = (module.r["default"], float(module.scaling["default"]))
    return found


@pytest.mark.parametrize("pattern", [{"rank_pattern": {r"layers\.1\.self_attn\.q_proj": 2}},
                                     {"alpha_pattern": {r"self_attn\.v_proj": 32}},
                                     {"rank_pattern": {"q_proj": 2, r".*\.1\..*": 6}}])
def test_rank_and_alpha_pattern_keys_are_regexes_matched_at_the_end(pattern):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **pattern)
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    assert _lora_modules(ours) == _lora_modules(theirs)
    assert _lora_modules(ours) != _lora_modules(lorakit.get_peft_model(
        tiny_llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))


def test_t5_layers_to_transform_counts_blocks_not_sub_layers():
    kwargs = dict(r=4, target_modules=["q", "v"], layers_to_transform=[1])
    ours = sorted(_lora_modules(lorakit.get_peft_model(tiny_t5(), lorakit.LoraConfig(**kwargs))))
    theirs = sorted(_lora_modules(peft.get_peft_model(tiny_t5(), peft.LoraConfig(**kwargs))))
    assert ours == theirs and ours and all(".block.1." in name for name in ours)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_pissa_and_olora_files_load_onto_the_residual_base(init, tmp_path):
    """PEFT saves these factors against the residual W - s·BA of the init and redoes the init on load."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    model = peft.get_peft_model(tiny_llama(), config)
    _randomise(model)
    _assert_loads_like(model, tiny_llama(), tmp_path)


def test_set_adapter_while_merged_unmerges_first_as_peft_does():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise(model)
    model.set_adapter("b")
    _randomise(model)
    with torch.no_grad():
        b_alone = model(input_ids=_ids()).logits
        model.set_adapter("default")
        model.merge_adapter()
        with pytest.warns(UserWarning, match="unmerging"):
            model.set_adapter("b")
        torch.testing.assert_close(model(input_ids=_ids()).logits, b_alone)


def test_errors_are_value_errors_and_deleting_the_active_adapter_activates_the_first_by_name():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    for name in ("zeta", "alpha"):
        model.add_adapter(name, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError):  # what a PEFT user catches
        model.set_adapter("nope")
    model.delete_adapter("default")
    assert model.active_adapters == ["alpha"]


def test_peft_file_with_bias_all_and_a_head_loads(tmp_path):
    """PEFT's bias="all" also saves the head copy's bias as `classifier.modules_to_save.bias`."""
    from tests.conftest import tiny_bert

    config = dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**config))
    _randomise(model)
    _assert_loads_like(model, tiny_bert(), tmp_path)


def test_combining_two_adapters_that_each_trained_the_head_is_refused():
    config = dict(r=4, target_modules=["q_proj"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(tiny_llama("seq_cls"), peft.LoraConfig(**config))
    theirs.add_adapter("b", peft.LoraConfig(**config))
    with pytest.raises(ValueError):
        theirs.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")
    ours = lorakit.get_peft_model(tiny_llama("seq_cls"), lorakit.LoraConfig(**config))
    ours.add_adapter("b", lorakit.LoraConfig(**config))
    with pytest.raises(ValueError, match="own trained copy of score"):
        ours.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")
    ours.add_weighted_adapter(["default"], [0.5], "alone", combination_type="ties")  # one adapter: linear, no density


def test_lorakit_pissa_saved_unconverted_loads_back_the_same(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights="pissa"))
    _randomise(model)
    model.save_pretrained(tmp_path, convert_to_lora=False)
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


@pytest.mark.parametrize("name, index", [("encoder.block.1.layer.0.SelfAttention.q", 1),
                                         ("model.layers.2.mlp.experts.3.w1", 2),
                                         ("block.1.layer.0.SelfAttention.q", 1),  # a bare T5 stack
                                         ("layers.0.experts.3.w1", 0), ("h.0.attn.c_attn", 0)])
def test_the_layer_index_is_the_first_number_after_the_container(name, index):
    from lorakit.lora.targets import layer_index

    assert layer_index(name, None) == index


def _trainable(model) -> dict[str, bool]:
    """{adapter: its LoRA factors require grad}, for either library."""
    state = {}
    for module in model.modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "r", None), dict):
            for name in module.r:
                state[name] = state.get(name, False) or module.lora_A[name].weight.requires_grad
    return state


def _trainability_script(lib, folder):
    """The same calls in either library; the trainable adapters after each one."""
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(folder)
    steps = []
    calls = [lambda: model.load_adapter(str(folder), "b", is_trainable=True),  # not active, yet trainable
             lambda: model.load_adapter(str(folder), "c"),  # frozen
             lambda: model.set_adapter("c"),  # active and trainable, the others frozen
             lambda: model.set_adapter("b", inference_mode=True),  # active, nothing trains
             lambda: model.set_requires_grad(["default", "c"]),
             lambda: model.set_requires_grad("c", False),
             lambda: model.add_adapter("d", lib.LoraConfig(r=4, target_modules=["q_proj"])),  # added frozen
             lambda: model.delete_adapter("b")]  # the active one: the first by name becomes active and trains
    for call in calls:
        call()
        steps.append((_trainable(model), list(model.active_adapters)))
    return steps


def test_which_adapters_train_follows_peft_through_load_set_and_delete(tmp_path):
    """load_adapter(is_trainable=True) makes an inactive adapter trainable; set_adapter makes the active ones
    the trainable ones (or none, with inference_mode); set_requires_grad; add_adapter adds a frozen one."""
    ours = _trainability_script(lorakit, tmp_path / "ours")
    theirs = _trainability_script(peft, tmp_path / "theirs")
    assert ours == theirs
    assert ours[0][0] == {"default": True, "b": True}


def test_an_adapter_added_to_a_task_model_without_task_type_trains_its_own_head(tmp_path):
    """PEFT's task models put the head in every later adapter's modules_to_save; so does lorakit."""
    def heads(lib):
        model = lib.get_peft_model(tiny_llama("seq_cls"), lib.LoraConfig(r=4, target_modules=["q_proj"],
                                                                         task_type="SEQ_CLS"))
        model.add_adapter("b", lib.LoraConfig(r=4, target_modules=["q_proj"]))
        model.set_adapter("b")
        return sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n), model

    ours, model = heads(lorakit)
    assert ours == heads(peft)[0] == ["base_model.model.score.modules_to_save.b.weight"]
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert any("score" in key for key in load_file(tmp_path / "b" / "adapter_model.safetensors"))


def _status_script(lib, folder):
    """The same calls in either library; get_model_status after each (the fields both define alike)."""
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(folder)
    model.load_adapter(str(folder), "b")
    fields = ("peft_types", "trainable_params", "total_params", "num_adapter_layers", "enabled", "active_adapters",
              "merged_adapters", "requires_grad", "available_adapters", "devices")
    seen = []

    def look():
        status = model.get_model_status()
        seen.append({f: getattr(status, f) for f in fields})

    look()
    model.base_model.merge_adapter()
    look()
    model.base_model.unmerge_adapter()
    model.base_model.disable_adapter_layers()
    look()
    model.base_model.enable_adapter_layers()
    next(p for n, p in model.named_parameters() if "lora_A" in n).requires_grad_(False)  # one layer out of step
    look()
    layers = model.get_layer_status()
    return seen, [(s.name, s.active_adapters, s.requires_grad, s.available_adapters) for s in layers]


def test_model_and_layer_status_read_as_peft_s(tmp_path):
    ours, theirs = _status_script(lorakit, tmp_path / "ours"), _status_script(peft, tmp_path / "theirs")
    assert ours == theirs
    seen = ours[0]
    assert [s["merged_adapters"] for s in seen] == [[], ["default"], [], []]
    assert [s["enabled"] for s in seen] == [True, True, False, True]
    assert seen[3]["requires_grad"] == {"b": False, "default": "irregular"}


def test_attributes_peft_users_read_match():
    def read(lib):
        model = lib.get_peft_model(tiny_llama("seq_cls"), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                         task_type="SEQ_CLS"))
        return (model.active_peft_config.r, str(model.peft_type).rpartition(".")[-1], model.modules_to_save,
                model.base_model_torch_dtype, model.active_adapter,
                sorted(model.base_model.targeted_module_names))

    assert read(lorakit) == read(peft)


def test_disabled_adapter_layers_give_the_base_model_and_enable_gives_the_adapter_back():
    base = tiny_llama()
    with torch.no_grad():
        expected = base(input_ids=_ids()).logits
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise(model)
    with torch.no_grad():
        adapted = model(input_ids=_ids()).logits
        model.merge_adapter()
        with pytest.warns(UserWarning, match="unmerging"):
            model.base_model.disable_adapter_layers()
        torch.testing.assert_close(model(input_ids=_ids()).logits, expected)
        with model.disable_adapter():  # nested: still the base model after the block
            pass
        torch.testing.assert_close(model(input_ids=_ids()).logits, expected)
        model.base_model.enable_adapter_layers()
        torch.testing.assert_close(model(input_ids=_ids()).logits, adapted)


def test_adapters_using_peft_features_lorakit_lacks_are_refused_by_name(tmp_path):
    """Their outputs would be wrong here (an activated-LoRA file loaded with no error at all)."""
    _edited_peft_adapter(tmp_path / "bdlora", use_bdlora=True)
    with pytest.raises(lorakit.ConfigError, match="use_bdlora=True"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "bdlora"))
    _edited_peft_adapter(tmp_path / "alora", alora_invocation_tokens=[5, 6])
    with pytest.raises(lorakit.ConfigError, match="alora_invocation_tokens"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "alora"))


def test_a_config_written_for_peft_builds_in_lorakit_and_a_feature_it_lacks_is_refused_by_name():
    """PEFT's fields at values that change nothing are taken (configs copied from PEFT or TRL code); a typo is not."""
    import dataclasses

    from lorakit.config import PEFT_INFORMATIONAL_FIELDS, PEFT_ONLY_FEATURES

    known = set(PEFT_ONLY_FEATURES) | set(PEFT_INFORMATIONAL_FIELDS)  # (a field a later PEFT adds is not)
    unset = {f.name: getattr(peft.LoraConfig(), f.name) for f in dataclasses.fields(peft.LoraConfig) if f.name in known}
    assert len(unset) >= 15 and lorakit.LoraConfig(r=4, **unset).r == 4
    with pytest.raises(lorakit.ConfigError, match="use_bdlora=True"):
        lorakit.LoraConfig(r=4, use_bdlora=True)
    with pytest.raises(lorakit.ConfigError, match="layer_replication"):
        lorakit.LoraConfig(r=4, layer_replication=[[0, 1]])
    with pytest.raises(TypeError, match="lora_alhpa"):
        lorakit.LoraConfig(r=4, lora_alhpa=16)


def test_an_adapter_initialised_with_eva_loads_as_plain_lora(tmp_path):
    model = _edited_peft_adapter(tmp_path, init_lora_weights="eva")
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


def _edited_peft_adapter(folder, **fields):
    """A trained PEFT adapter saved to `folder`, its adapter_config.json then given `fields`."""
    import json

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise(model)
    model.save_pretrained(folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return model


def test_state_dict_functions_read_and_write_peft_s_keys(tmp_path):
    """get_peft_model_state_dict gives PEFT's keys and tensors (task head included); set_peft_model_state_dict
    takes PEFT's and gives its outputs; a tensor that does not fit is named."""
    config = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(tiny_llama("seq_cls"), peft.LoraConfig(**config))
    _randomise(theirs)
    expected = peft.get_peft_model_state_dict(theirs)
    ours = lorakit.get_peft_model(tiny_llama("seq_cls"), lorakit.LoraConfig(**config))
    assert lorakit.set_peft_model_state_dict(ours, expected).unexpected_keys == []
    got = lorakit.get_peft_model_state_dict(ours)
    assert sorted(got) == sorted(expected) and any("score" in k for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=_ids()).logits, theirs(input_ids=_ids()).logits)
    key = next(k for k in expected if "lora_A" in k)
    with pytest.raises(lorakit.AdapterError, match="shapes differ"):
        lorakit.set_peft_model_state_dict(ours, {**expected, key: expected[key][:2]})


def test_inject_adapter_in_model_puts_the_same_layers_in_place_as_peft():
    def inject(lib):
        torch.manual_seed(3)
        model = lib.inject_adapter_in_model(lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tiny_llama())
        _randomise(model)
        with torch.no_grad():
            return sorted(n for n, p in model.named_parameters() if p.requires_grad), model(input_ids=_ids()).logits

    (names, logits), (peft_names, peft_logits) = inject(lorakit), inject(peft)
    assert names == peft_names and all("lora_" in n for n in names)
    torch.testing.assert_close(logits, peft_logits)


def test_transformers_trainer_trains_a_lorakit_model(tmp_path):
    """transformers' Trainer keeps the dataset columns that model.forward's signature names; PeftModel's
    forward now shows the wrapped model's, so input_ids and labels reach the model (it got an empty batch)."""
    import inspect

    import transformers

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert {"input_ids", "labels", "adapter_names"} <= set(inspect.signature(model.forward).parameters)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 128, (16,), generator=g).tolist() for _ in range(8)]
    data = [{"input_ids": r, "labels": r, "unused_column": "dropped by the Trainer"} for r in rows]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
