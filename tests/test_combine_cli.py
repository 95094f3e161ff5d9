"""`lorakit combine` writes a PEFT-format adapter equal to the requested combination, and
`lorakit generate --adapter A --adapter B` runs with both adapters active (their updates summed)."""
from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli.main import main
from tests.conftest import assert_close
from tests.test_serve import make_adapter, make_tiny_base


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    base = make_tiny_base(root / "base")
    return base, make_adapter(base, root / "a", 1), make_adapter(base, root / "b", 2, r=8), root


def _load(base, *adapters):
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="x0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"x{i}")
    return model


def _q_proj(model):
    return model.get_base_model().model.layers[1].self_attn.q_proj


def test_cat_is_the_exact_weighted_sum_and_loads_in_peft(folders, tmp_path):
    base, a, b, _ = folders
    out = tmp_path / "cat"
    main(["combine", f"{a}=0.6", f"{b}=0.4", "--method", "cat", "--out", str(out), "--device", "cpu"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                 "lorakit.json"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 12  # 4 + 8 stacked
    sources = _load(base, a, b)
    expected = 0.6 * _q_proj(sources).delta_weight("x0") + 0.4 * _q_proj(sources).delta_weight("x1")
    combined = _load(base, out)
    assert_close(_q_proj(combined).delta_weight("x0"), expected)
    meta = json.loads((out / "lorakit.json").read_text())
    assert meta["combination_type"] == "cat" and sorted(meta["combined_from"].values()) == [0.4, 0.6]

    from peft import PeftModel as PeftPeftModel
    from transformers import AutoModelForCausalLM

    x = torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    peft_model = PeftPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
    with torch.no_grad():
        assert_close(combined.eval()(input_ids=x).logits, peft_model(input_ids=x).logits)


@pytest.mark.parametrize("method,extra", [("linear", []), ("svd", []), ("ties", ["--density", "0.5"]),
                                          ("dare_ties", ["--density", "0.5"])])
def test_each_method_writes_a_loadable_adapter(folders, tmp_path, method, extra):
    base, a, _, root = folders
    a2 = make_adapter(base, root / f"a2-{method}", 5)  # linear/ties/dare combine factors: equal ranks
    out = tmp_path / method
    main(["combine", f"{a}=0.7", f"{a2}=0.3", "--method", method, "--out", str(out), "--device", "cpu", *extra])
    model = _load(base, out)
    delta = _q_proj(model).delta_weight("x0")
    assert torch.isfinite(delta).all() and delta.abs().max() > 0
    if method == "svd":  # rank-4 truncation of 0.7 ΔA + 0.3 ΔA2 (rank <= 8)
        sources = _load(base, a, a2)
        full = 0.7 * _q_proj(sources).delta_weight("x0") + 0.3 * _q_proj(sources).delta_weight("x1")
        assert (delta - full).norm() < full.norm()


def test_combine_reports_bad_arguments(folders, tmp_path, capsys):
    base, a, b, _ = folders
    for argv in (["combine", str(a), f"{b}=0.5"], ["combine", f"{a}=0.5"], ["combine", f"{a}=x", f"{b}=1"],
                 ["combine", f"{a}=1", f"{b}=1", "--method", "average"],
                 ["combine", f"{a}=1", f"{tmp_path}=1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--out", str(tmp_path / "never")])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "FOLDER=WEIGHT" in err and "not an adapter folder" in err and "--method must be one of" in err
    assert not (tmp_path / "never").exists()
    before = (a / "adapter_model.safetensors").read_bytes()
    for argv, reason in ((["combine", f"{a}=1", f"{b}=1", "--out", str(a)], f"would replace the source adapter {a}"),
                         (["combine", f"{a}=1", f"{b}=1", "--method", "ties", "--out", str(tmp_path / "never")],
                          f"needs adapters of equal rank, got {{'{a}': 4, '{b}': 8}}; use 'cat', 'svd' or 'ties_svd'")):
        with pytest.raises(SystemExit):
            main(argv)
        assert reason in capsys.readouterr().err
    assert (a / "adapter_model.safetensors").read_bytes() == before


def test_generate_with_two_adapters_sums_them(folders, capsys):
    from lorakit.cli.commands import GenerateOptions, load_with_adapters
    from lorakit.evaluate import generate_texts

    base, a, b, _ = folders
    model, tok = load_with_adapters(GenerateOptions(model=str(base), adapter=[str(a), str(b)], device="cpu"))
    assert model.active_adapters == ["default", "adapter1"]
    x = torch.randint(1, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = model(input_ids=x).logits
        model.merge_adapter()
        assert_close(model(input_ids=x).logits, both)
        model.unmerge_adapter()
        model.set_adapter("default")
        assert (model(input_ids=x).logits - both).abs().max() > 1e-3
        model.set_adapter(["default", "adapter1"])
    expected = generate_texts(model, tok, ["Say hello."], max_new_tokens=6)[0]
    main(["generate", "--model", str(base), "--adapter", str(a), "--adapter", str(b), "--max-new-tokens", "6",
          "--no-chat", "--device", "cpu", "Say hello."])
    assert capsys.readouterr().out.strip() == f">>> Say hello.\n{expected}".strip()


def test_generation_leaves_out_token_type_ids():
    """A tokenizer that also returns token_type_ids (BERT-style) still generates with a causal LM, which
    refuses them."""
    from transformers import PreTrainedTokenizerFast

    from lorakit.evaluate import generate_texts
    from tests.test_models_fixtures import tiny_llama_model, tiny_tokenizer

    plain = tiny_tokenizer()
    with_types = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer, unk_token="<unk>",
                                         bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                         model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    assert "token_type_ids" in with_types(["the cat"])
    model = tiny_llama_model()
    texts = generate_texts(model, with_types, ["the cat sat", "a dog"], max_new_tokens=4)
    plain.pad_token = "</s>"
    assert texts == generate_texts(model, plain, ["the cat sat", "a dog"], max_new_tokens=4)
