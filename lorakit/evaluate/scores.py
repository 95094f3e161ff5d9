"""Figures for a run: mean token loss on a data set, and the demo's held-out accuracy and retention."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from lorakit.evaluate.generation import chat_prompts, generate_texts
from lorakit.progress import phase_bar, progress_bar


@torch.no_grad()
def eval_loss(model, examples: Sequence[dict], collate: Callable[[list], dict], batch_size: int = 8,
              count_units: Optional[Callable[[dict], int]] = None, progress: Optional[str] = None) -> dict:
    """Mean loss per loss unit over `examples`, and its perplexity.

    `count_units(batch)` says how many units the model's mean loss of a batch averages over
    (`lorakit.train.batching.loss_unit_counter(task)`); default: causal-LM label tokens. `progress`: a
    progress bar's label (None: no bar).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with (progress_bar(len(examples), progress, unit="example") if progress else phase_bar(len(examples))) as bar:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(examples[start:start + batch_size])).items()}
            bar.update(min(batch_size, len(examples) - start))
            n = count_units(batch) if count_units else int((batch["labels"][:, 1:] != -100).sum())  # t+1 from t
            if n == 0:
                continue
            total += float(model(**batch).loss) * n
            tokens += n
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}  # tokens = units counted


@dataclass
class DemoScores:
    """How a model does on the demo's held-out handbook questions and general-knowledge questions."""

    heldout_accuracy: float
    general_accuracy: float
    heldout_answers: list[str] = field(default_factory=list)
    general_correct: list[bool] = field(default_factory=list)


def score_demo(model, tokenizer, demo, is_correct: Callable[[str, list], bool],
               max_new_tokens: int = 24, progress: Optional[str] = None) -> DemoScores:
    questions = [q["question"] for q in demo.heldout] + [q["question"] for q in demo.general]
    answers = generate_texts(model, tokenizer, chat_prompts(tokenizer, questions), max_new_tokens=max_new_tokens,
                             progress=progress)
    held, general = answers[:len(demo.heldout)], answers[len(demo.heldout):]
    held_ok = [is_correct(a, q["keys"]) for a, q in zip(held, demo.heldout)]
    gen_ok = [is_correct(a, q["keys"]) for a, q in zip(general, demo.general)]
    return DemoScores(sum(held_ok) / len(held_ok), sum(gen_ok) / max(len(gen_ok), 1), held, gen_ok)


def retention(before: DemoScores, after: DemoScores) -> Optional[float]:
    """Of the general questions the base model answered right, the fraction still right after training."""
    kept = [a for b, a in zip(before.general_correct, after.general_correct) if b]
    return sum(kept) / len(kept) if kept else None
