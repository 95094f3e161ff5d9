"""Rank analysis and resizing: spectra from the factors, truncation of known low-rank updates, PEFT loading of
resized adapters (rank_pattern / alpha_pattern), and the rank / resize / info commands."""
import json

import pytest
import torch

import lorakit
from lorakit.cli.main import main
from lorakit.lora.inject import lora_layers
from lorakit.lora.spectrum import (adapter_spectra, effective_rank, energy_kept, factor_svd, rank_report,
                                   read_adapter, resize_adapter, truncate_factors)
from tests.conftest import ToyNet, rel_err, tiny_llama

LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _ids():
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def _set_true_ranks(model, true_rank: dict, seed: int = 0) -> None:
    """Give every LoRA layer an update B A of a known rank: A = M (r, k) @ N (k, in), B random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            A, B = layer.factor_matrices("default")  # (r, in), (out, r) views of the parameters
            k = true_rank.get(name.rsplit(".", 1)[-1], A.shape[0])
            A.copy_(torch.randn(A.shape[0], k, generator=g) @ torch.randn(k, A.shape[1], generator=g) * 0.1)
            B.copy_(torch.randn(B.shape, generator=g) * 0.1)


def _low_rank_llama(folder, true_rank: dict, **config):
    """Save a tiny-llama adapter whose per-layer-type updates have the given true ranks; returns its logits."""
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(
        **{"r": 16, "lora_alpha": 32, "target_modules": LLAMA_TARGETS, "task_type": "CAUSAL_LM", **config}))
    _set_true_ranks(model, true_rank)
    model.save_pretrained(folder)
    logits = model.eval()(input_ids=_ids()).logits
    with model.disable_adapter():
        assert rel_err(model(input_ids=_ids()).logits, logits) > 1e-2  # the update matters: no vacuous test
    return logits


@pytest.fixture(scope="module")
def rank4(tmp_path_factory):
    """(folder, logits): an r=16 adapter whose every update has true rank 4."""
    folder = tmp_path_factory.mktemp("rank4") / "adapter"
    return folder, _low_rank_llama(folder, {k: 4 for k in LLAMA_TARGETS})


# ---------------------------------------------------------------------- the math
@pytest.mark.parametrize("out_f,in_f,r", [(40, 24, 6), (5, 30, 8), (30, 3, 8)])
def test_factor_svd_equals_svd_of_the_full_update(out_f, in_f, r):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    delta = 0.5 * (B.double() @ A.double())  # (out, in): formed here only to check
    U, S, Vh = factor_svd(A, B, 0.5)
    assert S.numel() == min(out_f, in_f, r)
    assert torch.allclose(S, torch.linalg.svdvals(delta)[:S.numel()], rtol=1e-10, atol=1e-10)
    assert rel_err(U @ torch.diag(S) @ Vh, delta) < 1e-12
    assert torch.allclose(U.T @ U, torch.eye(S.numel(), dtype=torch.float64), atol=1e-10)


def test_effective_rank_and_energy_kept():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14: 64%, 93%, 100%
    assert [effective_rank(S, p) for p in (0.5, 0.9, 0.95, 0.99, 1.0)] == [1, 2, 3, 3, 3]
    assert energy_kept(S, 2) == pytest.approx(13 / 14)
    assert effective_rank(torch.zeros(4), 0.99) == 0 and energy_kept(torch.zeros(4), 1) == 1.0


def test_suggestions_total_energy_versus_every_layer():
    from lorakit.lora.spectrum import LayerSpectrum

    f64 = torch.float64
    big = LayerSpectrum("l.0.q_proj", "q_proj", 4, 1.0, (8, 8), torch.tensor([10.0, 0.0, 0.0, 0.0], dtype=f64))
    small = LayerSpectrum("l.0.v_proj", "v_proj", 4, 1.0, (8, 8), torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=f64))
    report = rank_report([big, small], energy=0.99)
    assert report["suggested_rank"] == 2  # 100 + 2 of 103 at rank 2 is 99.03%; 100 + 1 at rank 1 is 98.1%
    assert report["suggested_rank_every_layer"] == 3 and report["suggested_ranks"] == {"l.0.q_proj": 1, "l.0.v_proj": 3}
    assert report["min_layer_energy_kept_at_suggested_rank"] == pytest.approx(2 / 3)
    assert report["lora_params_at_suggested_ranks"] == (1 + 3) * 16


def test_truncation_of_a_known_low_rank_product_is_exact_under_a_new_scaling():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(8, 3, generator=g) @ torch.randn(3, 20, generator=g)  # (8, 20), rank 3
    B = torch.randn(12, 8, generator=g)
    delta = 2.0 * (B.double() @ A.double())
    A3, B3 = truncate_factors(A, B, 2.0, 3, new_scaling=0.75)
    assert A3.shape == (3, 20) and B3.shape == (12, 3) and A3.dtype == A.dtype
    assert rel_err(0.75 * B3.double() @ A3.double(), delta) < 1e-6
    # below the true rank: the best rank-2 approximation (Eckart-Young), from the full SVD
    A2, B2 = truncate_factors(A, B, 2.0, 2, new_scaling=2.0)
    U, S, Vh = torch.linalg.svd(delta)
    assert rel_err(2.0 * B2.double() @ A2.double(), U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]) < 1e-6


def _toy():
    torch.manual_seed(0)
    return ToyNet()


def test_conv_and_embedding_layers_resize_too(toy_inputs, tmp_path):
    config = lorakit.LoraConfig(r=6, lora_alpha=6, target_modules=["emb", "conv", "conv1d", "fc1"])
    model = lorakit.get_peft_model(_toy(), config)
    _set_true_ranks(model, {"emb": 2, "conv": 2, "conv1d": 2, "fc1": 2})
    expected = model(*toy_inputs)
    model.save_pretrained(tmp_path / "a")
    resize_adapter(tmp_path / "a", tmp_path / "b", rank=2)
    _, tensors = read_adapter(tmp_path / "b")
    prefix = "base_model.model."
    assert tensors[prefix + "conv.lora_A.weight"].shape == (2, 3, 3, 3)  # (k, in, kh, kw)
    assert tensors[prefix + "conv.lora_B.weight"].shape == (6, 2, 1, 1)  # (out, k, 1, 1)
    assert tensors[prefix + "emb.lora_embedding_A"].shape == (2, 20)  # (k, num_embeddings)
    assert tensors[prefix + "emb.lora_embedding_B"].shape == (8, 2)  # (dim, k)
    resized = lorakit.PeftModel.from_pretrained(_toy(), tmp_path / "b")
    assert rel_err(resized(*toy_inputs), expected) < 1e-5
    with model.disable_adapter():
        assert rel_err(model(*toy_inputs), expected) > 1e-2


# ---------------------------------------------------------------------- the acceptance case
def test_r16_update_of_true_rank_4_is_suggested_and_resized_to_rank_4(rank4, tmp_path):
    folder, expected = rank4
    config_dict, tensors = read_adapter(folder)
    report = rank_report(adapter_spectra(lorakit.LoraConfig.from_dict(config_dict), tensors))
    assert report["suggested_rank"] == report["suggested_rank_every_layer"] == 4 and report["r"] == 16
    assert set(report["suggested_ranks"].values()) == {4}
    assert all(layer["effective_rank"]["0.99"] <= 4 for layer in report["layers"])
    result = resize_adapter(folder, tmp_path / "r4", rank=4)
    assert result.config["r"] == 4 and result.config["lora_alpha"] == 8 and not result.config["rank_pattern"]
    resized = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "r4").eval()
    assert rel_err(resized(input_ids=_ids()).logits, expected) < 1e-4
    weights = "adapter_model.safetensors"
    assert (tmp_path / "r4" / weights).stat().st_size < 0.4 * (folder / weights).stat().st_size
    meta = json.loads((tmp_path / "r4" / "lorakit.json").read_text())
    assert meta["base_fingerprint"] and meta["resizes"][-1]["r_after"] == 4


@pytest.mark.parametrize("rslora", [False, True])
def test_per_layer_ranks_round_trip_through_peft(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    expected = _low_rank_llama(tmp_path / "a", {"q_proj": 2, "v_proj": 3, "up_proj": 5, "down_proj": 5},
                               use_rslora=rslora)
    result = resize_adapter(tmp_path / "a", tmp_path / "b", energy=0.9999)
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["r"] == 5 and set(config["rank_pattern"].values()) == {2, 3} and len(config["rank_pattern"]) == 4
    # every layer keeps its scaling (alpha / r, or alpha / sqrt r), so the smaller ranks get their own alphas
    assert set(config["alpha_pattern"]) == set(config["rank_pattern"])
    for module, k in config["rank_pattern"].items():
        scaling = config["alpha_pattern"][module] / (k ** 0.5 if rslora else k)
        assert scaling == pytest.approx(32 / (4 if rslora else 16))
    ours = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()
    for name, module in theirs.named_modules():
        if name.endswith("q_proj") and hasattr(module, "lora_A"):
            assert module.lora_A["default"].weight.shape[0] == 2
    logits = theirs(input_ids=_ids()).logits
    assert rel_err(logits, ours(input_ids=_ids()).logits) < 1e-5
    assert rel_err(logits, expected) < 1e-4
    assert result.params_after < 0.4 * result.params_before


def test_heads_and_dora_magnitudes_are_copied_unchanged(tmp_path):
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                                use_dora=True)
    model = lorakit.get_peft_model(tiny_llama("seq_cls"), config)
    _set_true_ranks(model, {"q_proj": 2, "v_proj": 2})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:  # the score head's trainable copy
                p.add_(0.1)
    expected = model.eval()(input_ids=_ids()).logits
    model.save_pretrained(tmp_path / "a")
    resize_adapter(tmp_path / "a", tmp_path / "b", rank=2)
    _, before = read_adapter(tmp_path / "a")
    _, after = read_adapter(tmp_path / "b")
    others = [k for k in before if ".lora_A." not in k and ".lora_B." not in k]
    assert any("score" in k for k in others) and any("magnitude" in k for k in others)
    assert all(torch.equal(before[k], after[k]) for k in others)
    resized = lorakit.PeftModel.from_pretrained(tiny_llama("seq_cls"), tmp_path / "b").eval()
    assert rel_err(resized(input_ids=_ids()).logits, expected) < 1e-4


# ---------------------------------------------------------------------- the commands
def test_rank_command_table_json_and_plot(rank4, tmp_path, capsys):
    folder, _ = rank4
    main(["rank", str(folder), "--plot", str(tmp_path / "spectrum.png")])
    text = capsys.readouterr().out
    assert "suggested rank: 4 (of r=16)" in text and "model.layers.1.mlp.down_proj" in text
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["rank", str(folder), "--json", "--energy", "0.9"])
    report = json.loads(capsys.readouterr().out)
    assert report["suggested_rank"] <= 4 and report["energy"] == 0.9
    assert len(report["layers"]) == 8 and len(report["layers"][0]["singular_values"]) == 16
    assert set(report["by_kind"]) == set(LLAMA_TARGETS)
    kept = {row["rank"]: row["energy_kept"] for row in report["uniform_ranks"]}
    assert kept[3] < 0.999 and kept[4] == pytest.approx(1.0, abs=1e-9) and len(kept) == 16


def test_resize_and_info_commands(rank4, tmp_path, capsys):
    folder, _ = rank4
    main(["resize", str(folder), "--rank", "4", "--out", str(tmp_path / "small"), "--json"])
    facts = json.loads(capsys.readouterr().out)
    assert facts["r_before"] == 16 and facts["r_after"] == 4 and facts["bytes_after"] < 0.4 * facts["bytes_before"]
    main(["info", str(tmp_path / "small")])
    text = capsys.readouterr().out
    assert "4 / 8 / 2" in text and "llama / LlamaForCausalLM" in text and "resized from" in text
    main(["info", str(folder), "--json"])
    info = json.loads(capsys.readouterr().out)
    per_layer = 16 * ((32 + 32) + (32 + 16) + (32 + 64) + (64 + 32))
    assert info["r"] == 16 and info["lora_params"] == 2 * per_layer == info["params"]
    assert info["adapted_layers"] == 8 and info["versions"]["lorakit"] == lorakit.__version__
    assert info["size_bytes"] == sum(f.stat().st_size for f in folder.iterdir())


def test_info_on_a_peft_adapter_without_lorakit_json(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama("seq_cls"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    main(["info", str(tmp_path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert not info["has_lorakit_json"] and info["base_fingerprint"] is None
    assert info["lora_params"] == 2 * 4 * (32 + 32) and info["other_params"] > 0  # the score head
    main(["info", str(tmp_path)])
    assert "no lorakit.json" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["resize", "{a}", "--rank", "2", "--energy", "0.9", "--out", "{t}/x"], "exactly one of rank"),
    (["resize", "{a}", "--energy", "1.5", "--out", "{t}/x"], "energy must be in (0, 1]"),
    (["resize", "{a}", "--rank", "2", "--out", "{a}"], "is the adapter being resized"),
    (["resize", "{a}", "--rank", "2"], "--out is required"),
    (["rank", "{t}"], "adapter_config.json not found"),
    (["info"], "give the adapter folder"),
])
def test_clear_errors(rank4, tmp_path, capsys, argv, message):
    folder, _ = rank4
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(a=folder, t=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_write_rank_report_for_a_training_run(rank4, tmp_path):
    from lorakit.cli.adapters import write_rank_report

    folder, _ = rank4
    path = write_rank_report(folder, tmp_path)
    assert path == tmp_path / "rank_report.json"
    assert json.loads(path.read_text())["suggested_rank"] == 4
    assert (tmp_path / "rank_spectrum.png").stat().st_size > 1000


def test_resize_with_data_reports_the_score_change(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_data_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                        pad_token_id=tok.pad_token_id))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _set_true_ranks(model, {"q_proj": 3, "v_proj": 3})
    model.save_pretrained(tmp_path / "a")
    rows = [{"messages": [{"role": "user", "content": "what is the code"},
                          {"role": "assistant", "content": "the code is blue"}]}] * 4
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    main(["resize", str(tmp_path / "a"), "--rank", "3", "--out", str(tmp_path / "b"), "--data",
          str(tmp_path / "d.jsonl"), "--model", str(tmp_path / "base"), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    facts = json.loads(captured.out)  # eval's tables went to stderr
    assert "resized" in captured.err
    scores = facts["eval"]
    assert abs(scores["change"]["eval_loss"]) < 1e-4
    assert scores["resized"]["eval_loss"] == pytest.approx(scores["original"]["eval_loss"], abs=1e-4)
    meta = json.loads((tmp_path / "b" / "lorakit.json").read_text())
    assert meta["resizes"][-1]["eval"]["original"]["eval_loss"] == scores["original"]["eval_loss"]


def test_pickle_adapters_only_when_allowed_and_resized_to_safetensors(rank4, tmp_path, capsys):
    from safetensors.torch import load_file

    folder, _ = rank4
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    torch.save(load_file(folder / "adapter_model.safetensors"), tmp_path / "p" / "adapter_model.bin")
    with pytest.raises(SystemExit):
        main(["info", str(tmp_path / "p")])
    assert "pickle" in capsys.readouterr().err
    main(["info", str(tmp_path / "p"), "--allow-pickle", "--json"])
    assert json.loads(capsys.readouterr().out)["lora_params"] == 16 * 2 * ((32 + 32) + (32 + 16) + 2 * (32 + 64))
    main(["resize", str(tmp_path / "p"), "--allow-pickle", "--rank", "4", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "s" / "adapter_model.bin").exists()
