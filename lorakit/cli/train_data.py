"""The data of a `lorakit train` run: records read, split, encoded and collated for the task.

Causal LM (and the built-in demo) goes through `lorakit.data.build_causal_examples`; the other tasks
through their `lorakit.tasks` recipe. Both return one dict shape, so the training glue does not care:
{"train", "stats", "val", "collate", "demo", "fingerprint", "task"}.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from ..train.config import TrainConfig

VAL_FRACTION = 0.05
CALIBRATION_BATCH = 8
"""Rows per forward pass while collecting QLoRA's calibration statistics."""


def data_fingerprint(path: str) -> str:
    """`name:sha256[:16]` of a data file's bytes; the path itself for folders and dataset names."""
    file = Path(path)
    return f"{file.name}:" + _digest(file.read_bytes()) if file.is_file() else path


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def read_task_records(config: TrainConfig) -> Optional[dict[str, Any]]:
    """For a non-causal --task: {"recipe", "train", "eval", "labels"} (records, not yet tokenized).

    Eval records come from --eval-data (read with the training label set, so ids agree) or, without
    it, a seeded VAL_FRACTION split of the training data.
    """
    from ..data import read_records, train_val_split
    from ..errors import ConfigError
    from ..tasks import check_format, recipe_for

    if config.task == "causal-lm":
        return None
    if config.data is None:
        raise ConfigError([f"--task {config.task} needs --data (the built-in demo is a causal-lm chat data set)"],
                          where="train config")
    recipe = recipe_for(config.task)
    records = read_records(config.data)
    check_format(recipe, records)
    labels = recipe.label_names(records)
    if config.task == "seq-cls" and labels is not None and len(labels) < 2:
        from ..errors import DataError

        raise DataError(f"every record has the label {labels[0]!r}: a classifier learns to tell two or more "
                        "classes apart; add records of the other classes", path=config.data)
    if config.eval_data:
        train, evaluation = records, read_records(config.eval_data, labels=labels)
        check_format(recipe, evaluation)
    else:
        train, evaluation = train_val_split(records, val_fraction=VAL_FRACTION, seed=config.seed)
    print(f"training data: {len(train):,} {records.format} records from {config.data}; evaluation: "
          f"{len(evaluation):,} records" + (f"; labels: {', '.join(labels[:12])}" if labels else ""))
    return {"recipe": recipe, "train": train, "eval": evaluation, "labels": labels}


def label_arguments(task: dict[str, Any]) -> dict[str, Any]:
    """`load_model` keyword arguments that size the classification head (none for label-free tasks)."""
    labels = task["labels"]
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels))} if labels else {}


def task_data(task: dict[str, Any], config: TrainConfig, tokenizer) -> dict[str, Any]:
    """Encoded examples of a non-causal task, in the same dict shape as `causal_data`."""
    recipe = task["recipe"]
    train = recipe.encode(task["train"], tokenizer, config.seq_len, task["labels"])
    val = recipe.encode(task["eval"], tokenizer, config.seq_len, task["labels"]) if len(task["eval"]) else None
    return {"train": train, "stats": None, "val": val, "collate": lambda batch: recipe.collate(batch, tokenizer),
            "demo": None, "fingerprint": data_fingerprint(config.data), "task": task}


FLAT_ROW_MULTIPLE = 64
"""On a CPU a padding-free row is padded to a multiple of this many tokens: oneDNN compiles a bf16 matmul kernel
for each new shape (about 6.5 ms for a 1536 x 576 weight, measured on an AMX Xeon, against 1 ms for the product),
and rows of every length would make each step's shapes new; with the multiple the shapes repeat after a few steps.
The padding (at most 63 tokens, position 0, no labels) is not counted as input tokens."""


def _collate_fn(tokenizer, model_dtype, flatten: bool, multiple: Optional[int] = None):
    from ..data import collate_causal

    pad = tokenizer.pad_token_id
    return lambda examples: collate_causal(examples, pad_token_id=pad, mask_dtype=model_dtype,  # masks in compute dtype
                                           flatten=flatten, pad_to_multiple_of=multiple)


