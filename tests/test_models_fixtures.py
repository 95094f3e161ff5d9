"""Shared helpers for tests/test_models_*.py: a tiny Llama model folder with a locally built tokenizer.

Nothing here downloads anything: the tokenizer is a `tokenizers` WordLevel model over a few words.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "hello", "world"]
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2; no pad token on purpose (eos must stand in)
TINY_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=128, bos_token_id=1, eos_token_id=2)


def tiny_tokenizer():
    """A WordLevel tokenizer over WORDS, wrapped for transformers; eos `</s>`, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama_model(seed: int = 0):
    """A random 2-layer LlamaForCausalLM (hidden 32, vocab 128), deterministic for `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def save_tiny_llama(folder: Path, seed: int = 0):
    """Save a tiny Llama + tokenizer as a transformers folder; return the in-memory model."""
    model = tiny_llama_model(seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def fake_convert(calls: list):
    """A stand-in for `gguf_cache.convert_gguf`: writes the tiny Llama folder, counts its calls."""
    from lorakit.models import gguf_cache

    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(gguf_path)
        save_tiny_llama(out)
        (out / gguf_cache.MARKER_FILE).write_text(json.dumps({"source": str(gguf_path)}))

    return convert
