"""`load_model`: one call from a model name to a ready model + tokenizer on the right device.

    loaded = load_model("smollm2-135m")                       # causal LM, tokenizer, cpu/fp32 here
    loaded = load_model("minilm-l6", task="seq-cls", num_labels=3)
    loaded.model, loaded.tokenizer, loaded.device, loaded.dtype

Every failure a user can cause (unknown name, offline hub id, wrong task, missing package) raises
`ModelLoadError` or `ConfigError` with what to do instead.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError

from lorakit.errors import ConfigError, LorakitError, ModelLoadError
from lorakit.models.device import resolve_device, resolve_dtype
from lorakit.models.gguf_cache import ensure_gguf_cache, fix_model_max_length
from lorakit.models.sources import (ModelSource, alternatives_text, hub_reachable,
                                    offline_hub_error, resolve_source)

logger = logging.getLogger(__name__)

#: Task name -> the transformers Auto class that builds a model for it.
TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "qa": "AutoModelForQuestionAnswering",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "feature-extraction": "AutoModel",
}
# PEFT's TaskType values, so `task_type="SEQ_CLS"` means the same thing here.
_TASK_ALIASES = {"causal_lm": "causal-lm", "seq_cls": "seq-cls", "token_cls": "token-cls",
                 "question_ans": "qa", "seq_2_seq_lm": "seq2seq", "seq2seq_lm": "seq2seq",
                 "feature_extraction": "feature-extraction"}
_LABEL_TASKS = ("seq-cls", "token-cls")
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError)
TOKENIZER_FILE_HINTS = ("tokenizer", "vocab", "merges", "special_tokens_map", "tekken", "spiece", "sentencepiece")
"""A model folder with no file whose name starts like one of these, and no `*.model` or `*.tiktoken`, has
no tokenizer: transformers 5.0 then quietly makes a blank one (3 tokens)."""


@dataclass
class LoadedModel:
    """A model ready to train or run, with its tokenizer and where it came from."""

    model: torch.nn.Module
    """The transformers model, on `device`, in `dtype`."""
    tokenizer: Any
    """Its tokenizer; always has a pad token when the model has an eos token."""
    name: str
    """Canonical name: the embedded name, the absolute path, or the hub id (also `model.name_or_path`)."""
    source: str
    """The path (or hub id) actually loaded, e.g. the cached folder of a .gguf file."""
    dtype: torch.dtype
    device: torch.device
    task: str
    """The canonical task name, one of `TASKS`."""


def normalize_task(task: Any) -> str:
    """Return the canonical task name for `task` (lorakit names or PEFT TaskType values).

    Raises:
        ConfigError: an unknown task, listing the valid ones.
    """
    word = str(getattr(task, "value", task)).strip().lower()
    word = _TASK_ALIASES.get(word, word).replace("_", "-")
    if word not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}", where="task")
    return word


def _label_config(task: str, num_labels: int | None,
                  id2label: Mapping[Any, str] | None) -> dict[str, Any]:
    """Validate the label arguments; return the config fields to set (a fresh dict)."""
    if num_labels is None and id2label is None:
        return {}
    problems = []
    if task not in _LABEL_TASKS:
        problems.append(f"num_labels/id2label apply to {' and '.join(_LABEL_TASKS)}, not {task!r}")
    labels: dict[int, str] = {}
    if id2label is not None:
        try:
            labels = {int(k): str(v) for k, v in dict(id2label).items()}
        except (TypeError, ValueError):
            problems.append(f"id2label keys must be integers 0..n-1, got {list(id2label)!r}")
        if labels and sorted(labels) != list(range(len(labels))):
            problems.append(f"id2label keys must be 0..{len(labels) - 1}, got {sorted(labels)}")
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            problems.append(f"num_labels must be a positive integer, got {num_labels!r}")
        elif labels and num_labels != len(labels):
            problems.append(f"num_labels={num_labels} but id2label has {len(labels)} labels")
    if problems:
        raise ConfigError(problems, where="model labels")
    if not labels:
        labels = {i: f"LABEL_{i}" for i in range(num_labels)}
    return {"id2label": labels, "label2id": {v: k for k, v in labels.items()}}


def _auto_class(task: str):
    import transformers

    return getattr(transformers, TASKS[task])


def _check_task_supported(config, task: str, source: ModelSource) -> None:
    """Fail early, with the tasks that would work, when transformers has no such head."""
    auto_map = getattr(config, "auto_map", None) or {}
    if TASKS[task] in auto_map:  # remote code brings its own classes
        return
    supported = [t for t in TASKS if type(config) in _auto_class(t)._model_mapping]
    if task not in supported:
        raise ModelLoadError(
            f"{source.name!r} (model type {config.model_type!r}) has no {task!r} model in "
            f"transformers; tasks it supports: {', '.join(supported) or 'none'}")


class _DropLoadReport(logging.Filter):
    """Drop transformers' LOAD REPORT table; `_report_missing` logs a shorter account."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    target = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    target.addFilter(report_filter)
    try:
        yield
    finally:
        target.removeFilter(report_filter)


