"""Sequence classification (`--task seq-cls`): a text and a label per record.

Encoding tokenizes each text (truncated to seq_len) and keeps the label's id in the training label
set; evaluation predicts the argmax class and reports accuracy and F1. For two classes F1 is the
F1 of the second label (the "positive" class, label 1 in SST-2 and GLUE); for more classes it is
the macro average over the classes, as scikit-learn's `f1_score(average="macro")` defines it.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch

from lorakit.errors import DataError
from lorakit.progress import phase_bar
from lorakit.tasks import Records, TaskRecipe, check_format


def label_names(records: Records) -> list[str]:
    """The training records' label names (index i = class id i)."""
    names = getattr(records, "labels", None)
    if not names:
        raise DataError("seq-cls needs labelled records (a 'label' field next to 'text' or 'sentence')",
                        path=getattr(records, "path", None))
    return list(names)


def label_ids(records: Records, labels: Sequence[str], field: str = "label") -> list[Any]:
    """Map each record's label (an index into `records.labels`) to its id in `labels`.

    Eval data read on its own numbers its labels by what it contains; this puts them in the
    training set's numbering, and refuses a label the model was not trained on.
    """
    own = getattr(records, "labels", None) or list(labels)
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(own) - set(index))
    if unknown:
        raise DataError(f"labels {unknown} do not occur in the training data (known: {list(labels)}); "
                        "a classifier cannot predict a class it was not trained on",
                        path=getattr(records, "path", None))
    remap = [index[name] for name in own]

    def one(value: Any) -> Any:
        return [remap[v] for v in value] if isinstance(value, list) else remap[value]

    return [one(record[field]) for record in records]


def encode(records: Records, tokenizer, seq_len: int, labels: Optional[list[str]]) -> list[dict]:
    """One example per record: input_ids (+ attention_mask, token_type_ids) and the label id."""
    check_format(RECIPE, records)
    ids = label_ids(records, labels or label_names(records))
    texts = [record["text"] for record in records]
    enc = tokenizer(texts, truncation=True, max_length=seq_len)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": ids[i]} for i in range(len(texts))]


def pad_batch(examples: list[dict], tokenizer, label_pad: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pad input_ids/token_type_ids to the longest example; attention_mask marks real tokens.

    `labels` are stacked as they are (one id per example) or, with `label_pad`, padded per token.
    """
    width = max(len(ex["input_ids"]) for ex in examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(key: str, fill: int) -> torch.Tensor:  # (batch, width)
        return torch.tensor([ex[key] + [fill] * (width - len(ex[key])) for ex in examples])

    batch = {"input_ids": padded("input_ids", pad_id),
             "attention_mask": torch.tensor([[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"]))
                                             for ex in examples])}
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = padded("token_type_ids", 0)
    if "labels" in examples[0]:
        batch["labels"] = padded("labels", label_pad) if label_pad is not None else \
            torch.tensor([ex["labels"] for ex in examples])
    return batch


def collate(examples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    return pad_batch(examples, tokenizer)


@torch.no_grad()
def predict(model, tokenizer, examples: list[dict], batch_size: int,
            label_pad: Optional[int] = None) -> tuple[list[torch.Tensor], float]:
    """(logits per example in input order, mean loss per loss unit), from one pass in length-sorted batches.

    The loss unit is the example, or with `label_pad` (per-token labels) the labelled token.
    """
    from lorakit.train.batching import to_device
    from lorakit.train.runtime import model_device

    device = model_device(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out: list[Optional[torch.Tensor]] = [None] * len(examples)
    total, units = 0.0, 0
    was_training = model.training
    model.eval()
    bar = phase_bar(len(order))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = pad_batch([examples[i] for i in chunk], tokenizer, label_pad)
            bar.update(len(chunk))
            result = model(**to_device(batch, device))
            n = int((batch["labels"] != label_pad).sum()) if label_pad is not None else len(chunk)
            total, units = total + float(result.loss) * n, units + n
            logits = result.logits.float().cpu()
            for row, i in enumerate(chunk):
                out[i] = logits[row]
    finally:
        bar.close()
        model.train(was_training)
    return out, total / max(units, 1)  # type: ignore[return-value]


def accuracy_f1(gold: Sequence[int], pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, and F1 (binary: of class 1; more classes: macro over the classes)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        return {"accuracy": 0.0, "f1": 0.0}
    accuracy = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    classes = [1] if num_labels == 2 else range(num_labels)
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": accuracy, "f1": sum(f1s) / len(f1s)}


def evaluate(model, tokenizer, records: Records, seq_len: int, batch_size: int,
             labels: Optional[list[str]]) -> dict[str, float]:
    """Accuracy and F1 of the model's argmax class on `records` (see the module docstring), and the
    mean loss per example (`eval_loss`), from the same forward pass."""
    labels = labels or label_names(records)
    examples = encode(records, tokenizer, seq_len, labels)
    logits, loss = predict(model, tokenizer, examples, batch_size)
    pred = [int(row.argmax()) for row in logits]
    scores = accuracy_f1([ex["labels"] for ex in examples], pred, len(labels))
    warn_if_one_class(pred, labels, {**scores, "eval_loss": loss})
    return {**scores, "eval_loss": loss}


def warn_if_one_class(pred: Sequence[int], labels: Sequence[str], scores: dict[str, float]) -> None:
    """Warn when the model predicts the same class for every example: accuracy is then that class's share of
    the data (the majority-class baseline at best), which reads like skill and is none."""
    if len(pred) < 2 or len(labels) < 2 or len(set(pred)) > 1:
        return
    warnings.warn(f"seq-cls: the model predicts {labels[pred[0]]!r} for all {len(pred):,} examples, so accuracy "
                  f"{scores['accuracy']:.3f} and F1 {scores['f1']:.3f} only measure how common that class is "
                  f"(eval loss {scores.get('eval_loss', float('nan')):.4f}). Expected of an untrained "
                  "head; after training, train longer (--epochs, --max-steps) "
                  "or with another --lr, and check that the training labels are not nearly all one class",
                  stacklevel=3)


RECIPE = TaskRecipe(name="seq-cls", formats=("classification",), label_names=label_names, encode=encode,
                    collate=collate, evaluate=evaluate, primary_metric="accuracy")
