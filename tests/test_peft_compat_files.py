"""What PEFT's save_pretrained / push_to_hub leave behind, from lorakit (issue 23): the README.md model card with the
front matter the Hub reads, an existing card kept, and push_to_hub uploading that folder (offline: a clear error)."""
from __future__ import annotations

import re

import pytest
import yaml
from torch import nn

import lorakit
from lorakit import LoraConfig, ModelLoadError, get_peft_model

from .conftest import tiny_llama


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 2)

    def forward(self, x):
        return self.lin1(self.lin0(x))


def _front_matter(text: str) -> dict:
    return yaml.safe_load(re.search(r"---\n(.*?)\n---", text, re.DOTALL).group(1))


def test_save_writes_a_model_card_the_hub_reads(tmp_path):
    base = tiny_llama()
    base.config._name_or_path = "org/tiny-llama"
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/tiny-llama"
    assert {"lora", "transformers", "base_model:adapter:org/tiny-llama"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"
    assert "`q_proj`, `v_proj`" in card and f"- lorakit {lorakit.__version__}" in card and len(card) > 1000


def test_custom_model_card_has_no_base_model_and_an_existing_card_is_kept(tmp_path):
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    (tmp_path / "README.md").write_text("---\nmeta: hello\ntags:\n- mine\n---\nThis is a model card\n")
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # twice: nothing is added twice
    card = (tmp_path / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["meta"] == "hello" and meta["library_name"] == "peft" and "base_model" not in meta
    assert meta["tags"] == ["lora", "mine"]
    assert "This is a model card" in card and card.count(f"- lorakit {lorakit.__version__}") == 1


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["repo"] = (repo_id, kw.get("private"))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        from pathlib import Path

        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["upload"] = (repo_id, kw.get("commit_message"))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    assert model.push_to_hub("me/adapter", private=True, commit_message="first") == "commit-info"
    assert calls["repo"] == ("me/adapter", True) and calls["upload"] == ("me/adapter", "first")
    assert calls["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "lorakit.json"]


def test_push_to_hub_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ModelLoadError, match=r"cannot be reached.*save_pretrained"):
        model.push_to_hub("me/adapter")