def _report_missing(model, info: Mapping[str, Any], name: str) -> None:
    """One info line for a newly initialised task head; a warning for anything unexpected."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    missing = sorted(info.get("missing_keys") or ())
    head = [k for k in missing if prefix == "." or not k.startswith(prefix)]
    body = [k for k in missing if k not in head] if prefix != "." else []
    if model.base_model is model:  # a bare base model has no head: every missing key matters
        head, body = [], missing
    if head:
        logger.info("%s: new %s head initialised (%s); train it before use",
                    name, type(model).__name__, ", ".join(head))
    if body:
        logger.warning("%s: %d weights missing from the checkpoint were randomly initialised: %s",
                       name, len(body), ", ".join(body[:10]) + (" ..." if len(body) > 10 else ""))
    mismatched = list(info.get("mismatched_keys") or ())
    if mismatched:
        logger.warning("%s: weights with a different shape were re-initialised: %s", name,
                       ", ".join(str(m[0]) for m in mismatched[:10]))
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logger.info("%s: checkpoint weights not used by %s: %s", name, type(model).__name__,
                    ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))


def _from_pretrained(task: str, location: str, config, dtype: torch.dtype, name: str,
                     **kwargs: Any) -> torch.nn.Module:
    """Build the task's model from `location`, with SDPA attention where the model has it."""
    auto_cls = _auto_class(task)
    kwargs.update(config=config, dtype=dtype, output_loading_info=True)
    with _quiet_load_report():
        try:
            model, info = auto_cls.from_pretrained(location, attn_implementation="sdpa", **kwargs)
        except ValueError as exc:
            if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc).lower():
                raise
            logger.info("%s: no SDPA attention for this model; using its default", name)
            model, info = auto_cls.from_pretrained(location, **kwargs)
    _report_missing(model, info, name)
    return model


def _ensure_pad_token(tokenizer, model, task: str) -> None:
    """Give the tokenizer a pad token (eos if it has none) and tell the model which id it is."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("the tokenizer has neither a pad nor an eos token; batches of unequal "
                           "length cannot be padded")
            return
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token; using its eos token %r", tokenizer.eos_token)
    pad_id = tokenizer.pad_token_id
    # Sequence classification finds each row's last real token through config.pad_token_id.
    if task == "seq-cls" or getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = pad_id


def _load_parts(source: ModelSource, location: str, task: str, dtype: torch.dtype,
                labels: dict[str, Any], hub_kwargs: dict[str, Any]):
    """Load config, tokenizer and model from a folder or hub id; wrap failures in ModelLoadError."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(location, **hub_kwargs)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot read the model config of {source.name!r} at {location}: {exc}") from exc
    _check_task_supported(config, task, source)
    for key, value in labels.items():
        setattr(config, key, value)
    try:
        if os.path.isdir(location) and not _has_tokenizer_files(location):
            raise OSError("no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.*, *.model ...) in the folder")
        tokenizer = AutoTokenizer.from_pretrained(location, **hub_kwargs)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source.name!r} from {location} "
                             f"(a model folder needs its tokenizer files saved beside it): {exc}") from exc
    try:
        model = _from_pretrained(task, location, config, dtype, source.name, **hub_kwargs)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the weights of {source.name!r} from {location}: {exc}") from exc
    return model, tokenizer


def _has_tokenizer_files(folder: str) -> bool:
    return any(name.startswith(TOKENIZER_FILE_HINTS) or name.endswith((".model", ".tiktoken"))
               for name in os.listdir(folder))


