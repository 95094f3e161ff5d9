"""AdamW parameter groups (LoRA+, no decay on biases / norms / magnitudes) and lr schedule shapes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorakit.train import build_optimizer, build_param_groups, build_scheduler, lr_factor
from lorakit.train.optim import warmup_steps_for
from tests.test_train_fixtures import fast_config, one_torch_thread, tiny_lora_model  # noqa: F401 (fixture)


def group_by_name(groups):
    return {g["name"]: g for g in groups}


def test_only_trainable_parameters_are_optimised():
    model = tiny_lora_model()
    optimizer = build_optimizer(model, fast_config())
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimised == trainable and len(trainable) == 8  # 2 layers x (q, v) x (A, B)


def test_on_a_cpu_the_fused_adamw_steps_as_torch_adamw_does():
    """The CPU optimizer is torch's fused AdamW (a third of foreach's time there); its steps are AdamW's."""
    model, reference = tiny_lora_model(), tiny_lora_model()
    reference.load_state_dict(model.state_dict())
    config = fast_config(lr=1e-2, weight_decay=0.1)
    optimizer = build_optimizer(model, config)
    assert optimizer.defaults["fused"] is True
    plain = torch.optim.AdamW(build_param_groups(reference, config), lr=config.lr, eps=1e-8, foreach=False)
    trained = [p for p in model.parameters() if p.requires_grad]
    for step in range(3):
        for m, opt in ((model, optimizer), (reference, plain)):
            torch.manual_seed(step)
            for p in (q for q in m.parameters() if q.requires_grad):
                p.grad = torch.randn_like(p)
            opt.step()
    for p, q in zip(trained, (q for q in reference.parameters() if q.requires_grad)):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()


def test_lora_plus_gives_lora_B_lr_times_ratio():
    model = tiny_lora_model()
    groups = group_by_name(build_param_groups(model, fast_config(lr=1e-3, lora_plus_ratio=16.0)))
    assert set(groups) == {"decay", "lora_B"}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3) and groups["decay"]["lr"] == 1e-3
    assert all("lora_B" in n for n in groups["lora_B"]["param_names"])
    assert not any("lora_B" in n for n in groups["decay"]["param_names"])
    plain = group_by_name(build_param_groups(model, fast_config(lr=1e-3)))
    assert set(plain) == {"decay"} and len(plain["decay"]["params"]) == 8


def test_lora_plus_ratio_survives_the_schedule():
    model = tiny_lora_model()
    config = fast_config(lr=1e-3, lora_plus_ratio=4.0, warmup_steps=2, lr_schedule="cosine")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        base, fast = (g["lr"] for g in optimizer.param_groups)
        assert fast == pytest.approx(4.0 * base)


class WithNormAndBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)  # weight decays, bias does not
        self.norm = nn.LayerNorm(4)  # no decay
        self.lora_magnitude_vector = nn.Parameter(torch.ones(4))  # DoRA magnitude: no decay
        self.lora_embedding_B = nn.Parameter(torch.zeros(4, 2))


def test_no_weight_decay_on_biases_norms_and_magnitudes():
    groups = group_by_name(build_param_groups(WithNormAndBias(),
                                              fast_config(weight_decay=0.1, lora_plus_ratio=2.0)))
    assert groups["decay"]["param_names"] == ["proj.weight"] and groups["decay"]["weight_decay"] == 0.1
    assert sorted(groups["no_decay"]["param_names"]) == ["lora_magnitude_vector", "norm.bias",
                                                         "norm.weight", "proj.bias"]
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["lora_B"]["param_names"] == ["lora_embedding_B"]


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(model, fast_config())


