"""The real embedded models, end to end: SmolLM2-135M (GGUF, converted once) and all-MiniLM-L6-v2.

Slow (the GGUF conversion takes ~20-30 s once per test session) but part of the normal test run.
The conversion goes into a temporary LORAKIT_CACHE, so the user's cache is neither used nor touched.
"""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from lorakit.models import EMBEDDED_MODELS, gguf_cache, gguf_cache_folder, load_model
from lorakit.models.embedded import embedded_path

pytestmark = pytest.mark.slow


def _require(name: str) -> None:
    entry = EMBEDDED_MODELS[name]
    if importlib.util.find_spec(entry.module) is None:
        pytest.skip(f"{entry.package} is not installed ({entry.install_hint})")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The first load of smollm2-135m into an empty cache: (cache root, seconds, LoadedModel)."""
    _require("smollm2-135m")
    root = tmp_path_factory.mktemp("lorakit-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(root))
        start = time.perf_counter()
        loaded = load_model("smollm2-135m", device="cpu", dtype="fp32")
        seconds = time.perf_counter() - start
    return root, seconds, loaded


@pytest.fixture
def smollm2_cache(smollm2, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(smollm2[0]))
    return smollm2[0]


def test_smollm2_cache_folder(smollm2, smollm2_cache):
    folder = gguf_cache_folder(embedded_path(EMBEDDED_MODELS["smollm2-135m"]))
    assert folder.parent == smollm2_cache / "gguf"
    assert smollm2[2].source == str(folder)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            gguf_cache.MARKER_FILE} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # plain weights: loading never dequantizes again
    assert json.loads((folder / gguf_cache.MARKER_FILE).read_text())["dtype"] == "float32"


def test_smollm2_second_load_reads_the_cache(smollm2, smollm2_cache, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(gguf_cache, "convert_gguf", no_conversion)
    start = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu", dtype="bf16")
    seconds = time.perf_counter() - start
    print(f"\nsmollm2-135m: first load {smollm2[1]:.1f} s (GGUF conversion), cached load {seconds:.1f} s")
    assert seconds < smollm2[1]
    assert loaded.dtype is torch.bfloat16 and next(loaded.model.parameters()).dtype is torch.bfloat16
    first = smollm2[2].model.get_input_embeddings().weight
    assert torch.equal(loaded.model.get_input_embeddings().weight, first.to(torch.bfloat16))


def test_smollm2_tokenizer_keeps_chat_template_and_specials(smollm2):
    loaded = smollm2[2]
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    assert loaded.model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == loaded.model.config.max_position_embeddings
    assert loaded.name == "smollm2-135m" and loaded.model.name_or_path == "smollm2-135m"


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2[2].model, smollm2[2].tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.fixture(scope="module")
def minilm():
    _require("minilm-l6")
    return load_model("minilm-l6", task="feature-extraction", device="cpu")


def _embed(loaded, sentences):
    batch = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state  # (batch, seq, 384)
    mask = batch["attention_mask"].unsqueeze(-1)  # (batch, seq, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # (batch, 384): sentence-transformers mean pooling
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_feature_extraction_embeds_meaning(minilm):
    assert type(minilm.model).__name__ == "BertModel"
    a, b, c = _embed(minilm, ["A man is playing a guitar.", "Someone plays the guitar.",
                              "The stock market fell sharply today."])
    assert a.shape == (384,)
    assert a @ b > a @ c + 0.3  # pretrained weights, not random ones


def test_minilm_seq_cls_keeps_the_encoder(minilm, caplog):
    with caplog.at_level("INFO", logger="lorakit.models"):
        loaded = load_model("minilm-l6", task="seq-cls", num_labels=2, device="cpu")
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert "LOAD REPORT" not in caplog.text
    assert "new BertForSequenceClassification head initialised" in caplog.text
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id
    encoder = dict(minilm.model.named_parameters())
    for name, param in loaded.model.bert.named_parameters():
        assert torch.equal(param, encoder[name]), name
    batch = loaded.tokenizer(["good", "a much longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape == (2, 2)
