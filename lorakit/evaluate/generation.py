"""Greedy text generation in batches, with the tokenizer's chat template."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lorakit.progress import phase_bar, progress_bar


def chat_prompts(tokenizer, questions: Sequence[str], system: Optional[str] = None) -> list[str]:
    """Each question as a one-turn chat, rendered exactly as training renders prompts (chat template,
    or lorakit's plain Instruction/Response format for tokenizers without one)."""
    from lorakit.data import format_prompt

    head = [{"role": "system", "content": system}] if system else []
    return [format_prompt(head + [{"role": "user", "content": q}], tokenizer) for q in questions]


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 16,
                   adapter_names: Optional[Sequence[str]] = None, progress: Optional[str] = None) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches), decoded without special tokens; `progress`:
    a progress bar's label (None: no bar)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    texts: list[str] = []
    bar = progress_bar(len(prompts), progress, unit="prompt") if progress else phase_bar(len(prompts), unit="prompt")
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            # no token_type_ids: BERT-style tokenizers add them and a causal LM's generate refuses them
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False,
                            return_token_type_ids=False).to(device)
            extra = {"adapter_names": list(adapter_names[start:start + batch_size])} if adapter_names else {}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **extra)
            new = out[:, enc["input_ids"].shape[1]:]  # (batch, new_tokens)
            texts.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
            bar.update(len(chunk))
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return texts
