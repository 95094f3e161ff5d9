"""The architecture matrix: tiny random configs of the model families people fine-tune, each through lorakit's
invariants. For every family: the default targets and 'all-linear' find layers (never the output head); one
training step changes adapter parameters only; merged == adapted; PEFT loads lorakit's adapter with the same
outputs and lorakit loads PEFT's. For five decoder families of different layouts (Llama; Qwen3; Gemma 3's scaled
embeddings; Phi-3's fused projections; GPT-2's Conv1D) also a 2-step `lorakit train` on a saved folder and one
`lorakit serve` request (all fourteen decoders would take the file past a minute on two cores).

Mixture-of-experts models (Qwen3-MoE, Mixtral, gpt-oss): here 'all-linear' must find the attention at least;
the expert parameters have their own tests (LoRA on parameters).
"""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from tests.conftest import assert_close
from tests.test_train_fixtures import one_torch_thread  # noqa: F401  (autouse: one thread for tiny models)

peft = pytest.importorskip("peft", reason="PEFT is a test dependency (pip install -e .[test])")

DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128)
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
               max_position_embeddings=64, num_labels=2)
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64)

# model_type: (kind, config keyword arguments). kind: causal | seq2seq | seq_cls | image
ARCHITECTURES = {
    "llama": ("causal", DECODER),
    "qwen2": ("causal", DECODER),
    "qwen3": ("causal", dict(DECODER, head_dim=8)),
    "qwen3_moe": ("causal", dict(DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "mistral": ("causal", DECODER),
    "mixtral": ("causal", dict(DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "gemma2": ("causal", dict(DECODER, head_dim=8)),
    "gemma3_text": ("causal", dict(DECODER, head_dim=8)),
    "phi3": ("causal", dict(DECODER, pad_token_id=0)),
    "olmo2": ("causal", dict(DECODER, eos_token_id=2, pad_token_id=1)),
    "gpt2": ("causal", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)),
    "gpt_neox": ("causal", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=128)),
    "falcon": ("causal", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)),
    "opt": ("causal", dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, vocab_size=128,
                           max_position_embeddings=64, word_embed_proj_dim=32)),
    "gpt_oss": ("causal", dict(DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "t5": ("seq2seq", dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=128,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    "bart": ("seq2seq", SEQ2SEQ),
    "bert": ("seq_cls", ENCODER),
    "roberta": ("seq_cls", dict(ENCODER, pad_token_id=1, max_position_embeddings=66)),
    "deberta-v2": ("seq_cls", ENCODER),
    "vit": ("image", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, num_channels=3, num_labels=2)),
}
MOE = {"qwen3_moe", "mixtral", "gpt_oss"}
NO_PEFT_DEFAULT = {"olmo2", "gpt_oss"}  # PEFT 0.21's table of default targets has no entry for these
TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS", "image": None}




def build(arch: str, **overrides):
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification,
                              AutoModelForSeq2SeqLM, AutoModelForSequenceClassification)

    kind, kwargs = ARCHITECTURES[arch]
    auto = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "seq_cls": AutoModelForSequenceClassification, "image": AutoModelForImageClassification}[kind]
    torch.manual_seed(0)
    return auto.from_config(AutoConfig.for_model(arch, **{**kwargs, **overrides})).eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    kind = ARCHITECTURES[arch][0]
    g = torch.Generator().manual_seed(7)
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    ids = torch.randint(3, 128, (2, 6), generator=g)
    return {"input_ids": ids, **({"decoder_input_ids": ids[:, :4]} if kind == "seq2seq" else {})}


def outputs(model, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(arch)).logits


