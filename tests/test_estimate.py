"""`lorakit estimate`: the built-in shapes, the memory model's orderings and bands, JSON, config.json, fits."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from lorakit.cli.estimate import EstimateOptions, parse_size, run_estimate
from lorakit.errors import ConfigError
from lorakit.estimate import (KNOWN_SHAPES, EstimateSettings, estimate, largest_fitting, layer_activation_bytes,
                              resolve_shape)

GB = 1e9
# Published parameter counts (model cards), to check the built-in shapes against: +-1%.
PUBLISHED_PARAMS = {"llama-3.1-8b": 8.03e9, "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "llama-3.1-70b": 70.6e9,
                    "mistral-7b": 7.24e9, "qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9,
                    "qwen2.5-7b": 7.62e9, "qwen2.5-14b": 14.7e9, "qwen2.5-32b": 32.5e9, "qwen2.5-72b": 72.7e9,
                    "gemma-2-9b": 9.24e9, "smollm2-135m": 134.5e6}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_built_in_shapes_give_the_published_parameter_counts(name):
    assert resolve_shape(name).total_params() == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


def test_llama_8b_full_fine_tuning_lands_in_the_expected_band():
    est = estimate(resolve_shape("llama-3.1-8b"), EstimateSettings(method="full", seq_len=2048, batch_size=1))
    assert 55 * GB <= est.total_bytes <= 90 * GB
    assert est.weights_bytes == est.gradients_bytes == 2 * est.total_params  # bf16
    assert est.optimizer_bytes == 4 * est.total_params  # AdamW: m and v in bf16
    parts = est.weights_bytes + est.gradients_bytes + est.optimizer_bytes + est.activations_bytes + est.workspace_bytes
    assert est.total_bytes == parts + est.overlap_bytes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_and_activations_are_not_all_alive_at_once_unless_gradients_accumulate(checkpointing):
    """The peak is the start of backward (activations, the head's gradient) or its end (every gradient and
    the optimizer's step temporary), not both; with accumulation the gradients live beside the activations."""
    shape = resolve_shape("llama-3.2-1b")
    one, four = (estimate(shape, EstimateSettings(method="full", gradient_checkpointing=checkpointing, grad_accum=n))
                 for n in (1, 4))
    fixed = one.weights_bytes + one.optimizer_bytes
    head_gradient = shape.vocab * shape.hidden * 2
    assert one.total_bytes == fixed + max(one.activations_bytes + head_gradient, 2 * one.gradients_bytes)
    assert one.overlap_bytes < 0
    assert four.overlap_bytes == 0 and four.total_bytes == fixed + one.gradients_bytes + max(
        one.activations_bytes, one.gradients_bytes)
    lora = estimate(shape, EstimateSettings(method="lora", gradient_checkpointing=checkpointing))
    assert -lora.overlap_bytes <= lora.gradients_bytes  # LoRA: at most its small gradients


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "gemma-2-9b", "llama-3.2-1b"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_needs_more_than_lora_which_needs_more_than_qlora(name, checkpointing):
    shape = resolve_shape(name)
    totals = [estimate(shape, EstimateSettings(method=m, gradient_checkpointing=checkpointing)).total_bytes
              for m in ("full", "lora", "qlora")]
    assert totals[0] > totals[1] > totals[2]


def test_activations_scale_with_tokens_and_checkpointing_saves_most_of_them():
    shape = resolve_shape("llama-3.1-8b")
    one = estimate(shape, EstimateSettings(seq_len=1024, method="full")).activations_bytes
    assert estimate(shape, EstimateSettings(seq_len=1024, batch_size=4, method="full")).activations_bytes == 4 * one
    # LoRA: per-token terms scale, plus one constant chunk of the chunked cross-entropy's fp32 logits
    from lorakit.estimate.memory import CE_CHUNK
    from lorakit.fast.cross_entropy import CHUNK_ROWS

    assert CE_CHUNK == CHUNK_ROWS  # the estimate counts the chunk the loss really uses
    chunk = 2 * shape.vocab * 1024  # with lorakit's Triton cross-entropy: bf16 logits (8 bytes per vocab without)
    lora = estimate(shape, EstimateSettings(seq_len=1024)).activations_bytes
    assert estimate(shape, EstimateSettings(seq_len=1024, batch_size=4)).activations_bytes == 4 * (lora - chunk) + chunk
    one = lora
    assert estimate(shape, EstimateSettings(seq_len=1024, gradient_checkpointing=True)).activations_bytes < one / 5


def test_lora_dropout_and_targets_change_what_is_saved():
    shape, s = resolve_shape("llama-3.1-8b"), EstimateSettings()
    all_targets = layer_activation_bytes(shape, s, list(shape.linear_shapes()))
    no_dropout = layer_activation_bytes(shape, replace(s, dropout=0.0), list(shape.linear_shapes()))
    q_v = layer_activation_bytes(shape, s, ["q_proj", "v_proj"])
    assert all_targets > no_dropout and all_targets > q_v
    h, f = shape.hidden, shape.intermediate  # hand count, no dropout, all targets (o_proj reads SDPA's output):
    expected = 2 * 4 * h + 2 * (h + h + f) + 2 * 16 * 7 + 2 * (2 * 4096 + 2 * 1024) + 4 * 32 + 3 * 2 * f
    assert layer_activation_bytes(shape, replace(s, dropout=0.0, kernels=False), list(shape.linear_shapes())) == expected
    # lorakit's Triton kernels: each norm keeps its bf16 input (not an fp32 copy), silu·up keeps gate and up only
    assert no_dropout == expected - 2 * (4 - 2) * h - 2 * f


def test_fewer_optimizer_bytes_with_8bit_adam_and_none_with_sgd():
    shape = resolve_shape("llama-3.2-1b")
    adamw, adam8, sgd = (estimate(shape, EstimateSettings(method="full", optimizer=o)).optimizer_bytes
                         for o in ("adamw", "adamw8bit", "sgd"))
    assert adamw > adam8 > sgd == 0


def test_config_json_and_model_folder_inputs(tmp_path):
    config = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "head_dim": 64,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_folder, from_file = resolve_shape(str(tmp_path)), resolve_shape(str(tmp_path / "config.json"))
    assert from_folder.total_params() == from_file.total_params() == KNOWN_SHAPES["llama-3.2-1b"].total_params()
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2, "vocab_size": 10}))
    with pytest.raises(ConfigError, match="decoder-only"):
        resolve_shape(str(tmp_path / "bad.json"))


