"""GGUF export of the Llama family's relatives, checked by llama.cpp: Qwen2 (biases on q/k/v), Qwen3 (RMSNorm on
each head's queries and keys, a head size that is not hidden / heads) and Mistral (llama.cpp's `llama`
architecture: q/k rows permuted; here with a head size of its own, as Mistral-Nemo has).

Each tiny random model (the embedded SmolLM2's vocabulary, so its tokenizer can be carried into the file) is
written as an f32 base GGUF, a random adapter on every projection as adapter.gguf; llama.cpp's logits must be
lorakit's to its f16 KV cache's rounding, and its greedy tokens the same. Llama and SmolLM are in
test_export_gguf.py. Needs the export-test extra (llama-cpp-python) and the embedded model.
"""
from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.export.gguf_adapter import write_lora_gguf
from lorakit.export.gguf_merged import write_merged_gguf

from .conftest import rel_err
from .test_export_gguf import (IDS, KV_F16, SMOLLM2, TARGETS, llama_greedy, llama_logits, needs_smollm2,
                               open_llama, torch_greedy, torch_logits)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=49152, rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
              eos_token_id=2)
# model_type: (config class, model class, config arguments). RoPE bases other than 10000, so a wrong or missing
# rope_freq_base shows; tied and untied heads both.
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, tie_word_embeddings=False, head_dim=32,
                                                      rope_theta=1e6)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, tie_word_embeddings=False, head_dim=32,
                                                            rope_theta=1e5)),
}


def family_base(model_type: str, seed: int = 0):
    """A tiny random model of the family; its biases and norm weights random too (at init they are 0 and 1,
    which would hide a bias or norm that is dropped or misplaced)."""
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[model_type]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@needs_smollm2
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_llama_cpp_runs_family_and_lora_as_lorakit(tmp_path, model_type):
    base = family_base(model_type)
    assert getattr(base.config, "model_type") == model_type
    write_merged_gguf(base, tmp_path / "base.gguf", SMOLLM2, "f32")
    torch.manual_seed(1)
    model = get_peft_model(family_base(model_type), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights=False)).eval()
    write_lora_gguf(model, tmp_path / "adapter.gguf")

    plain = open_llama(tmp_path / "base.gguf")  # the base alone: the architecture and its hyperparameters
    assert rel_err(llama_logits(plain, IDS), torch_logits(base, IDS)) < KV_F16
    plain.close()
    llm = open_llama(tmp_path / "base.gguf", tmp_path / "adapter.gguf")
    ours, theirs = torch_logits(model, IDS), llama_logits(llm, IDS)
    with model.disable_adapter():
        assert rel_err(torch_logits(model, IDS), ours) > 0.05  # the adapter matters ...
    assert rel_err(theirs, ours) < KV_F16  # ... and llama.cpp applies exactly it
    assert llama_greedy(llm, IDS, 8) == torch_greedy(model, IDS, 8)
    llm.close()
