"""An Ollama Modelfile for an exported GGUF: FROM, ADAPTER, TEMPLATE, SYSTEM and PARAMETER stop.

Ollama writes prompt templates in Go's text/template language, while GGUF files carry the Hugging Face Jinja
chat template. lorakit translates the ChatML family (`<|im_start|>role ... <|im_end|>`: SmolLM2, Qwen2/3 and
many fine-tunes) and carries a default system prompt that the Jinja template inserts as Ollama's SYSTEM. Any
other template is not guessed at: the Modelfile then says so in a comment, and the caller reports it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write

CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n")
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


@dataclass
class GoTemplate:
    """A chat template in Ollama's form, or why there is none."""

    template: str | None
    """The Go template, or None when the Jinja template could not be translated."""
    system: str | None
    """A default system prompt the Jinja template inserts when the conversation has none."""
    stops: list[str]
    """Stop strings the template's turns end with."""
    note: str
    """What was done: the family recognised, or why nothing was translated."""


def translate_chat_template(jinja: str | None) -> GoTemplate:
    """Translate a Hugging Face Jinja chat template into an Ollama Go template (ChatML family only)."""
    if not jinja:
        return GoTemplate(None, None, [], "the model carries no chat template; Ollama will send raw prompts")
    if "<|im_start|>" not in jinja or "<|im_end|>" not in jinja:
        return GoTemplate(None, None, [], "the chat template is not ChatML (<|im_start|> ... <|im_end|>), the only "
                          "family lorakit translates; write a TEMPLATE by hand (see Ollama's docs) from the "
                          "tokenizer.chat_template shown by `lorakit adapters info` or the GGUF metadata")
    system = None
    match = _DEFAULT_SYSTEM.search(jinja)
    if match and "!= 'system'" in jinja.replace('"', "'"):  # inserted only when no system turn is given
        system = match.group(1).replace("\\n", "\n")
    return GoTemplate(CHATML_TEMPLATE, system, ["<|im_end|>", "<|im_start|>"],
                      "ChatML template translated" + (" (its default system prompt as SYSTEM)" if system else ""))


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(model: str, template: GoTemplate, adapter: str | None = None,
                   extra_stops: tuple[str, ...] = ()) -> str:
    """The Modelfile's text. `model` is the FROM (a base GGUF or the merged file), `adapter` the LoRA GGUF."""
    lines = ["# written by `lorakit export`; create the model with: ollama create NAME -f Modelfile",
             f"FROM {model}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template.template:
        lines.append(f"TEMPLATE {_quoted(template.template)}")
    else:
        lines.append(f"# no TEMPLATE: {template.note}")
    if template.system:
        lines.append(f"SYSTEM {_quoted(template.system)}")
    for stop in dict.fromkeys([*template.stops, *extra_stops]):
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | os.PathLike, model: str, template: GoTemplate, adapter: str | None = None,
                    extra_stops: tuple[str, ...] = ()) -> Path:
    """Write the Modelfile atomically; returns its path."""
    text = modelfile_text(model, template, adapter, extra_stops)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Path(path)
