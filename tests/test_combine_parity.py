"""add_weighted_adapter parity with PEFT: the combined update scaling · B @ A, layer by layer."""
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorakit  # noqa: E402

NEG = [0.7, -0.4]


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=128, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same two adapters ('default', 'b') in PEFT and in lorakit."""
    torch.set_num_threads(1)
    p = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    p.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    _randomise(p, 11)
    p.base_model.set_adapter(["b"])
    _randomise(p, 12)
    p.base_model.set_adapter(["default"])
    d = tmp_path_factory.mktemp("combine_parity")
    p.save_pretrained(d)
    l = lorakit.PeftModel.from_pretrained(_llama(), str(d), is_trainable=True)
    l.load_adapter(str(d / "b"), "b", is_trainable=True)
    return p, l


def _deltas(model, name):
    out = {}
    for n, mod in model.named_modules():
        if hasattr(mod, "lora_A") and isinstance(getattr(mod, "r", None), dict) and name in mod.r:
            A, B = mod.lora_A[name].weight.detach().float(), mod.lora_B[name].weight.detach().float()
            out[n.split("model.")[-1]] = mod.scaling[name] * (B @ A)
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _combine(model, new, adapters, weights, ctype, **kw):
    torch.manual_seed(123)
    model.add_weighted_adapter(adapters, weights, new, combination_type=ctype, **kw)
    return _deltas(model, new)


def _worst(models, new, adapters, weights, ctype, **kw):
    p, l = models
    ref, got = _combine(p, new, adapters, weights, ctype, **kw), _combine(l, new, adapters, weights, ctype, **kw)
    assert ref.keys() == got.keys() and ref
    return max(_rel(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("ctype,density", [("ties", 0.5), ("magnitude_prune", 0.5),
                                           ("dare_linear", 1.0), ("dare_ties", 1.0), ("ties", 1.0)])
def test_negative_weight_sign_on_A_matches_peft(models, ctype, density):
    assert _worst(models, f"neg_{ctype}_{int(density * 10)}", ["default", "b"], NEG, ctype, density=density) < 1e-5


def test_dare_linear_full_density_equals_linear(models):
    _, l = models
    dare = _combine(l, "dl_full", ["default", "b"], NEG, "dare_linear", density=1.0)
    lin = _combine(l, "lin_ref", ["default", "b"], NEG, "linear")
    assert max(_rel(dare[k], lin[k]) for k in lin) < 1e-5


def test_svd_clamp_uses_signed_quantile_like_peft(models):
    assert _worst(models, "svd_clamp", ["default", "b"], [0.7, 0.4], "svd", svd_clamp=0.9) < 1e-5


@pytest.mark.parametrize("ctype,kw", [("ties", {"density": 0.5}), ("svd", {"svd_rank": 2})])
def test_single_adapter_falls_back_to_linear(models, ctype, kw):
    assert _worst(models, f"single_{ctype}", ["b"], [0.5], ctype, **kw) < 1e-5


@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_masks_match_peft_for_the_same_seed(models, ctype):
    """The same seed gives PEFT's random masks: the new adapter's layers are all made (their inits draw from
    the generator) before any mask is drawn, layer by layer in module order."""
    kw = {"density": 0.5, **({"svd_rank": 4} if ctype.endswith("svd") else {})}
    assert _worst(models, f"dare_seed_{ctype}", ["default", "b"], [0.7, 0.4], ctype, **kw) < 1e-5


def test_unequal_ranks_are_refused_before_any_layer_changes():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                rank_pattern={"layers.1.self_attn.v_proj": 2}))
    model.add_adapter("b", lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="equal rank"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="ties", density=0.5)
    assert not [n for n, m in model.named_modules() if "mix" in getattr(m, "r", {})]


@pytest.mark.parametrize("ctype", ["svd", "ties_svd", "dare_linear_svd"])
def test_svd_methods_give_every_layer_the_largest_configured_rank_as_peft(tmp_path, ctype):
    """Adapters of rank 4 (q_proj) and 2 (k_proj): PEFT makes every layer of the result rank 4, k_proj too."""
    p = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    p.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
    _randomise(p, 11)
    p.base_model.set_adapter(["b"])
    _randomise(p, 12)
    p.save_pretrained(tmp_path)
    l = lorakit.PeftModel.from_pretrained(_llama(), str(tmp_path), is_trainable=True)
    l.load_adapter(str(tmp_path / "b"), "b", is_trainable=True)
    kw = {"density": 0.5} if ctype != "svd" else {}
    ref, got = (_combine(m, "mix", ["default", "b"], [0.7, 0.4], ctype, **kw) for m in (p, l))
    assert ref.keys() == got.keys() and max(_rel(got[k], ref[k]) for k in ref) < 1e-5
    assert {m.r["mix"] for m in l.modules() if "mix" in getattr(m, "r", {})} == {4}
