"""A run that diverges while every number stays finite is caught: stopped (nan_policy "stop") or warned
about ("skip"), with a "diverged" event in metrics.jsonl; a healthy run never trips the watch."""
from __future__ import annotations

import pytest
import torch

from lorakit.train import Trainer, read_metrics
from lorakit.train.divergence import DivergenceWatch
from lorakit.train.loop import NonFiniteLossError
from tests.test_train_fixtures import (collate, fast_config, one_torch_thread,  # noqa: F401 (fixture)
                                       random_examples, tiny_lora_model)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _trainer(tmp_path, lr: float, policy: str = "stop", steps: int = 30) -> Trainer:
    config = fast_config(lr=lr, max_steps=steps, nan_policy=policy, max_grad_norm=1.0)
    return Trainer(tiny_lora_model(targets=ALL), random_examples(32, (8, 16)), collate, config, tmp_path,
                   progress=False)


def test_a_learning_rate_far_too_high_stops_the_run_with_the_reason(tmp_path, one_torch_thread):
    trainer = _trainer(tmp_path, lr=1e6)
    with pytest.raises(NonFiniteLossError, match="diverged") as info:
        trainer.fit()
    assert "Lower --lr" in str(info.value)
    events = read_metrics(tmp_path / "metrics.jsonl")
    diverged = [e for e in events if e["event"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["step"] < 30
    assert all(e["event"] != "nonfinite_loss" for e in events)  # finite all along: the NaN check never fired


def test_skip_policy_warns_once_and_finishes(tmp_path, one_torch_thread):
    trainer = _trainer(tmp_path, lr=1e6, policy="skip", steps=12)
    with pytest.warns(UserWarning, match="diverged"):
        result = trainer.fit()
    assert result.steps == 12
    assert sum(e["event"] == "diverged" for e in read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_a_healthy_run_never_trips_the_watch(tmp_path, one_torch_thread):
    result = _trainer(tmp_path, lr=1e-2).fit()
    assert result.steps == 30
    assert all(e["event"] != "diverged" for e in read_metrics(tmp_path / "metrics.jsonl"))


@pytest.mark.parametrize("losses, grads, growth, sign", [
    ([5.0] * 6, [0.0] * 6, 1.0, "exactly 0"),
    ([5.0, 5.0, 5.0, 12.0, 13.0, 14.0], [1.0] * 6, 1.0, "getting worse"),
    ([0.7, 4e4, 9e4, 2e5, 1e5, 3e5], [1.0] * 6, 1.0, "getting worse"),  # exploding within the first steps
    ([5.0] * 6, [1.0] * 6, 1e3, "exploding"),
])
def test_each_sign_must_hold_for_three_steps(losses, grads, growth, sign):
    weight = torch.ones(4)
    watch = DivergenceWatch([weight])
    reasons = []
    for step, (loss, grad) in enumerate(zip(losses, grads), 1):
        if step == 2:
            weight.mul_(growth)
        reasons.append(watch.observe(step, loss, grad))
    first = next(i for i, r in enumerate(reasons) if r)
    assert sign in reasons[first]
    assert all(r is None for r in reasons[:first]) and first >= 2  # not before the third step of the sign


def test_skip_stops_at_once_when_the_weights_are_no_longer_finite(tmp_path, one_torch_thread):
    """--nan-policy skip drops NaN batches; once the weights themselves are inf/NaN every batch is NaN, and
    skipping would run out the whole epoch (minutes on a real data set) before giving up."""
    trainer = _trainer(tmp_path, lr=1e-2, policy="skip")
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="no longer finite"):
        trainer.fit()
    skipped = [e for e in read_metrics(tmp_path / "metrics.jsonl") if e["event"] == "nonfinite_loss"]
    assert len(skipped) == 1