def lora_config(lib, arch: str, **kw):
    """All linear layers (the attention on MoE models: their expert parameters are tested elsewhere)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if arch in MOE else "all-linear"
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                          task_type=TASK_TYPES[ARCHITECTURES[arch][0]], **kw)


def is_adapter_parameter(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name


def default_targets_found(arch: str, targets=None) -> list[str]:
    task = TASK_TYPES[ARCHITECTURES[arch][0]]
    config = lorakit.LoraConfig(target_modules=targets, task_type=task)
    return lorakit.get_peft_model(build(arch), config).targeted_module_names


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_targets_and_all_linear_find_layers_but_never_the_output_head(arch):
    from lorakit.cli.train import _targets
    from lorakit.train.config import TrainConfig

    task = TASK_TYPES[ARCHITECTURES[arch][0]]
    if arch in NO_PEFT_DEFAULT:  # target_modules=None is refused, as PEFT refuses it, naming what to pass
        with pytest.raises(lorakit.TargetError, match="all-linear"):
            default_targets_found(arch)
        default = []
    else:
        default = default_targets_found(arch)
        assert default, f"{arch}: the default targets found nothing"
    cli_task = "seq-cls" if task == "SEQ_CLS" else "causal-lm"  # (the CLI's defaults depend on seq-cls only)
    assert default_targets_found(arch, _targets(TrainConfig(task=cli_task), build(arch)))  # `lorakit train`'s
    base = build(arch)
    head = base.get_output_embeddings() if ARCHITECTURES[arch][0] in ("causal", "seq2seq") else None
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules="all-linear", task_type=task))
    found = model.targeted_module_names
    assert len(found) > len(default) or set(found) == set(default)
    assert head is None or all(model.get_base_model().get_submodule(n).base_layer is not head for n in found)
    if arch in MOE:  # at least the attention: the experts are fused parameters, not linear layers
        assert {n.rsplit(".", 1)[-1] for n in found} >= {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_step_changes_adapter_parameters_only_and_merged_equals_adapted(arch):
    model = lorakit.get_peft_model(build(arch), lora_config(lorakit, arch))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs(arch)).logits.float().square().mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(is_adapter_parameter(n) for n in changed), sorted(changed)[:5]
    adapted = outputs(model, arch)
    model.merge_adapter()
    assert_close(outputs(model, arch), adapted)
    model.unmerge_adapter()
    assert_close(outputs(model.merge_and_unload(), arch), adapted)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapters_move_between_lorakit_and_peft_with_the_same_outputs(arch, tmp_path):
    ours = lorakit.get_peft_model(build(arch), lora_config(lorakit, arch))
    expected = outputs(ours, arch)
    assert (expected - outputs(build(arch), arch)).abs().max() > 1e-4  # the adapter changes the outputs
    ours.save_pretrained(tmp_path / "ours")
    assert_close(outputs(peft.PeftModel.from_pretrained(build(arch), tmp_path / "ours"), arch), expected)
    theirs = peft.get_peft_model(build(arch), lora_config(peft, arch), autocast_adapter_dtype=False)
    expected = outputs(theirs, arch)
    theirs.save_pretrained(tmp_path / "theirs")
    assert_close(outputs(lorakit.PeftModel.from_pretrained(build(arch), tmp_path / "theirs"), arch), expected)


def save_with_tokenizer(arch: str, folder) -> str:
    """A tiny random model of `arch` with the tests' local tokenizer, saved as a transformers folder."""
    from tests.test_data_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    build(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
          eos_token_id=tok.eos_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def serve_one_request(model_dir: str, adapter_dir: str) -> str:
    from fastapi.testclient import TestClient

    from lorakit.serve.app import build_app
    from lorakit.serve.protocol import Limits

    app = build_app(model_dir, {"tuned": adapter_dir}, None, Limits(max_tokens=8, max_prompt_tokens=64,
                                                                    max_concurrent=4), device="cpu", max_batch=2)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "tuned", "prompt": "where is item 3", "max_tokens": 4,
                                                 "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"where is item {i}"},
                          {"role": "assistant", "content": f"item {i} is under the mat"}]} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


DECODERS = [a for a, (kind, _) in ARCHITECTURES.items() if kind == "causal"]


@pytest.mark.parametrize("arch", DECODERS)
def test_lorakit_train_two_steps_then_serve_the_adapter(arch, chat_data, tmp_path):
    from lorakit.cli.main import main

    model_dir = save_with_tokenizer(arch, tmp_path / "model")
    main(["train", "--model", model_dir, "--data", str(chat_data), "--max-steps", "2", "--batch-size", "4",
          "--seq-len", "32", "--r", "2", "--out", str(tmp_path / "run"), "--save-every", "0", "--eval-every", "0",
          "--device", "cpu"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trainable_params"] > 0 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert isinstance(serve_one_request(model_dir, str(tmp_path / "run" / "adapter")), str)