def test_hub_ids_of_known_families_resolve_offline_and_unknown_names_are_explained():
    assert resolve_shape("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert resolve_shape("Qwen/Qwen2.5-72B").name == "qwen2.5-72b"
    with pytest.raises(ConfigError, match="known names: .*llama-3.1-8b"):
        resolve_shape("no-such-model")


def test_gpu_memory_fit_search_finds_the_boundary():
    shape, s = resolve_shape("llama-3.1-8b"), EstimateSettings(method="qlora", seq_len=1024)
    budget = 21.6 * GB
    best = largest_fitting(shape, s, budget, "batch_size")
    assert best >= 1
    assert estimate(shape, replace(s, batch_size=best)).total_bytes <= budget
    assert estimate(shape, replace(s, batch_size=best + 1)).total_bytes > budget
    seq = largest_fitting(shape, replace(s, batch_size=1), budget, "seq_len", step=128)
    assert seq % 128 == 0 and estimate(shape, replace(s, seq_len=seq + 128)).total_bytes > budget
    assert largest_fitting(shape, replace(s, method="full"), budget, "batch_size") == 0


def test_cli_json_has_byte_fields_and_the_table_prints_all_methods(capsys):
    facts = run_estimate(EstimateOptions(model="llama-3.1-8b", method="lora", json=True, gpu_memory="80GB"))
    printed = json.loads(capsys.readouterr().out)
    for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "total_bytes"):
        assert printed[key] == facts[key] and isinstance(printed[key], int)
    assert printed["fit"]["max_batch_size"] >= 1
    run_estimate(EstimateOptions(model="qwen2.5-0.5b", gradient_checkpointing=True))
    table = capsys.readouterr().out
    assert all(word in table for word in ("full", "lora", "qlora", "activations", "total"))


def test_bad_options_are_reported_together():
    with pytest.raises(ConfigError) as err:
        estimate(resolve_shape("llama-3.2-1b"), EstimateSettings(method="half", optimizer="adam9000", seq_len=0))
    assert all(word in str(err.value) for word in ("method", "optimizer", "seq_len"))
    with pytest.raises(ConfigError, match="not projections"):
        estimate(resolve_shape("llama-3.2-1b"), EstimateSettings(targets=["qproj"]))
    assert parse_size("24GB") == 24e9 and parse_size("80GiB") == 80 * 2**30 and parse_size("24") == 24e9
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")