def test_warmup_ramps_linearly_to_the_peak():
    factors = [lr_factor(k, 100, 4, "cosine") for k in range(4)]
    assert factors == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4, "cosine") == 1.0  # first decay step starts at the peak


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_shapes(schedule):
    total, warmup = 50, 5
    factors = [lr_factor(k, total, warmup, schedule) for k in range(total)]
    decay = factors[warmup:]
    assert all(0 < f <= 1 for f in factors)
    if schedule == "constant":
        assert decay == [1.0] * len(decay)
        return
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
    assert decay[-1] < 0.05
    middle = lr_factor(warmup + (total - warmup) // 2, total, warmup, schedule)
    expected = 0.5 * (1 + math.cos(math.pi * ((total - warmup) // 2) / (total - warmup))) \
        if schedule == "cosine" else 1 - ((total - warmup) // 2) / (total - warmup)
    assert middle == pytest.approx(expected)
    if schedule == "linear":
        steps = [a - b for a, b in zip(decay, decay[1:])]
        assert max(steps) - min(steps) < 1e-12  # a straight line


def test_warmup_steps_override_ratio():
    assert warmup_steps_for(fast_config(warmup_steps=None, warmup_ratio=0.1), 95) == 10
    assert warmup_steps_for(fast_config(warmup_steps=3, warmup_ratio=0.5), 95) == 3
    assert warmup_steps_for(fast_config(warmup_steps=30), 10) == 10


def test_scheduler_applies_the_factor():
    model = tiny_lora_model()
    config = fast_config(lr=1e-2, warmup_steps=2, lr_schedule="linear")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1e-2 * lr_factor(k, 6, 2, "linear") for k in range(6)])


def test_adamw8bit_keeps_8bit_moments_follows_adamw_and_resumes_exactly(tmp_path):
    """--optimizer adamw8bit: the same groups as AdamW, 8-bit moments for tensors of 4,096+ values, updates
    within a few percent of fp32 AdamW's on the same gradients, and a saved state (read back the way
    checkpoints are, weights_only) continues exactly as the original."""
    pytest.importorskip("torchao", reason="adamw8bit is torchao's")
    import copy

    from tests.conftest import rel_err

    def grads(model, step):
        for i, p in enumerate(p for p in model.parameters() if p.requires_grad):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))

    models = {name: tiny_lora_model(r=128) for name in ("adamw", "adamw8bit")}  # A: 128 x 32 = 4,096 values
    start = {n: p.detach().clone() for n, p in models["adamw"].named_parameters() if p.requires_grad}
    opts = {name: build_optimizer(m, fast_config(optimizer=name, lr=1e-3)) for name, m in models.items()}
    assert [g["name"] for g in opts["adamw8bit"].param_groups] == [g["name"] for g in opts["adamw"].param_groups]
    for step in range(3):
        for name, model in models.items():
            grads(model, step)
            opts[name].step()
    states = [type(s["exp_avg"]).__name__ for s in opts["adamw8bit"].state.values()]
    assert "OptimState8bit" in states
    for n, p in models["adamw8bit"].named_parameters():
        if p.requires_grad:
            exact = dict(models["adamw"].named_parameters())[n] - start[n]
            assert rel_err(p.detach() - start[n], exact.detach()) < 0.1, n
    path = tmp_path / "optimizer.pt"
    torch.save(opts["adamw8bit"].state_dict(), path)
    resumed_model = copy.deepcopy(models["adamw8bit"])
    resumed = build_optimizer(resumed_model, fast_config(optimizer="adamw8bit", lr=1e-3))
    resumed.load_state_dict(torch.load(path, weights_only=True))
    for model, opt in ((models["adamw8bit"], opts["adamw8bit"]), (resumed_model, resumed)):
        grads(model, 3)
        opt.step()
    for (n, a), b in zip(models["adamw8bit"].named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), n


def test_adamw8bit_is_refused_with_fsdp():
    from lorakit.errors import ConfigError
    from lorakit.train.config import TrainConfig

    with pytest.raises(ConfigError, match="optimizer 'adamw8bit' is not supported with it"):
        TrainConfig(optimizer="adamw8bit", fsdp=True).validate()
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, adamw8bit"):
        TrainConfig(optimizer="sgd").validate()
