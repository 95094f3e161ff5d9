"""Greedy decoding in llama.cpp (a `llama_cpp.Llama` made with logits_all=True), fed lorakit's own token ids, so
that what the engine computes is compared and not how it tokenizes: for the export tests and
benchmarks/export_check.py. Nothing here imports llama_cpp; the caller makes the model."""
from __future__ import annotations

import numpy as np


def llama_greedy(llm, ids: list[int], n: int, stops: frozenset = frozenset()) -> list[int]:
    """Up to `n` greedy tokens after `ids`, stopping before any token in `stops`."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stops:
            break
        out.append(token)
        llm.eval([token])
    return out


def llama_answers(llm, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """llama.cpp's greedy answers to rendered `prompts`, up to the end-of-turn token (as lorakit's are cut)."""
    stops = frozenset({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    return [tokenizer.decode(llama_greedy(llm, tokenizer(p, add_special_tokens=False)["input_ids"], max_new_tokens,
                                          stops), skip_special_tokens=True).strip() for p in prompts]