def _autograd_saved_bytes(method: str, seq_len: int, batch_size: int, config: dict, kernels: bool = False) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward in one lorakit loss forward
    (`kernels`: with lorakit's Triton kernels, run here on CPU tensors through Triton's interpreter)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, get_peft_model
    from lorakit.fast import label_only_lm_loss

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa", use_cache=False))
    finally:
        torch.set_default_dtype(previous)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=list(resolve_shape("llama-3.2-1b").linear_shapes())))
    model.train()
    if kernels:
        from lorakit.fast.kernels import patch

        patch.use_fast_kernels(model)
    ids = torch.randint(0, config["vocab_size"], (batch_size, seq_len))
    label_only_lm_loss(model)(model, {"input_ids": ids, "labels": ids})  # fills the layers' kept factor casts
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {t.untyped_storage().data_ptr() for m in model.modules()  # weights-like: kept across steps
               for _, factors in getattr(m, "_factor_cache", {}).values() for t in factors}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        label_only_lm_loss(model)(model, {"input_ids": ids, "labels": ids})
    return sum(kept.values())


@pytest.mark.parametrize("method,kernels", [("full", False), ("lora", False), ("lora", True)])
def test_the_activation_model_matches_what_autograd_keeps(method, kernels, monkeypatch):
    """The per-token formula against the tensors a bf16 transformers Llama really saves (CPU SDPA, no dropout),
    plain and with lorakit's Triton kernels (forced onto CPU tensors, run by Triton's interpreter)."""
    if kernels:
        pytest.importorskip("triton", reason="the kernels are Triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the kernels run on this test's CPU tensors only under Triton's interpreter (no GPU: conftest)")
        import lorakit.fast.cross_entropy as ce
        from lorakit.fast.kernels import patch

        monkeypatch.setattr(patch, "triton_runs", lambda t: True)
        monkeypatch.setattr(ce, "triton_runs", lambda t: True)
    config = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    seq_len, batch_size = 64, 2
    measured = _autograd_saved_bytes(method, seq_len, batch_size, config, kernels)
    from lorakit.estimate import shape_from_config

    est = estimate(shape_from_config({"model_type": "llama", **config}, "probe"),
                   EstimateSettings(method=method, dropout=0.0, seq_len=seq_len, batch_size=batch_size,
                                    kernels=kernels))
    labelled = (seq_len - 1) * batch_size
    # what the loss keeps: fp32 log-probs (trainable head), or the bf16 hidden-state gradient (chunked, frozen head)
    kept_by_loss = 4 * config["vocab_size"] * labelled if method == "full" else 2 * config["hidden_size"] * labelled
    modelled = est.detail["saved_bytes_per_token"] * seq_len * batch_size + kept_by_loss
    assert measured == pytest.approx(modelled, rel=0.05)


def test_the_kernel_families_match_the_kernels():
    pytest.importorskip("triton", reason="the kernels are Triton")
    from lorakit.estimate.memory import KERNEL_FAMILIES
    from lorakit.fast.kernels.patch import FAMILIES

    assert KERNEL_FAMILIES == FAMILIES


def test_a_train_config_estimates_as_the_run_it_describes(tmp_path, capsys):
    """`lorakit estimate --config run.yaml` reads a training file (the shipped example, a run's config.yaml):
    training-only keys are left out, dtype and quantize translate."""
    from lorakit.cli.main import main

    path = tmp_path / "train.yaml"
    path.write_text("model: llama-3.2-1b\ndata: x.jsonl\nlr: 2e-4\nr: 8\nseq-len: 512\nbatch-size: 2\n"
                    "dtype: float32\nquantize: nf4\neval-every: 0\n")
    main(["estimate", "--config", str(path), "--json"])
    facts = json.loads(capsys.readouterr().out)
    assert facts["settings"]["r"] == 8 and facts["settings"]["seq_len"] == 512 and facts["settings"]["batch_size"] == 2
    assert facts["settings"]["dtype"] == "fp32" and facts["settings"]["method"] == "qlora"
