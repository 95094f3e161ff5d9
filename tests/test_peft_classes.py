"""Code written against PEFT's LoRA layer classes works on lorakit's layers (lorakit.lora.peft_classes): isinstance
checks, and PEFT's own hotswap helpers, which find layers that way and write factors through `.data`."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.lora.conv_layer import LoraConv1d, LoraConv2d


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft", reason="peft (a test dependency) is needed to check against its classes")
    from peft.tuners.lora import layer as peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)
        self.conv1 = nn.Conv1d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.out = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.lin(self.emb(ids))  # (b, t, 8)
        h = self.conv1(h.transpose(1, 2))  # (b, 8, t)
        h = self.conv2(h[..., None])[..., 0].transpose(1, 2)
        return self.out(h)


def test_lorakit_layers_are_peft_layers_to_isinstance():
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["emb", "lin", "conv1", "conv2"]))
    m = model.base_model.model
    for module, theirs in [(m.lin, peft_layers.Linear), (m.emb, peft_layers.Embedding),
                           (m.conv1, peft_layers.Conv1d), (m.conv2, peft_layers.Conv2d)]:
        assert isinstance(module, (theirs, peft_layers.LoraLayer, BaseTunerLayer)), type(module)
    assert type(m.conv1) is LoraConv1d and type(m.conv2) is LoraConv2d
    assert not isinstance(m.conv1, peft_layers.Conv2d) and not isinstance(m.lin, peft_layers.Embedding)
    assert not isinstance(m.out, BaseTunerLayer)  # not targeted: a plain nn.Linear


def _base() -> Net:
    torch.manual_seed(0)
    return Net()


def _saved(tmp_path, name, seed, r, alpha):
    base = _base()
    torch.manual_seed(seed)  # adapters differ: init_lora_weights=False makes A and B both random
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin", "out", "conv2"],
                                            init_lora_weights=False))
    model.save_pretrained(tmp_path / name)
    return model


@pytest.mark.parametrize("padded", [False, True])
def test_peft_hotswap_on_a_lorakit_model_gives_the_second_adapters_output(tmp_path, padded):
    """PEFT's hotswap_adapter replaces adapter 0's tensors by adapter 1's (another rank) in place, through
    `.data`; lorakit's outputs must follow, the fused path's kept factor casts included."""
    ids = torch.randint(0, 20, (2, 5))
    _saved(tmp_path, "a0", 1, 4, 8)
    expected = _saved(tmp_path, "a1", 2, 2, 4).eval()  # the same scaling (2): only the factors tell them apart
    with torch.no_grad():
        want = expected(ids)
    model = PeftModel.from_pretrained(_base(), tmp_path / "a0").eval()
    if padded:  # PEFT's compiled-hotswap preparation: factors padded to one rank, scalings made tensors
        prepare_model_for_compiled_hotswap(model, target_rank=4, config=model.peft_config)
    with torch.no_grad():
        before = model(ids)  # fills whatever lorakit keeps of the factors
    hotswap_adapter(model, str(tmp_path / "a1"), adapter_name="default", torch_device="cpu")
    with torch.no_grad():
        after = model(ids)
    assert not torch.allclose(before, want, atol=1e-4)
    assert torch.allclose(after, want, atol=1e-5, rtol=1e-4), (after - want).abs().max()


def test_the_peft_layer_api_on_lorakit_layers():
    """What code that finds PEFT's layers calls on them: in/out features, get_delta_weight in the weight's layout,
    per-layer set_adapter / enable_adapters, merged, the sorted adapter names."""
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["emb", "lin", "conv2"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["emb", "lin", "conv2"], init_lora_weights=False))
    m = model.base_model.model
    assert (m.lin.in_features, m.lin.out_features, m.emb.in_features, m.emb.out_features) == (8, 8, 20, 8)
    assert (m.conv2.in_features, m.conv2.out_features) == (8, 8)
    for layer in (m.emb, m.lin, m.conv2):
        assert layer._all_available_adapter_names() == ["default", "other"]
        delta = layer.get_delta_weight("default")
        assert delta.shape == layer.get_base_layer().weight.shape
        before = layer.get_base_layer().weight.detach().clone()
        layer.merge(["default"])
        assert layer.merged and torch.allclose(layer.get_base_layer().weight, before + delta, atol=1e-6)
        layer.unmerge()
        assert not layer.merged
    m.lin.set_adapter("other")
    assert m.lin.active_adapters == ["other"]
    assert [p.requires_grad for p in m.lin.lora_A.parameters()] == [False, True]
    m.lin.enable_adapters(False)
    assert m.lin.disable_adapters and not any(p.requires_grad for p in m.lin.lora_A.parameters())
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert not m.lin.disable_adapters  # all enabled after the block, as PEFT does
