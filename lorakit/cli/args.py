"""Command-line options generated from the config dataclasses, so every option is written once.

Each dataclass field becomes `--kebab-case-name`; the string under the field is its help text.
`--config file.yaml` supplies values (snake_case or kebab-case keys); the command line overrides them.
(jsonargparse was considered: it cannot give the dashed option names the SPEC fixes, e.g. --max-steps.)
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from ..errors import ConfigError

OTHER_TOOLS_NAMES = {"learning_rate": "lr", "lora_alpha": "alpha", "lora_r": "r", "rank": "r",
                     "lora_dropout": "dropout", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
                     "gradient_accumulation_steps": "grad_accum", "max_seq_length": "seq_len", "max_length": "seq_len",
                     "target_modules": "targets", "output_dir": "out", "lr_scheduler_type": "lr_schedule",
                     "model_name_or_path": "model", "dataset": "data", "logging_steps": "log_every",
                     "save_steps": "save_every", "eval_steps": "eval_every"}
"""Option names of transformers' TrainingArguments and PEFT's LoraConfig, for 'did you mean' in a YAML file."""
REGEX_CHARS = re.compile(r"[.*+?^$()\[\]{}|\\]")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (PEP 257 attribute docstrings)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_targets(text: str) -> Union[str, list[str]]:
    """'all-linear' and regexes stay strings; 'q_proj,v_proj' (or one plain name) becomes a list."""
    if text == "all-linear" or REGEX_CHARS.search(text.replace(".", "")) or text.startswith("^"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.lower() in ("none", "null") else convert(text)


def _converter(hint: Any) -> tuple[Callable[[str], Any], Optional[list]]:
    """(str -> value, choices) for a type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return (lambda t: _bool(t) if t.lower() in ("true", "false") else t), list(args)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        if any(typing.get_origin(a) is list for a in inner):
            return _none_or(parse_targets), None
        if bool in inner and len(inner) > 1:  # e.g. init_lora_weights: bool | "gaussian" | ...
            def both(t: str) -> Any:
                return _bool(t) if t.lower() in ("true", "false") else t
            choices = [c for a in inner if typing.get_origin(a) is Literal for c in typing.get_args(a)]
            return both, (choices + [True, False] if choices else None)
        convert, choices = _converter(inner[0])
        return (_none_or(convert) if type(None) in args else convert), choices
    if hint is bool:
        return _bool, None
    if hint in (int, float, str):
        return hint, None
    return str, None


# Second spellings: PEFT's names, and a way past torchrun, whose own parser takes `--r` for `--rdzv-*`.
ALIASES = {"r": ["--lora-r"], "alpha": ["--lora-alpha"], "dropout": ["--lora-dropout"], "project": ["--experiment"]}


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One --option per field of dataclass `cls` (defaults left unset, so YAML values can fill them)."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-")] + ALIASES.get(f.name, [])
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if hint is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        convert, choices = _converter(hint)
        extra = {}
        if typing.get_origin(hint) is list:  # repeatable: --adapter a --adapter b
            convert, choices, extra = str, None, {"action": "append"}
        if typing.get_origin(hint) is Union and bool in typing.get_args(hint) and str in typing.get_args(hint):
            extra = {"nargs": "?", "const": True}  # --resume alone means "the latest checkpoint"
        parser.add_argument(*flags, dest=f.name, type=convert, default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=help_text + (f" choices: {', '.join(map(str, choices))}" if choices else ""), **extra)


def load_yaml_config(path: str, cls: type,
                     adapt: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None) -> dict[str, Any]:
    """Values from a YAML file, keys normalised to field names (then passed through `adapt`, which may read
    another command's file); every problem (unknown or repeated keys, non-numbers) is reported at once."""
    values, problems = read_yaml_options(path, cls, adapt)
    if problems:
        raise ConfigError(problems, where="--config")
    return values


