"""Dequantize a GGUF file once into a cached transformers folder, so later loads take seconds.

transformers reads GGUF files by dequantizing every tensor (about 20 s for SmolLM2-135M on two
CPU cores). lorakit does that once per file and saves the result as an ordinary safetensors folder:

    <cache root>/gguf/<file stem>-<key>/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        lorakit_gguf.json        # what was converted, from which file, with which versions

The key hashes the GGUF file's name, size and modification time (plus the cache format and the
transformers major version), so a replaced file gets a fresh folder. The folder is built in a
temporary sibling and renamed into place (`lorakit.atomic.atomic_directory`), so an interrupted
first load never leaves a half-written cache; a file lock keeps two processes from building at once.

Weights are cached in float32: the dequantized Q4/Q8 values (scale * q + min, with fp16 scales)
need more mantissa bits than bf16 has, so fp32 keeps them bit-identical to what transformers gives
from the GGUF itself. The dtype the user asks for is applied when the cached folder is loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import time
from pathlib import Path
from typing import Iterator

import torch

from lorakit.atomic import atomic_directory
from lorakit.errors import ModelLoadError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: special tokens taken from the GGUF's own metadata (fix_special_tokens)
MARKER_FILE = "lorakit_gguf.json"
CACHE_DTYPE = torch.float32
# transformers' "no limit" sentinel for model_max_length (int(1e30)).
_HUGE_MAX_LENGTH = int(1e29)


def cache_root() -> Path:
    """The folder lorakit caches converted models in.

    `$LORAKIT_CACHE` if set, else `$XDG_CACHE_HOME/lorakit`, else `~/.cache/lorakit`.
    """
    explicit = os.environ.get("LORAKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorakit"


def _transformers_major() -> str:
    import transformers

    return transformers.__version__.split(".")[0]


def gguf_cache_key(gguf_path: str | os.PathLike) -> str:
    """A short hex key for a GGUF file: its name, size and mtime, the cache format, transformers' major."""
    path = Path(gguf_path)
    stat = path.stat()
    text = f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}|tf{_transformers_major()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gguf_cache_folder(gguf_path: str | os.PathLike) -> Path:
    """Where the converted folder for `gguf_path` lives (whether or not it exists yet)."""
    path = Path(gguf_path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
    return cache_root() / "gguf" / f"{stem}-{gguf_cache_key(path)}"


def is_complete(folder: Path) -> bool:
    """True when `folder` is a finished cache: the marker, the config and the weights are there."""
    return ((folder / MARKER_FILE).is_file() and (folder / "config.json").is_file()
            and any(folder.glob("*.safetensors")))


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock for building `folder` (a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename still protects readers
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def fix_model_max_length(tokenizer, config) -> None:
    """Replace transformers' 'no limit' model_max_length with the model's context length."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and getattr(tokenizer, "model_max_length", 0) >= _HUGE_MAX_LENGTH:
        tokenizer.model_max_length = int(limit)


_SPECIAL_TOKENS = {"bos": "bos_token_id", "eos": "eos_token_id", "padding": "pad_token_id", "unknown": "unk_token_id"}
"""GGUF metadata `tokenizer.ggml.<key>_token_id` -> the transformers name of that id."""


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """{"bos_token_id": ..., "eos_token_id": ..., ...} as the GGUF file's own metadata gives them."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    ids = {}
    for key, name in _SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None and field.data:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def fix_special_tokens(tokenizer, model, ids: dict[str, int]) -> None:
    """Set the tokenizer's and the model's bos/eos/pad/unk tokens to the GGUF's own (`ids`, from
    gguf_special_token_ids). Some transformers versions (5.17) read a chat GGUF's eos as its bos, so
    generation would not stop at the end of a turn."""
    vocab_size = len(tokenizer)
    for name, token_id in ids.items():
        if not 0 <= token_id < vocab_size:
            continue
        setattr(tokenizer, name.removesuffix("_id"), tokenizer.convert_ids_to_tokens(token_id))
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None and name != "unk_token_id":
                setattr(config, name, token_id)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize `gguf_path` with transformers and save model + tokenizer into the folder `out`.

    Raises:
        ModelLoadError: transformers (or the `gguf` package) cannot read the file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=CACHE_DTYPE)
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF files needs the `gguf` package ({exc}); "
                             "install it with: pip install gguf") from exc
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as exc:
        raise ModelLoadError(f"transformers could not read the GGUF file {gguf_path}: {exc}\n"
                             "The file may be damaged or incomplete (compare its size with the source's), or of "
                             "an architecture transformers cannot dequantize (it reads llama, mistral, qwen2, "
                             "phi3, gemma, ...).") from exc
    # The saved folder holds plain dequantized weights: it must not ask for GGUF again on load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    fix_special_tokens(tokenizer, model, gguf_special_token_ids(gguf_path))
    fix_model_max_length(tokenizer, model.config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    stat = gguf_path.stat()
    marker = {"source": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "cache_format": CACHE_FORMAT, "dtype": str(CACHE_DTYPE).removeprefix("torch."),
              "transformers": transformers.__version__, "torch": torch.__version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # Written last: its presence marks a finished folder.
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _make_readable(folder: Path) -> None:
    """Give the cache the permissions of a normal folder (mkdtemp makes it private, 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for item in folder.iterdir():
        if item.is_file():
            os.chmod(item, 0o666 & ~umask)


def ensure_gguf_cache(gguf_path: str | os.PathLike, rebuild: bool = False) -> Path:
    """Return the cached transformers folder for a GGUF file, converting it first if needed.

    Args:
        gguf_path: the `.gguf` file.
        rebuild: convert again even if a finished cache exists (used after a failed load).

    Returns:
        The cache folder, loadable with `from_pretrained`.

    Raises:
        ModelLoadError: the file is missing or transformers cannot convert it.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    folder = gguf_cache_folder(path)
    if not rebuild and is_complete(folder):
        return folder
    with _build_lock(folder):
        if not rebuild and is_complete(folder):  # another process built it while we waited
            return folder
        logger.info("converting %s to a transformers folder (once; about 20 s for a 135M model) "
                    "-> %s", path.name, folder)
        start = time.perf_counter()
        with atomic_directory(folder) as tmp:
            convert_gguf(path, tmp)
            _make_readable(tmp)
        logger.info("GGUF conversion done in %.1f s", time.perf_counter() - start)
    return folder