def _hub_kwargs(source: ModelSource, trust_remote_code: bool) -> dict[str, Any]:
    """from_pretrained options: never touch the network for local paths, probe it for hub ids."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.kind != "hub" or not hub_reachable():
        kwargs["local_files_only"] = True
    return kwargs


def _load_from_source(source: ModelSource, task: str, dtype: torch.dtype,
                      labels: dict[str, Any], trust_remote_code: bool):
    """Return (model, tokenizer, location loaded) for any kind of source."""
    kwargs = _hub_kwargs(source, trust_remote_code)
    if source.kind == "gguf":
        folder = str(ensure_gguf_cache(source.location))
        try:
            return (*_load_parts(source, folder, task, dtype, labels, kwargs), folder)
        except ModelLoadError as exc:
            if isinstance(exc.__cause__, LorakitError) or exc.__cause__ is None:
                raise
            logger.warning("the cached conversion at %s is unreadable (%s); converting again",
                           folder, exc.__cause__)
            folder = str(ensure_gguf_cache(source.location, rebuild=True))
            return (*_load_parts(source, folder, task, dtype, labels, kwargs), folder)
    try:
        return (*_load_parts(source, source.location, task, dtype, labels, kwargs), source.location)
    except ModelLoadError as exc:
        if source.kind != "hub" or exc.__cause__ is None:  # not a download problem
            raise
        if kwargs.get("local_files_only"):
            raise offline_hub_error(source.name, exc.__cause__) from exc
        raise ModelLoadError(f"{exc}\nWithout the network, use one of:\n"
                             f"{alternatives_text()}") from exc


def _task_of_folder(source) -> str:
    """A local folder's task from its config.json (an encoder-decoder: seq2seq; a saved task model: its task),
    else causal-lm."""
    from ..lora.files import read_json_object

    config = read_json_object(Path(source.location) / "config.json") if source.kind == "folder" else {}
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    suffixes = {"ForSequenceClassification": "seq-cls", "ForTokenClassification": "token-cls",
                "ForQuestionAnswering": "qa"}
    for architecture in config.get("architectures") or []:
        for suffix, task in suffixes.items():
            if str(architecture).endswith(suffix):
                return task
    return "causal-lm"


def load_model(name_or_path: str | os.PathLike, task: str | None = "causal-lm", device: str = "auto",
               dtype: str = "auto", num_labels: int | None = None,
               id2label: Mapping[int, str] | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a model and its tokenizer for `task`, on `device`, in `dtype`.

    Args:
        name_or_path: an embedded name (`smollm2-135m`, `minilm-l6`), a local transformers
            folder, a `.gguf` file (or a folder holding one), or a Hugging Face hub id.
        task: one of `TASKS` (PEFT TaskType values are accepted too); None means the embedded
            model's default task, or a local folder's own (its config.json), else causal-lm.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (see `resolve_device`).
        dtype: "auto", "fp32", "bf16" or "fp16" (see `resolve_dtype`).
        num_labels: number of classes for seq-cls / token-cls (a new head is initialised).
        id2label: class names by index for seq-cls / token-cls; implies num_labels.
        trust_remote_code: let transformers run code shipped with a hub model.

    Returns:
        A `LoadedModel`; its tokenizer has a pad token and, for seq-cls,
        `model.config.pad_token_id` matches it.

    Raises:
        ConfigError: a bad task, device, dtype or label argument.
        ModelLoadError: the model cannot be found or loaded (message names the alternatives).
    """
    # Cheap argument checks first, so a typo fails before any file is read.
    task = normalize_task(task) if task is not None else None
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = resolve_source(name_or_path)
    if task is None:
        task = source.embedded.default_task if source.embedded else _task_of_folder(source)
    labels = _label_config(task, num_labels, id2label)
    if source.embedded is not None and task not in source.embedded.tasks:
        raise ModelLoadError(f"{source.name!r} does not support task {task!r}; its tasks: "
                             f"{', '.join(source.embedded.tasks)}")
    model, tokenizer, location = _load_from_source(source, task, torch_dtype, labels,
                                                   trust_remote_code)
    _ensure_pad_token(tokenizer, model, task)
    fix_model_max_length(tokenizer, model.config)
    model.to(torch_device)
    # Adapters saved from this model record the name users can load it by again.
    model.config._name_or_path = source.name
    model.name_or_path = source.name
    tokenizer.name_or_path = source.name
    return LoadedModel(model=model, tokenizer=tokenizer, name=source.name, source=location,
                       dtype=torch_dtype, device=torch_device, task=task)