def read_yaml_options(path: str, cls: type, adapt: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """(the usable values, the problems, each naming the file, line and key); a value with a problem is left
    out, so the dataclass's own validation can still report the others."""
    import difflib

    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {path} not found"], where="--config")
    text = p.read_text(encoding="utf-8")
    try:
        raw, node = yaml.safe_load(text) or {}, yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"], where="--config") from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of option: value, got {type(raw).__name__}"], where="--config")
    lines: dict[str, list[int]] = {}  # normalised key -> the lines it is written on
    for key_node, _ in getattr(node, "value", []):
        lines.setdefault(str(key_node.value).replace("-", "_"), []).append(key_node.start_mark.line + 1)
    where = lambda key: f"{path}:{lines.get(key, ['?'])[0]}: {key}"  # noqa: E731
    problems = [f"{path}:{' and '.join(map(str, at))}: {key} is given {len(at)} times (the last one would win); "
                "keep one" for key, at in lines.items() if len(at) > 1]
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    if adapt is not None:
        values = adapt(values)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(values) - known):
        close = [OTHER_TOOLS_NAMES[key]] if OTHER_TOOLS_NAMES.get(key) in known else \
            difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        problems.append(f"{where(key)}: unknown option" + (f"; did you mean {close[0]}?" if close else ""))
        values.pop(key)
    if "targets" in values and isinstance(values["targets"], str):
        values["targets"] = parse_targets(values["targets"])
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):  # YAML 1.1 reads 1e-3 (no dot) as a string: numbers as the CLI does
        if isinstance(value, str) and ({hints[key]} | set(typing.get_args(hints[key]))) & {int, float}:
            try:
                values[key] = _converter(hints[key])[0](value)
            except ValueError:
                problems.append(f"{where(key)}: expected a number, got {value!r}")
                values.pop(key)
    return values, problems


def resumed_run_options(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """On --resume, the options the run folder's config.yaml recorded (the user's options override them), so
    `lorakit train --out RUN --resume` continues the run as it was started. A recorded key this version does not
    know is left out with a warning."""
    import os
    import warnings

    from ..train.report import CONFIG_FILE

    folder = getattr(cls, "named_run_dir", lambda out, name: None)(given.get("out"), given.get("name"))
    if not given.get("resume"):
        return {}
    if folder is None and given.get("resume") is True and "out" in {f.name for f in dataclasses.fields(cls)}:
        raise ConfigError(["--resume continues the run in a folder: name it with --out RUN (or --name NAME for "
                           "runs/NAME); without one, a new run would start in runs/<date-time>"], where="--resume")
    if folder is None:
        return {}
    path = folder / CONFIG_FILE
    if not path.is_file():
        return _options_without_config_yaml(cls, given, folder)
    recorded, problems = read_yaml_options(str(path), cls)
    if problems:
        warnings.warn(f"--resume: left out of {path}: " + "; ".join(problems))
    recorded.pop("resume", None)
    if os.environ.get("RANK", "0") == "0":  # (torchrun: once)
        print(f"resuming with the options recorded in {path} (options given now override them)")
    return recorded


JOB_OPTIONS = ("model", "data", "task", "config")
"""Options that say which job a run is: a --resume that finds no recorded options needs one of them."""


def _options_without_config_yaml(cls: type, given: dict[str, Any], folder: Path) -> dict[str, Any]:
    """--resume on a folder with no config.yaml: the options its newest intact checkpoint recorded, if it has
    one; else nothing to resume from, which is an error unless the options given say which job to start
    (the checkpoint-every-step kill loop starts each session with --resume and its full options)."""
    from ..train.checkpoint import latest_good_checkpoint, saved_config

    checkpoint = latest_good_checkpoint(folder) if folder.is_dir() else None
    if checkpoint is not None:
        known = {f.name for f in dataclasses.fields(cls)}
        recorded = {k: v for k, v in saved_config(checkpoint).items() if k in known and k != "resume"}
        print(f"resuming with the options recorded in {checkpoint} ({folder / 'config.yaml'} is missing; "
              "options given now override them)")
        return recorded
    if any(given.get(name) is not None for name in JOB_OPTIONS):
        return {}
    state = "has no config.yaml and no checkpoint" if folder.is_dir() else "does not exist"
    raise ConfigError([f"{folder} {state}, so there is no run to resume (a run stopped in its first "
                       "seconds leaves nothing). Start it again with its options: lorakit train --model ... "
                       f"--data ... --out {folder}"], where="--resume")


def build_config(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = (),
                 defaults: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
                 adapt_yaml: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None) -> Any:
    """Defaults < `defaults(given)` < a resumed run's config.yaml < YAML (--config) < command line, then the
    dataclass's own validation.

    `defaults(given)` returns defaults that depend on what the user gave (YAML and command line merged),
    e.g. the demo's settings when no --data is given; they fill only the options the user left unset.
    """
    values, problems = read_yaml_options(args.config, cls, adapt_yaml) if getattr(args, "config", None) else ({}, [])
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    values.update({k: v for k, v in vars(args).items() if k in names})
    values = {**resumed_run_options(cls, values), **values}
    if defaults is not None:
        values = {**defaults(values), **values}
    try:
        config = cls(**values)
        validate = getattr(config, "validate", None)
        config = validate() or config if callable(validate) else config
    except ConfigError as e:  # the file's problems and the values' problems, in one list
        if not problems:
            raise
        raise ConfigError(problems + e.problems, where=f"options (--config {args.config})") from None
    if problems:
        raise ConfigError(problems, where="--config")
    return config
