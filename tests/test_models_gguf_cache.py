"""The GGUF conversion cache: built once, keyed by the file, atomic, rebuilt when broken.

The slow dequantization is replaced by `fake_convert` (it writes a tiny Llama folder), so these
tests check the cache's mechanics in well under a second each; test_models_embedded.py runs the
real conversion once.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lorakit.models import cache_root, ensure_gguf_cache, gguf_cache_folder, load_model
from lorakit.models import gguf_cache
from tests.test_models_fixtures import fake_convert


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(root))
    return root


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    path = tmp_path / "models" / "tiny.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture
def calls(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(gguf_cache, "convert_gguf", fake_convert(calls))
    return calls


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("LORAKIT_CACHE")
    assert cache_root() == tmp_path / "xdg" / "lorakit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lorakit"


def test_converted_once_then_reused(cache, gguf_file, calls):
    folder = ensure_gguf_cache(gguf_file)
    assert folder == gguf_cache_folder(gguf_file)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny.Q4_0-")
    assert (folder / gguf_cache.MARKER_FILE).is_file()
    assert ensure_gguf_cache(gguf_file) == folder
    assert len(calls) == 1


def test_key_follows_the_file(cache, gguf_file, calls):
    first = ensure_gguf_cache(gguf_file)
    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    second = ensure_gguf_cache(gguf_file)
    assert second != first and len(calls) == 2


def test_interrupted_conversion_leaves_nothing(cache, gguf_file, monkeypatch):
    def interrupted(gguf_path, out):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_gguf_cache(gguf_file)
    leftovers = [p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    calls: list = []
    monkeypatch.setattr(gguf_cache, "convert_gguf", fake_convert(calls))
    assert gguf_cache.is_complete(ensure_gguf_cache(gguf_file))


def test_incomplete_folder_is_rebuilt(cache, gguf_file, calls):
    folder = gguf_cache_folder(gguf_file)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # no marker, no weights: not a finished cache
    assert gguf_cache.is_complete(ensure_gguf_cache(gguf_file))
    assert len(calls) == 1


def test_load_model_from_gguf_uses_the_cache(cache, gguf_file, calls):
    loaded = load_model(gguf_file, device="cpu", dtype="bf16")
    assert loaded.source == str(gguf_cache_folder(gguf_file))
    assert loaded.name == str(gguf_file.resolve())
    assert loaded.dtype is torch.bfloat16
    assert next(loaded.model.parameters()).dtype is torch.bfloat16
    again = load_model(gguf_file.parent, task="seq-cls", num_labels=2, device="cpu")
    assert type(again.model).__name__ == "LlamaForSequenceClassification"
    assert len(calls) == 1


def test_unreadable_cache_is_converted_again(cache, gguf_file, calls):
    folder = ensure_gguf_cache(gguf_file)
    (folder / "model.safetensors").write_bytes(b"corrupted")
    loaded = load_model(gguf_file, device="cpu")
    assert len(calls) == 2
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_missing_gguf_file(cache, tmp_path):
    with pytest.raises(Exception, match="GGUF file not found"):
        ensure_gguf_cache(tmp_path / "absent.gguf")


def test_unreadable_gguf_is_a_model_load_error(cache, gguf_file):
    from lorakit.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="could not read the GGUF file"):
        ensure_gguf_cache(gguf_file)  # 64 bytes of nonsense, through the real converter
    assert not gguf_cache_folder(gguf_file).exists()


def test_special_tokens_come_from_the_gguf_metadata(tmp_path):
    """transformers 5.17 reads a chat GGUF's eos as its bos; the conversion takes the ids from the file."""
    from gguf import GGUFWriter

    from tests.test_models_fixtures import tiny_llama_model, tiny_tokenizer

    path = tmp_path / "meta.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ids = gguf_cache.gguf_special_token_ids(path)
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

    tokenizer, model = tiny_tokenizer(), tiny_llama_model()
    tokenizer.eos_token = "<s>"  # as transformers 5.17 gives it
    model.config.eos_token_id = model.generation_config.eos_token_id = 1
    gguf_cache.fix_special_tokens(tokenizer, model, ids)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("</s>", "</s>", "<s>")
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.config.pad_token_id == tokenizer.pad_token_id == 2
