"""The training loop: what changes, what must not, gradient accumulation, NaN policy, run files."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorakit.errors import DataError
from lorakit.train import (NonFiniteLossError, TrainConfig, Trainer, latest_good_checkpoint,
                           read_metrics, write_summary)
from lorakit.train.batching import epoch_order, loss_unit_counter
from tests.test_train_fixtures import (ALL_PROJECTIONS, collate, fast_config, frozen_snapshot,
                                       one_torch_thread, random_examples, tiny_lora_model,
                                       trainable_snapshot)  # noqa: F401 (one_torch_thread: fixture)


def fit(model, data, run_dir, eval_data=None, **overrides):
    trainer = Trainer(model, data, collate, fast_config(**overrides), run_dir, eval_data=eval_data,
                      progress=False)
    return trainer, trainer.fit()


def train_events(run_dir):
    return [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"]


def test_only_trainable_parameters_change_and_base_stays_bit_identical(tmp_path):
    model = tiny_lora_model(dropout=0.1)
    frozen, trainable = frozen_snapshot(model), trainable_snapshot(model)
    fit(model, random_examples(8), tmp_path, max_steps=3)
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    for name, before in trainable.items():
        assert not torch.equal(dict(model.named_parameters())[name], before), f"{name} did not train"


def test_loss_decreases_on_a_memorisable_set(tmp_path):
    model = tiny_lora_model(r=8, targets=ALL_PROJECTIONS)
    data = random_examples(4, 12)
    trainer, result = fit(model, data, tmp_path, eval_data=data, max_steps=30, lr=3e-2)
    losses = [e["loss"] for e in train_events(tmp_path)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses
    assert result.final_eval_loss < losses[0] - 0.3


def accumulation_run(tmp_path, lengths, batch_size, grad_accum):
    model = tiny_lora_model(seed=3, targets=ALL_PROJECTIONS)
    trainer, _ = fit(model, random_examples(8, lengths, seed=5), tmp_path, max_steps=4,
                     batch_size=batch_size, grad_accum=grad_accum, lr=1e-2)
    return trainable_snapshot(model), train_events(tmp_path)


@pytest.mark.parametrize("lengths", [12, (4, 16)], ids=["equal-tokens", "unequal-tokens"])
def test_accumulating_2x2_equals_batch_4(tmp_path, lengths):
    params_4, events_4 = accumulation_run(tmp_path / "b4", lengths, batch_size=4, grad_accum=1)
    params_2x2, events_2x2 = accumulation_run(tmp_path / "b2x2", lengths, batch_size=2, grad_accum=2)
    for a, b in zip(events_4, events_2x2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["label_tokens"] == b["label_tokens"] and a["tokens"] == b["tokens"]
    for name in params_4:
        torch.testing.assert_close(params_4[name], params_2x2[name], atol=1e-5, rtol=0)


def test_loss_units_follow_the_task():
    batch = collate(random_examples(3, (4, 8), seed=2))
    real = int(batch["attention_mask"].sum())
    assert loss_unit_counter("causal-lm")(batch) == real - 3  # the first label of each row is dropped
    assert loss_unit_counter("token-cls")(batch) == real
    assert loss_unit_counter("seq-cls")({"input_ids": batch["input_ids"], "labels": torch.tensor([0, 1, 1])}) == 3


def test_data_order_is_a_seeded_permutation_per_epoch():
    first = epoch_order(50, seed=7, epoch=0)
    assert sorted(first) == list(range(50))
    assert first == epoch_order(50, seed=7, epoch=0)
    assert first != epoch_order(50, seed=7, epoch=1) and first != epoch_order(50, seed=8, epoch=0)


class NaNOnCalls(nn.Module):
    """Wraps a model; the loss of the listed forward calls (1-based) is NaN."""

    def __init__(self, inner: nn.Module, calls: set[int]):
        super().__init__()
        self.inner, self.calls, self.count = inner, calls, 0

    def forward(self, **batch):
        self.count += 1
        out = self.inner(**batch)
        if self.count in self.calls:
            out.loss = out.loss * float("nan")
        return out


def test_nan_stop_keeps_the_last_good_checkpoint(tmp_path):
    model = NaNOnCalls(tiny_lora_model(), calls={5})
    with pytest.raises(NonFiniteLossError, match=r"step 5.*step-4"):
        fit(model, random_examples(8), tmp_path, max_steps=10, save_every=2, keep_checkpoints=5)
    assert latest_good_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-4"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = read_metrics(tmp_path / "metrics.jsonl")
    assert events[-1]["event"] == "nonfinite_loss" and events[-1]["step"] == 5
    assert (tmp_path / "loss.png").exists()


def test_nan_skip_drops_the_batch_and_counts_it(tmp_path):
    model = NaNOnCalls(tiny_lora_model(), calls={3})
    trainer, result = fit(model, random_examples(8), tmp_path, max_steps=5, nan_policy="skip")
    assert result.steps == 5 and result.skipped_batches == 1 and model.count == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [e["step"] for e in train_events(tmp_path)] == [1, 2, 3, 4, 5]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    data = random_examples(8)
    _, plain = fit(tiny_lora_model(dropout=0.1), data, tmp_path / "plain", max_steps=2)
    model = tiny_lora_model(dropout=0.1)
    _, checkpointed = fit(model, data, tmp_path / "gc", max_steps=2, gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    losses = [[e["loss"] for e in train_events(tmp_path / d)] for d in ("plain", "gc")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_run_files_metrics_plot_summary(tmp_path):
    data = random_examples(10, (6, 12))
    config = fast_config(max_steps=6, batch_size=2, grad_accum=2, log_every=2, eval_every=3,
                         save_every=3, targets=["q_proj"])
    trainer = Trainer(tiny_lora_model(), data, collate, config, tmp_path, eval_data=data[:4],
                      progress=False)
    result = trainer.fit()
    assert trainer.config is not config and config.targets == ["q_proj"]
    events = read_metrics(tmp_path / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in train] == [2, 4, 6] and [e["step"] for e in evals] == [3, 6]
    for key in ("epoch", "loss", "lr", "grad_norm", "tokens", "label_tokens", "tokens_per_second"):
        assert all(key in e for e in train), key
    assert evals[-1]["eval_perplexity"] == pytest.approx(2.718281828 ** evals[-1]["eval_loss"], rel=1e-6)
    assert train[-1]["epoch"] == pytest.approx(2.0)  # 5 micro-batches = 3 steps per epoch
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "config.yaml").exists()
    assert result.train_tokens == sum(len(e["input_ids"]) for e in data) * 2  # two epochs
    assert result.final_eval_loss == evals[-1]["eval_loss"] and result.final_loss == train[-1]["loss"]
    path = write_summary(tmp_path, {**result.summary_figures(), "trainable_params": 1, "nan": float("nan")})
    summary = json.loads(path.read_text())
    assert summary["steps"] == 6 and summary["train_tokens"] == result.train_tokens
    assert summary["tokens_per_second"] > 0 and summary["nan"] is None
    assert summary["skipped_batches"] == 0 and summary["final_loss"] == result.final_loss


def test_epochs_decide_the_length_when_max_steps_is_unset(tmp_path):
    data = random_examples(10)
    trainer, result = fit(tiny_lora_model(), data, tmp_path, max_steps=-1, epochs=1.5, batch_size=4)
    assert trainer.steps_per_epoch == 3 and result.steps == 5 and result.total_steps == 5


def test_empty_training_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        Trainer(tiny_lora_model(), [], collate, TrainConfig(), tmp_path)


def test_micro_batches_without_label_tokens_are_passed_over(tmp_path):
    def mask_flagged_rows(examples):
        batch = collate(examples)
        for row, e in enumerate(examples):
            if e["masked"]:
                batch["labels"][row] = -100
        return batch
    data = [{**e, "masked": i % 2 == 0} for i, e in enumerate(random_examples(8, 12))]
    trainer = Trainer(tiny_lora_model(), data, mask_flagged_rows,
                      fast_config(max_steps=6, batch_size=1, grad_accum=2), tmp_path, progress=False)
    result = trainer.fit()
    events = read_metrics(tmp_path / "metrics.jsonl")
    assert result.steps == 6 and all(e["loss"] is not None for e in events if e["event"] == "train")
    assert result.train_label_tokens % 11 == 0  # whole unmasked rows only (12 tokens, 11 labels)
    assert any(e["event"] == "empty_batch" for e in events)  # some window had two masked rows


def test_an_epoch_without_any_label_tokens_is_an_error(tmp_path):
    def mask_all(examples):
        batch = collate(examples)
        batch["labels"] = torch.full_like(batch["labels"], -100)
        return batch
    trainer = Trainer(tiny_lora_model(), random_examples(8), mask_all, fast_config(max_steps=3),
                      tmp_path, progress=False)
    with pytest.raises(DataError, match="no training batch has any label tokens"):
        trainer.fit()
    assert any(e["event"] == "empty_batch" for e in read_metrics(tmp_path / "metrics.jsonl"))


def test_an_epoch_of_nan_losses_with_skip_is_an_error(tmp_path):
    model = NaNOnCalls(tiny_lora_model(), calls=set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match="every batch of epoch 0"):
        fit(model, random_examples(8), tmp_path, max_steps=5, nan_policy="skip")


def test_train_seconds_leave_evaluation_out(tmp_path, monkeypatch):
    """tokens_per_second is the training's rate: a slow evaluation (periodic and final) does not lower it."""
    import time

    data = random_examples(8, (6, 12))
    trainer = Trainer(tiny_lora_model(), data, collate, fast_config(max_steps=4, batch_size=2, eval_every=2,
                                                                   log_every=1, save_every=0),
                      tmp_path, eval_data=data[:2], progress=False)
    evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda: (time.sleep(0.6), evaluate())[1])
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    assert wall > 1.2  # two evaluations of 0.6 s each ran inside fit()
    assert result.train_seconds < wall - 1.2 + 0.05
    assert all(e["elapsed_seconds"] <= result.train_seconds for e in train_events(tmp_path))
