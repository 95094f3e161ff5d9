"""LoftQ init (init_lora_weights='loftq'), with PEFT's semantics on lorakit's own NF4 quantizer (issue 23)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lorakit import ConfigError, LoftQConfig, LoraConfig, PeftModel, get_peft_model
from lorakit.lora.loftq import int8_roundtrip, loftq_factors

pytest.importorskip("torchao")
from lorakit.quant.nf4 import BLOCK_SIZE, quantize_linear_, quantize_weight  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 32)
        self.down = nn.Linear(32, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _loftq(model: nn.Module, bits: int = 4, steps: int = 1, alpha: float = 8, r: int = 4):
    config = LoraConfig(target_modules=["up", "down"], r=r, lora_alpha=alpha, init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=steps))
    return get_peft_model(model, config)


@torch.no_grad()
def _error(W: torch.Tensor, layer) -> float:
    A, B = layer.factor_matrices("default")  # (r, in), (out, r)
    return float(torch.linalg.norm(W - layer.base_weight().float() - layer.scaling["default"] * (B @ A)))


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("alpha", [4, 16])  # scaling 1 (PEFT's case) and 4 (lorakit divides by it)
def test_the_adapter_compensates_the_quantization_error(steps, alpha):
    base = _net()
    W = {n: getattr(base, n).weight.detach().clone() for n in ("up", "down")}
    model = _loftq(copy.deepcopy(base), steps=steps, alpha=alpha)
    for name, weight in W.items():
        Q0 = quantize_weight(weight, torch.float32).get_original_weight()
        layer = getattr(model.base_model.model, name)
        lost = float(torch.linalg.norm(weight - Q0))
        assert float(torch.linalg.norm(weight - layer.base_weight().detach())) > 0.5 * lost  # the base is quantized
        assert _error(weight, layer) < 0.95 * lost  # and the adapter makes up part of what it lost
    x = torch.randn(5, 64)
    quantized = copy.deepcopy(base)
    for name in W:
        getattr(quantized, name).weight.data = quantize_weight(W[name], torch.float32).get_original_weight()
    with torch.no_grad():  # the whole model is closer to the original than the plainly quantized one
        assert (model(x) - base(x)).norm() < (quantized(x) - base(x)).norm()


def test_more_steps_do_not_fit_worse():
    W = _net().up.weight.detach()
    errors = []
    for steps in (1, 2, 4):
        Q, A, B = loftq_factors(W, rank=4, scaling=2.0, bits=4, steps=steps)
        errors.append(float(torch.linalg.norm(W - Q - 2.0 * B @ A)))
    assert errors[1] <= errors[0] * 1.001 and errors[2] <= errors[0] * 1.001


def test_the_base_weight_holds_the_dequantized_nf4_values():
    base = _net()
    W = base.up.weight.detach().clone()
    model = _loftq(copy.deepcopy(base), steps=1)
    Q = model.base_model.model.up.base_weight()
    assert not Q.requires_grad
    torch.testing.assert_close(Q, quantize_weight(W, torch.float32).get_original_weight(), rtol=0, atol=0)
    stepped = _loftq(copy.deepcopy(base), steps=3).base_model.model.up.base_weight()  # (32, 64)
    assert not torch.equal(stepped, Q)  # quantized W - s·B A, not W
    blocks = stepped.reshape(-1, BLOCK_SIZE)
    assert max(len(torch.unique(b)) for b in blocks) <= 16  # each block: at most the 16 NF4 levels


def test_eight_bits_is_int8_per_row():
    model = _loftq(_net(), bits=8, steps=2)
    Q = model.base_model.model.up.base_weight()
    torch.testing.assert_close(int8_roundtrip(Q), Q)  # already on each row's int8 grid
    steps = Q / (Q.abs().amax(dim=1, keepdim=True) / 127)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    base = _net()
    model = _loftq(copy.deepcopy(base), steps=2, alpha=16)
    x = torch.randn(3, 64)
    expected = model(x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # onto the original W: Q is made again
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded.base_model.model.down.base_weight(),
                               model.base_model.model.down.base_weight(), rtol=0, atol=0)
    assert not torch.equal(loaded.base_model.model.down.base_weight(), base.down.weight)  # Q, not W


def test_config_rules_as_peft():
    with pytest.raises(ValueError, match="`loftq_config` must be specified when `init_lora_weights` is 'loftq'."):
        LoraConfig(init_lora_weights="loftq")
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        config = LoraConfig(loftq_config=LoftQConfig())
    assert config.loftq_config == {}
    with pytest.raises(ConfigError, match="loftq_bits must be 4"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1})
    d = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=5)).to_dict()
    assert LoraConfig.from_dict(d).loftq_config == {"loftq_bits": 4, "loftq_iter": 5}  # PEFT's files load


def test_an_already_quantized_base_is_refused_with_the_remedy():
    model = _net()
    quantize_linear_(model.up, torch.float32)
    with pytest.raises(ConfigError, match="load the model unquantized"):
        _loftq(model)
    with pytest.raises(ConfigError, match="low_cpu_mem_usage"):
        get_peft_model(_net(), LoraConfig(target_modules=["up"], init_lora_weights="loftq",
                                          loftq_config=LoftQConfig()), low_cpu_mem_usage=True)


def test_at_scaling_one_the_factors_are_pefts():
    """PEFT's loop (peft.utils.loftq_utils.loftq_init, whose quantizer needs bitsandbytes on a GPU) with lorakit's
    quantizer put in: the same Q, A = R and B = L where lora_alpha == r."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    W = _net().up.weight.detach().float()
    res = W
    for step in range(3):  # PEFT's loop, verbatim but for the quantizer
        Q = int8_roundtrip(res)
        out = loftq_utils._low_rank_decomposition(W - Q, reduced_rank=4)
        L, R = out["L"], out["R"]
        if step + 1 < 3:
            res = W - L @ R
    Q_lk, A, B = loftq_factors(W, rank=4, scaling=1.0, bits=8, steps=3)
    torch.testing.assert_close(Q_lk, Q)
    torch.testing.assert_close(A, R)
    torch.testing.assert_close(B, L)


