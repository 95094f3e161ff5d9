"""Token classification (`--task token-cls`): named entities and other per-word tags (CoNLL, IOB2).

Words are split into sub-word tokens; each word's tag goes on its first sub-token and the other
sub-tokens (and special tokens) get -100, so the loss and the prediction are per word, as in the
Hugging Face token-classification recipe. Words cut off by truncation are predicted "O".

Scores are entity-level precision, recall and F1 with seqeval's default (conlleval) definition: an
entity is a maximal B-X I-X ... run (an I-X after O or after another type also starts an entity),
and a predicted entity counts only if its type, start and end all match a gold entity.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lorakit.tasks import Records, TaskRecipe, check_format
from lorakit.tasks.classification import label_ids, label_names, pad_batch, predict

IGNORE = -100


def encode(records: Records, tokenizer, seq_len: int, labels: Optional[list[str]]) -> list[dict]:
    """One example per sentence: sub-word input_ids, the word tag on each word's first sub-token."""
    check_format(RECIPE, records)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("token-cls needs a fast tokenizer (word_ids() maps sub-words to words); "
                        f"{type(tokenizer).__name__} is a slow one")
    tags = label_ids(records, labels or label_names(records), field="tags")
    words = [list(record["tokens"]) for record in records]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=seq_len)
    examples = []
    for i, word_tags in enumerate(tags):
        word_ids = enc.word_ids(i)
        example = {"input_ids": enc["input_ids"][i], "labels": first_subtoken_labels(word_ids, word_tags),
                   "word_ids": [-1 if w is None else w for w in word_ids], "num_words": len(word_tags)}
        if "token_type_ids" in enc:
            example["token_type_ids"] = enc["token_type_ids"][i]
        examples.append(example)
    return examples


def first_subtoken_labels(word_ids: Sequence[Optional[int]], word_tags: Sequence[int]) -> list[int]:
    """Per-token labels: the word's tag on its first sub-token, -100 elsewhere (specials included)."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else word_tags[w])
        previous = w
    return out


def collate(examples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    model_inputs = [{k: ex[k] for k in ("input_ids", "token_type_ids", "labels") if k in ex} for ex in examples]
    return pad_batch(model_inputs, tokenizer, label_pad=IGNORE)


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The (type, first word, last word) entities in one sentence's IOB tags (conlleval rules)."""
    found, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-") if tag != "O" else ("O", "", "")
        ends = kind is not None and (prefix in ("O", "B", "S") or typ != kind)
        if ends:
            found.add((kind, start, i - 1))
            kind = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and kind is None):
            start, kind = i, typ
        if prefix in ("E", "S") and kind is not None:  # IOBES closes the entity on this word
            found.add((kind, start, i))
            kind = None
    return found


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision/recall/F1 over sentences, plus word-level accuracy."""
    tp = n_gold = n_pred = words = right = 0
    for g, p in zip(gold, pred, strict=True):
        ge, pe = entities(g), entities(p)
        tp, n_gold, n_pred = tp + len(ge & pe), n_gold + len(ge), n_pred + len(pe)
        words, right = words + len(g), right + sum(a == b for a, b in zip(g, p))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": right / words if words else 0.0}


def word_predictions(logits: torch.Tensor, example: dict) -> list[int]:
    """The predicted tag id of every word: the argmax at its first sub-token; 0 ("O") when truncated."""
    pred = [0] * example["num_words"]
    best = logits.argmax(-1).tolist()  # (tokens,)
    for position, label in enumerate(example["labels"]):
        if label != IGNORE:
            pred[example["word_ids"][position]] = best[position]
    return pred


def evaluate(model, tokenizer, records: Records, seq_len: int, batch_size: int,
             labels: Optional[list[str]]) -> dict[str, float]:
    """Entity precision/recall/F1 (seqeval's definition), word accuracy, and the mean loss per labelled
    token (`eval_loss`, from the same forward pass) on `records`."""
    labels = labels or label_names(records)
    examples = encode(records, tokenizer, seq_len, labels)
    logits, loss = predict(model, tokenizer, examples, batch_size, label_pad=IGNORE)
    gold = [[labels[t] for t in tags] for tags in label_ids(records, labels, field="tags")]
    pred = [[labels[t] for t in word_predictions(row, ex)] for row, ex in zip(logits, examples)]
    return {**entity_scores(gold, pred), "eval_loss": loss}


RECIPE = TaskRecipe(name="token-cls", formats=("token_classification",), label_names=label_names,
                    encode=encode, collate=collate, evaluate=evaluate, primary_metric="f1")
