"""The subcommands generate, chat, merge and inspect. Each has one options dataclass."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .args import add_options, build_config
from .main import command


@dataclass
class ModelOptions:
    """Which model to run, and where."""

    model: Optional[str] = None
    """Base model: an embedded name (smollm2-135m, minilm-l6), a local folder, a .gguf file or a hub id.
    None = the base model the first --adapter was trained on (as its lorakit.json or adapter_config.json
    records it), or smollm2-135m without an adapter."""
    adapter: list[str] = field(default_factory=list)
    """Adapter folder(s) to apply; repeat the option to activate several (their updates add up)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto (bf16 on capable GPUs, fp32 on CPU), float32, bfloat16 or float16."""
    ignore_base_mismatch: bool = False
    """Load adapters even when their base-model fingerprint differs (experts only)."""


def recorded_base_model(adapter: str, where: str) -> str:
    """The base model an adapter folder names: lorakit.json's base_model (or its training model), else
    PEFT's base_model_name_or_path; a ConfigError that asks for --model when it names none."""
    from ..lora.files import read_meta

    config_path = Path(adapter) / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{config_path} not found: an adapter folder holds adapter_config.json and "
                           "adapter_model.safetensors"], where=where) from None
    except json.JSONDecodeError as e:
        raise ConfigError([f"{config_path}: not valid JSON ({e})"], where=where) from None
    meta = read_meta(adapter)
    name = meta.get("base_model") or (meta.get("training") or {}).get("model") or config.get("base_model_name_or_path")
    if not name:
        raise ConfigError([f"{adapter} does not record which base model it was trained on; pass --model"], where=where)
    return name


def recorded_task(adapter: str) -> Optional[str]:
    """The task an adapter was trained for: lorakit.json's training task, else PEFT's task_type; None if
    neither says."""
    from .. import LoraConfig
    from ..lora.files import read_meta
    from ..models import normalize_task

    task = (read_meta(adapter).get("training") or {}).get("task") or LoraConfig.from_pretrained(adapter).task_type
    return normalize_task(task) if task else None


def load_with_adapters(opts: ModelOptions, task: Optional[str] = None, where: str = "--adapter"):
    """(model, tokenizer): the base with every --adapter loaded and active (or the plain base).

    The base model is --model, else the one the first adapter names; the task is `task`, else the first
    adapter's, else causal-lm. A classifier's head is sized by the label set the adapter was trained with
    (lorakit.json), so its trained head loads into it."""
    from .. import PeftModel
    from ..data.new_tokens import adapter_tokenizer
    from ..lora.files import read_meta
    from ..models import DEFAULT_MODEL, load_model

    first = opts.adapter[0] if opts.adapter else None
    base = opts.model or (recorded_base_model(first, where) if first else DEFAULT_MODEL)
    task = task or (recorded_task(first) if first else None) or "causal-lm"
    labels = read_meta(first).get("labels") if first and task != "causal-lm" else None
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels))} if labels else {}
    loaded = load_model(base, task=task, device=opts.device, dtype=opts.dtype, **head)
    model = loaded.model
    tokenizer = adapter_tokenizer(model, loaded.tokenizer, first) if first else loaded.tokenizer  # (added tokens)
    for i, path in enumerate(opts.adapter):
        name = f"adapter{i}" if i else "default"
        if i == 0:
            model = PeftModel.from_pretrained(model, path, ignore_base_mismatch=opts.ignore_base_mismatch)
        else:
            model.load_adapter(path, adapter_name=name, ignore_base_mismatch=opts.ignore_base_mismatch)
    if len(opts.adapter) > 1:
        model.set_adapter(["default"] + [f"adapter{i}" for i in range(1, len(opts.adapter))], inference_mode=True)
    return model, tokenizer


# ---------------------------------------------------------------------- generate / chat
@dataclass
class GenerateOptions(ModelOptions):
    prompt: list[str] = field(default_factory=list)
    """Prompt(s) to complete; repeat for several. Also accepted as positional arguments."""
    max_new_tokens: int = 128
    """Most tokens generated per prompt."""
    chat: bool = True
    """Wrap each prompt as a user turn in the tokenizer's chat template."""

    def validate(self) -> "GenerateOptions":
        if self.max_new_tokens < 1:
            raise ConfigError([f"--max-new-tokens must be at least 1, got {self.max_new_tokens}"],
                              where="generate options")
        return self


def _generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt(s) to complete")
    add_options(parser, GenerateOptions)


@command("generate", "generate text from a base model plus adapter(s), greedy, chat template applied")(_generate_options)
def _generate(args: argparse.Namespace) -> None:
    from ..evaluate import chat_prompts, generate_texts

    opts = build_config(GenerateOptions, args)
    prompts = list(opts.prompt) + list(args.prompts)
    if not prompts:
        raise ConfigError(["give at least one prompt (positional or --prompt)"], where="generate")
    model, tokenizer = load_with_adapters(opts, task="causal-lm")
    rendered = chat_prompts(tokenizer, prompts) if opts.chat else prompts
    for prompt, text in zip(prompts, generate_texts(model, tokenizer, rendered, opts.max_new_tokens)):
        print(f">>> {prompt}\n{text}\n")


@command("chat", "chat with a base model plus adapter(s) in the terminal: line editing and history, "
         "/help lists the commands, /exit or Ctrl-D leaves")(
    lambda p: add_options(p, GenerateOptions, skip=("prompt", "chat")))
def _chat(args: argparse.Namespace) -> None:
    from .chat import chat

    chat(build_config(GenerateOptions, args, skip=("prompt", "chat")))


# ---------------------------------------------------------------------- merge
@dataclass
class MergeOptions(ModelOptions):
    out: str = "merged"
    """Folder to write the merged model (and tokenizer) to."""
    safe_merge: bool = True
    """Check the merged weights for NaN/inf before writing them."""


@command("merge", "merge base + adapter(s) into a plain transformers model folder")(
    lambda p: add_options(p, MergeOptions))
def _merge(args: argparse.Namespace) -> None:
    from ..atomic import atomic_directory

    opts = build_config(MergeOptions, args)
    if not opts.adapter:
        raise ConfigError(["--adapter is required: the adapter folder to merge"], where="merge")
    model, tokenizer = load_with_adapters(opts, where="merge")
    merged = model.merge_and_unload(safe_merge=opts.safe_merge)
    with atomic_directory(opts.out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model written to {opts.out} (loads with transformers' from_pretrained)")


# ---------------------------------------------------------------------- inspect
@dataclass
class InspectOptions:
    model: str = "smollm2-135m"
    """Model to inspect (also accepted as the positional MODEL)."""
    ranks: str = "4,8,16,32,64"
    """Comma-separated ranks for the trainable-parameter table."""
    json: bool = False
    """Print the same facts as JSON."""


def _inspect_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_pos", nargs="?", metavar="MODEL", help="model to inspect")
    add_options(parser, InspectOptions)


@command("inspect", "the model's modules, its default LoRA targets and trainable-parameter counts by rank")(
    _inspect_options)
def _inspect(args: argparse.Namespace) -> None:
    from .inspect import run_inspect

    if args.model_pos:
        args.model = args.model_pos
    opts = build_config(InspectOptions, args)
    try:
        ranks = [int(r) for r in opts.ranks.split(",")]
    except ValueError:
        raise ConfigError([f"--ranks must be integers separated by commas, got {opts.ranks!r}"]) from None
    run_inspect(opts.model, ranks, opts.json)
