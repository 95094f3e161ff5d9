"""CorDA init (init_lora_weights='corda'): lorakit's preprocess_corda and init give PEFT's factors and residual, the
adapter starts as the base model, and the adapter files round-trip (PEFT's format)."""
import copy
import json

import pytest
import torch
from torch import nn

from lorakit import ConfigError, CordaConfig, LoraConfig, PeftModel, get_peft_model, preprocess_corda
from tests.conftest import assert_close, tiny_gpt2

peft = pytest.importorskip("peft", reason="the parity tests compare against PEFT (a test dependency, the test extra)")
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig  # noqa: E402

try:  # PEFT's corda module imports `attrs`, which PEFT itself does not install
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
except ImportError as e:
    peft_preprocess_corda, PEFT_CORDA_MISSING = None, str(e)
needs_peft_preprocess = pytest.mark.skipif(peft_preprocess_corda is None, reason="PEFT's preprocess_corda cannot be "
                                           "imported (it needs the `attrs` package): "
                                           f"{globals().get('PEFT_CORDA_MISSING')}")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(24, 16)
        self.down = nn.Linear(16, 12)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _data(seed: int = 1) -> torch.Tensor:
    return torch.randn(64, 24, generator=torch.Generator().manual_seed(seed))  # (tokens, in)


def _config(method: str = "ipm", **kw) -> LoraConfig:
    return LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights="corda",
                      corda_config=CordaConfig(corda_method=method, **kw.pop("corda", {})), **kw)


@needs_peft_preprocess
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_preprocess_leaves_peft_s_eigens(method):
    data = _data()
    ours, theirs = Mlp(), Mlp()
    config = _config(method, rank_pattern={"down": 2})
    preprocess_corda(ours, config, run_model=lambda: [ours(data), ours(data[:10])])
    peft_preprocess_corda(theirs, peft.LoraConfig(**_peft_kwargs(config)),
                          run_model=lambda: [theirs(data), theirs(data[:10])])
    for name in ("up", "down"):
        a, b = getattr(ours, name).eigens, getattr(theirs, name).eigens
        assert a.S_WC.shape == (2 if name == "down" else 4,)
        for part in ("S_WC", "U_WC", "V_WC"):
            assert_close(getattr(a, part), getattr(b, part))
        assert not any(hasattr(getattr(ours, name), f) for f in ("sample_count", "covariance_matrix", "rank"))


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_factors_and_residual_are_peft_s_on_the_same_eigens(method):
    data, base = _data(), Mlp()
    config = _config(method, lora_alpha=6, alpha_pattern={"up": 3})
    preprocess_corda(base, config, run_model=lambda: base(data))  # (the eigens travel with each copy)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_peft_kwargs(config)))
    ours = get_peft_model(copy.deepcopy(base), config)
    for name in ("up", "down"):
        mine, peft_layer = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
        assert_close(mine.lora_A["default"].weight, peft_layer.lora_A["default"].weight)
        assert_close(mine.lora_B["default"].weight, peft_layer.lora_B["default"].weight)
        assert_close(mine.base_layer.weight, peft_layer.base_layer.weight)
        assert not hasattr(mine.base_layer, "eigens")  # consumed, as in PEFT


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"rank_pattern": {"down": 2}, "alpha_pattern": {"up": 2}}])
def test_the_adapter_starts_as_the_base_model(method, extra):
    """W_residual + s B A == W: the outputs are the base model's, though W changed and B A is not zero."""
    data, model = _data(), Mlp()
    expected = model(data)
    W = model.up.weight.detach().clone()
    config = _config(method, **extra)
    preprocess_corda(model, config, run_model=lambda: model(data))
    peft_model = get_peft_model(model, config)
    assert_close(peft_model(data), expected)
    layer = peft_model.base_model.model.up
    assert (layer.base_layer.weight - W).abs().max() > 1e-3 and layer.lora_B["default"].weight.abs().max() > 0


def test_ipm_takes_the_largest_components_and_kpm_the_smallest():
    data = _data()
    S = {}
    for method in ("ipm", "kpm"):
        model = Mlp()
        preprocess_corda(model, _config(method, corda={"prune_temporary_fields": False}),
                         run_model=lambda: model(data))
        S[method] = model.up.eigens.S_WC
        assert model.up.sample_count == 1 and model.up.corda_method == method
    assert S["ipm"].min() > S["kpm"].max()


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_cache_and_covariance_files_give_the_same_eigens_without_data(method, tmp_path):
    data, model = _data(), Mlp()
    files = {"cache_file": str(tmp_path / "c" / "cache.pt"), "covariance_file": str(tmp_path / "cov.pt")}
    preprocess_corda(model, _config(method, corda=files), run_model=lambda: model(data))
    for only in ("cache_file", "covariance_file"):
        again = Mlp()
        preprocess_corda(again, _config(method, corda={only: files[only]}))  # no run_model: read from the file
        for part in ("S_WC", "U_WC", "V_WC"):
            assert_close(getattr(again.up.eigens, part), getattr(model.up.eigens, part))
    with open(files["cache_file"], "rb") as f:
        assert f.read(4) != b"PK\x03\x04"  # safetensors, not a pickle


