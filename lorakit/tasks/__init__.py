"""Task recipes: for each `--task`, how records become model inputs and how a model is scored.

One recipe per task, in its own file (`classification.py`, `tokens.py`, `qa.py`, `seq2seq.py`); the
training glue (`lorakit.cli.train`) and `lorakit eval` only ever talk to the `TaskRecipe` interface:

    recipe = recipe_for("seq-cls")
    labels = recipe.label_names(train_records)            # None for tasks without a label set
    model = load_model(..., num_labels=len(labels), id2label=dict(enumerate(labels)))
    train = recipe.encode(train_records, tokenizer, seq_len, labels)       # list of example dicts
    batch = recipe.collate(train[:8], tokenizer)                          # tensors; model(**batch).loss
    scores = recipe.evaluate(model, tokenizer, eval_records, seq_len, batch_size, labels)
    # -> {"accuracy": 0.91, "f1": 0.90, ...}: plain metric names, no prefixes

Causal LM keeps its own path (`lorakit.data.build_causal_examples`); vision lives in `vision.py`
(images, not text records) and is used from Python.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from lorakit.errors import ConfigError

Records = Any  # a lorakit.data.RecordSet (or any sequence of normalized record dicts)


@dataclass(frozen=True)
class TaskRecipe:
    """What `lorakit train --task NAME` and `lorakit eval` need to know about one task."""

    name: str
    """The --task name: seq-cls, token-cls, qa, seq2seq."""
    formats: tuple[str, ...]
    """Record formats (lorakit.data) this task reads, e.g. ("classification",)."""
    label_names: Callable[[Records], Optional[list[str]]]
    """The label set of the training records (None when the task has none)."""
    encode: Callable[[Records, Any, int, Optional[list[str]]], list[dict]]
    """(records, tokenizer, seq_len, label names) -> training examples (dicts of lists)."""
    collate: Callable[[list[dict], Any], dict]
    """(examples, tokenizer) -> a batch of tensors that `model(**batch)` takes, labels included."""
    evaluate: Callable[..., dict[str, float]]
    """(model, tokenizer, records, seq_len, batch_size, label names) -> {metric: value}."""
    primary_metric: str
    """The metric shown first and used to compare runs (accuracy, f1, exact_match ...)."""


_MODULES = {"seq-cls": "classification", "token-cls": "tokens", "qa": "qa", "seq2seq": "seq2seq"}


def recipe_for(task: str) -> TaskRecipe:
    """The recipe of a --task name.

    Raises:
        ConfigError: an unknown task, or causal-lm (which has its own path).
    """
    if task not in _MODULES:
        raise ConfigError([f"no task recipe for {task!r}; recipes exist for {', '.join(_MODULES)}"],
                          where="task")
    return importlib.import_module(f"{__name__}.{_MODULES[task]}").RECIPE


def check_format(recipe: TaskRecipe, records: Records) -> None:
    """Refuse records whose format the task cannot read, saying which fields it expects."""
    fmt = getattr(records, "format", None)
    if fmt is not None and fmt not in recipe.formats:
        from ..data.causal import CAUSAL_FORMATS

        fits = (["causal-lm"] if fmt in CAUSAL_FORMATS else []) + \
            [task for task in _MODULES if fmt in recipe_for(task).formats]
        hint = f": train it with --task {' or '.join(fits)}" if fits else ""
        raise ConfigError([f"--task {recipe.name} needs {' or '.join(recipe.formats)} records, but "
                           f"{getattr(records, 'path', 'the data')} holds {fmt} records{hint}"], where="data")