def test_qlora_started_by_loftq_is_closer_to_the_dense_model_than_plain_qlora():
    """`--quantize nf4 --init-lora-weights loftq`: LoftQ's fit on the dense model, then NF4, then the adapter from
    LoftQ's factors: at step 0 the 4-bit model + adapter is nearer the dense model than 4-bit alone, the targeted
    weights are the NF4 levels LoftQ chose (quantizing them again keeps them), and the adapter saves as LoftQ's."""
    from lorakit.lora.loftq import loftq_before_quantization, start_from_loftq
    from lorakit.quant import quantize_model
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    dense = tiny_llama().eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))
    with torch.no_grad():
        want = dense(ids).logits
        plain = get_peft_model(quantize_model(copy.deepcopy(dense), "nf4"), config.copy(init_lora_weights=True))
        started = copy.deepcopy(dense)
        factors = loftq_before_quantization(started, config)
        fitted = {name: started.get_submodule(name).weight.clone() for name in factors}
        model = get_peft_model(quantize_model(started, "nf4"), config.copy(init_lora_weights=True))
        start_from_loftq(model, factors)
        err_plain = float((plain.eval()(ids).logits - want).norm())
        err_loftq = float((model.eval()(ids).logits - want).norm())
    assert len(factors) == 2 * 7 and err_loftq < 0.7 * err_plain, (err_loftq, err_plain)
    for name, weight in fitted.items():  # the NF4 quantization after LoftQ keeps LoftQ's levels (up to the rounding
        kept = model.get_base_model().get_submodule(name).base_layer.weight.get_original_weight()  # of the 8-bit scales)
        assert (kept.float() - weight.float()).abs().max() <= 0.01 * weight.abs().max(), name


def test_the_cli_takes_loftq_with_nf4_only():
    from lorakit.train.config import TrainConfig

    with pytest.raises(ConfigError, match="loftq"):
        TrainConfig(init_lora_weights="loftq").validate()
    with pytest.raises(ConfigError, match="loftq_iter"):
        TrainConfig(init_lora_weights="loftq", quantize="nf4", loftq_iter=0).validate()
    TrainConfig(init_lora_weights="loftq", quantize="nf4", loftq_iter=2).validate()