@needs_peft_preprocess
def test_a_cache_peft_wrote_is_read(tmp_path):
    data, theirs, ours = _data(), Mlp(), Mlp()
    config = _config("kpm", corda={"cache_file": str(tmp_path / "peft_cache.pt")})
    peft_preprocess_corda(theirs, peft.LoraConfig(**_peft_kwargs(config)), run_model=lambda: theirs(data))
    preprocess_corda(ours, config)
    assert_close(ours.down.eigens.V_WC, theirs.down.eigens.V_WC)


def test_a_hooked_copy_gives_the_covariance():
    data, model = _data(), Mlp()
    hooked = copy.deepcopy(model)
    reference = Mlp()
    preprocess_corda(model, _config(), run_model=lambda: hooked(data), hooked_model=hooked)
    preprocess_corda(reference, _config(), run_model=lambda: reference(data))
    assert_close(model.up.eigens.U_WC, reference.up.eigens.U_WC)
    assert not hooked.up._forward_hooks  # the hooks are gone


@needs_peft_preprocess
def test_gpt2_conv1d_layers_match_peft():
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    base = tiny_gpt2()
    kwargs = dict(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights="corda")
    peft_config = peft.LoraConfig(**kwargs, corda_config=PeftCordaConfig(corda_method="kpm"))
    peft_preprocess_corda(base, peft_config, run_model=lambda: base(ids))
    theirs = peft.get_peft_model(base, peft_config)
    ours_base = tiny_gpt2()
    config = LoraConfig(**kwargs, corda_config=CordaConfig(corda_method="kpm"))
    preprocess_corda(ours_base, config, run_model=lambda: ours_base(ids))
    ours = get_peft_model(ours_base, config)
    mine = ours.base_model.model.transformer.h[0].attn.c_attn
    peft_layer = theirs.base_model.model.transformer.h[0].attn.c_attn
    assert_close(mine.lora_A["default"].weight, peft_layer.lora_A["default"].weight)
    assert_close(mine.base_layer.weight, peft_layer.base_layer.weight)
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, tiny_gpt2()(input_ids=ids).logits)


def _trained(model: nn.Module, config: LoraConfig) -> PeftModel:
    data = _data()
    preprocess_corda(model, config, run_model=lambda: model(data))
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name in ("up", "down"):
            getattr(peft_model.base_model.model, name).lora_B["default"].weight.mul_(2.0)
    return peft_model


def test_save_converts_to_plain_lora_for_the_original_base(tmp_path):
    data, original = _data(), Mlp()
    peft_model = _trained(Mlp(), _config("kpm", rank_pattern={"down": 2}))
    expected = peft_model(data)
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8 and saved["rank_pattern"] == {"down": 4}
    for loaded in (PeftModel.from_pretrained(Mlp(), tmp_path), peft.PeftModel.from_pretrained(Mlp(), tmp_path)):
        assert_close(loaded(data), expected)
    assert not torch.equal(expected, original(data))


def test_save_unconverted_writes_peft_s_config_and_loads_on_the_preprocessed_base(tmp_path):
    data = _data()
    cache = str(tmp_path / "cache.pt")
    config = _config("ipm", corda={"cache_file": cache})
    peft_model = _trained(Mlp(), config)
    expected = peft_model(data)
    peft_model.save_pretrained(tmp_path / "a", convert_to_lora=False)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    theirs = peft.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights="corda",
                             corda_config=PeftCordaConfig(corda_method="ipm", cache_file=cache)).to_dict()
    assert saved["init_lora_weights"] == "corda" and saved["corda_config"] == theirs["corda_config"]
    base = Mlp()
    preprocess_corda(base, LoraConfig.from_pretrained(tmp_path / "a"))  # from the cache: the same residual
    assert_close(PeftModel.from_pretrained(base, tmp_path / "a")(data), expected)
    with pytest.raises(ConfigError, match="run `preprocess_corda` first"):
        PeftModel.from_pretrained(Mlp(), tmp_path / "a")


def test_config_takes_peft_s_corda_config_or_a_dict_and_leaves_the_caller_s_object_alone():
    given = PeftCordaConfig(corda_method="kpm", verbose=True)
    config = LoraConfig(init_lora_weights="corda", corda_config=given)
    assert isinstance(config.corda_config, CordaConfig) and config.corda_config.corda_method == "kpm"
    config.corda_config.corda_method = "ipm"
    assert given.corda_method == "kpm"
    assert LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "kpm"}).corda_config.verbose is False
    with pytest.warns(UserWarning, match="Using default CorDA config"):
        assert LoraConfig(init_lora_weights="corda").corda_config == CordaConfig()
    with pytest.warns(UserWarning, match="`corda_config` specified but will be ignored"):
        LoraConfig(corda_config=CordaConfig())
    with pytest.raises(ConfigError, match="corda_method must be 'ipm' or 'kpm'"):
        LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "xpm"})


def test_missing_eigens_and_missing_data_are_named():
    with pytest.raises(ConfigError, match="run `preprocess_corda` first"):
        get_peft_model(Mlp(), _config())
    with pytest.raises(ConfigError, match="run_model must be specified"):
        preprocess_corda(Mlp(), _config())
    with pytest.raises(ConfigError, match="saw no input"):
        preprocess_corda(Mlp(), _config(), run_model=lambda: None)


def _peft_kwargs(config: LoraConfig) -> dict:
    corda = config.corda_config
    return dict(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                init_lora_weights="corda", rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern,
                use_rslora=config.use_rslora,
                corda_config=PeftCordaConfig(**{f: getattr(corda, f) for f in vars(corda)}))
