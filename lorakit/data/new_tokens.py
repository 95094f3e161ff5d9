"""Tokens a run adds to the tokenizer: those named with --add-tokens, and the turn markers the chat template
writes that the tokenizer does not have as tokens of their own (a template set on a base model's tokenizer)."""
from __future__ import annotations

import re
from typing import Sequence

from .causal import has_chat_template

MARKER = re.compile(r"<\|[^|<>\s]{1,40}\|>|<(?:start|end)_of_turn>")
"""What a chat template's turn markers look like: <|im_start|>, <|eot_id|>, <start_of_turn> ..."""
PROBE = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def template_tokens_missing(tokenizer) -> list[str]:
    """The markers the tokenizer's chat template writes that the tokenizer splits into several tokens."""
    if not has_chat_template(tokenizer):
        return []
    try:
        text = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=False)
    except Exception:  # (a template that refuses this conversation: the data's rows are checked when rendered)
        return []
    markers = dict.fromkeys(MARKER.findall(text if isinstance(text, str) else ""))
    return [m for m in markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]


def tokens_to_add(tokenizer, requested: Sequence[str]) -> list[str]:
    """The requested tokens and the template's missing markers, less those the tokenizer has already."""
    vocab = tokenizer.get_vocab()
    wanted = dict.fromkeys([*requested, *template_tokens_missing(tokenizer)])
    return [t for t in wanted if t not in vocab]


def adapter_tokenizer(model, tokenizer, adapter_dir):
    """The tokenizer saved beside an adapter (a run that added tokens saves it there), with the model's embeddings
    grown to it so the adapter's new rows fit; else `tokenizer` as it was."""
    from pathlib import Path

    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return tokenizer
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(str(adapter_dir))
    if len(own) > model.get_input_embeddings().weight.shape[0]:  # the new rows come from the adapter
        model.resize_token_embeddings(len(own), mean_resizing=False)
    return own