def calibration_batches(config: TrainConfig, tokenizer, device, records) -> list[dict[str, Any]]:
    """QLoRA's calibration inputs (GPTQ rounding): the first `config.quantize_calibration` of the run's
    training `records` (causal_records' first), unpacked, CALIBRATION_BATCH rows a batch."""
    from dataclasses import replace

    from ..data import build_causal_examples, collate_causal

    n = config.quantize_calibration
    examples = build_causal_examples(replace(records, records=records.records[:n], sources=records.sources[:n]),
                                     tokenizer, seq_len=config.seq_len).examples
    groups = [examples[i:i + CALIBRATION_BATCH] for i in range(0, len(examples), CALIBRATION_BATCH)]
    batches = [collate_causal(group, pad_token_id=tokenizer.pad_token_id) for group in groups]
    return [{k: b[k].to(device) for k in ("input_ids", "attention_mask")} for b in batches]


def causal_records(config: TrainConfig, demo=None) -> tuple[Any, Any]:
    """(train, val) records of a causal-LM run: the demo's chats and no val without --data (the demo is
    judged on its held-out questions); else --data with --eval-data, or a seeded VAL_FRACTION split of
    --data. Read once per run: QLoRA's calibration and the training data take them from here."""
    from ..data import load_demo, read_records, records_from_dicts, train_val_split

    if config.data is None:
        demo = demo or load_demo()
        return records_from_dicts([{"messages": r["messages"]} for r in demo.train], name="built-in demo"), None
    records = read_records(config.data)
    if config.eval_data:
        return records, read_records(config.eval_data)
    return train_val_split(records, val_fraction=VAL_FRACTION, seed=config.seed)


def causal_data(config: TrainConfig, tokenizer, model_dtype, distill: bool, flatten: bool = False,
                records: Optional[tuple[Any, Any]] = None, cpu: bool = False) -> dict[str, Any]:
    """Causal-LM data: {"train": examples, "stats", "val": examples or None, "collate", "demo": Demo or None,
    "fingerprint", "task": None}. `distill`: the demo's rehearsal chats get a KL term (the loss supports it);
    `flatten`: packed batches become one padding-free row (the model attends per example); `records`:
    causal_records(config) when the run has read them already; `cpu`: the model trains on a CPU (flattened rows are
    then padded to a multiple of FLAT_ROW_MULTIPLE tokens)."""
    from ..data import build_causal_examples, load_demo

    collate = _collate_fn(tokenizer, model_dtype, flatten, FLAT_ROW_MULTIPLE if flatten and cpu else None)
    if config.data is None:
        demo = load_demo()
        fingerprint = "demo:" + _digest(json.dumps(demo.train, sort_keys=True).encode())
        if distill:
            return {**_demo_examples(demo, tokenizer, config), "val": None, "collate": collate, "demo": demo,
                    "fingerprint": fingerprint, "task": None}
    else:
        demo, fingerprint = None, data_fingerprint(config.data)
    train, val = records if records is not None else causal_records(config, demo)
    train_ex = build_causal_examples(train, tokenizer, seq_len=config.seq_len, packing=config.packing)
    print(f"training data: {train_ex.stats.summary()}")
    val_ex = build_causal_examples(val, tokenizer, seq_len=config.seq_len) if val is not None and len(val) else None
    return {"train": train_ex.examples, "stats": train_ex.stats, "val": val_ex.examples if val_ex else None,
            "collate": collate, "demo": demo, "fingerprint": fingerprint, "task": None}


def _demo_examples(demo, tokenizer, config: TrainConfig) -> dict[str, Any]:
    """The demo's examples: handbook answers are learned (labels); on the rehearsal chats the model is
    held to its own base predictions (`distill_mask`, a KL term in lorakit.fast's loss) instead."""
    from ..data import build_causal_examples, pack_examples, records_from_dicts

    def examples(rows: list[dict], name: str):
        return build_causal_examples(records_from_dicts([{"messages": r["messages"]} for r in rows], name=name),
                                     tokenizer, seq_len=config.seq_len, packing=False)

    handbook = examples([r for r in demo.train if r.get("fact")], "built-in demo")
    rehearsal = examples([r for r in demo.train if not r.get("fact")], "built-in demo (rehearsal)")
    for ex in handbook.examples:
        ex["distill_mask"] = [0] * len(ex["input_ids"])
    for ex in rehearsal.examples:
        ex["distill_mask"] = [int(label != -100) for label in ex["labels"]]
        ex["labels"] = [-100] * len(ex["labels"])
    print(f"training data: handbook {handbook.stats.summary()}; rehearsal (kept close to the base model): "
          f"{len(rehearsal.examples)} chats" + (", packed" if config.packing else ""))
    train = handbook.examples + rehearsal.examples
    if config.packing:  # (the base model's states are computed per rehearsal chat, once, whatever its row)
        train = pack_examples(train, config.seq_len)
    return {"train": train, "stats": handbook.stats}

