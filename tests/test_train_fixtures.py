"""Shared helpers for the tests/test_train_*.py files: a tiny LoRA model and random token data.

The LoRA wrapper comes from the one import below; switching the tests from PEFT to lorakit means
changing that line only (the API is the same).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft import LoraConfig, get_peft_model  # the lorakit switch: from lorakit import LoraConfig, get_peft_model

from lorakit.train import TrainConfig

VOCAB = 128
TINY_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=VOCAB)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_model(seed: int = 0, r: int = 4, dropout: float = 0.0,
                    targets: list[str] | None = None) -> torch.nn.Module:
    """A random 2-layer Llama with LoRA on the attention (and, if asked, MLP) projections.

    The same seed gives bit-identical base and LoRA weights."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                        target_modules=targets or ["q_proj", "v_proj"])
    with warnings.catch_warnings():  # PEFT 0.21 calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, config)


def random_examples(n: int, length: int | tuple[int, int] = 12, seed: int = 1) -> list[dict]:
    """`n` examples of random token ids; `length` fixed or a (min, max) range."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        size = length if isinstance(length, int) else int(
            torch.randint(length[0], length[1] + 1, (1,), generator=generator))
        examples.append({"input_ids": torch.randint(0, VOCAB, (size,), generator=generator)})
    return examples


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked and labelled -100."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = e["input_ids"]
        mask[row, : len(e["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fast_config(**overrides) -> TrainConfig:
    """A TrainConfig for a few quick steps on the tiny model (no warmup, log every step)."""
    values = dict(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, eval_every=0,
                  save_every=0, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run several times faster on one thread than on two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- a tiny model folder and chat data, for tests that run `lorakit train` (also in subprocesses) ---

def write_tiny_model_dir(folder, **overrides) -> str:
    """Save a random 2-layer Llama (hidden 32; `overrides` go to its LlamaConfig) and a local tokenizer
    into `folder`; return its path."""
    from transformers import LlamaConfig

    from tests.test_data_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **overrides)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_chat_data(path, n: int, offset: int = 0) -> str:
    """`n` short question/answer chats of varied lengths as a .jsonl file; return its path."""
    import json

    words = ["blue", "the lab", "under the mat", "at noon", "ann", "a key", "the red door", "soon"]
    rows = []
    for i in range(offset, offset + n):
        answer = " ".join(words[(i + k) % len(words)] for k in range(1 + i % 4))
        rows.append({"messages": [{"role": "user", "content": f"question {i}: where is {words[i % 8]}"},
                                  {"role": "assistant", "content": answer}]})
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)
