"""Checkpoints: an interrupted run resumes onto the same loss curve; broken checkpoints are skipped."""
from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from lorakit.train import (CheckpointError, Trainer, latest_good_checkpoint, read_metrics,
                           resolve_resume, verify_checkpoint)
from lorakit.train.checkpoint import capture_rng, restore_rng
from lorakit.train.interrupt import StopFlag, stop_on_signals
from tests.test_train_fixtures import (collate, fast_config, one_torch_thread,  # noqa: F401 (fixture)
                                       random_examples, tiny_lora_model, trainable_snapshot)

# 10 examples, micro-batches of 2, 2 per step: 3 steps an epoch (the last window is short), so 10
# steps cross three epoch boundaries; dropout > 0 makes the result depend on the restored RNG.
RESUME_SETTINGS = dict(max_steps=10, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=2,
                       lr_schedule="cosine", save_every=4, keep_checkpoints=3, weight_decay=0.01)


def resume_data():
    return random_examples(10, (5, 12), seed=11)


def run(run_dir, callbacks=(), **overrides):
    model = tiny_lora_model(seed=2, dropout=0.1)
    config = fast_config(**{**RESUME_SETTINGS, **overrides})
    trainer = Trainer(model, resume_data(), collate, config, run_dir, eval_data=resume_data()[:3],
                      callbacks=callbacks, progress=False)
    return model, trainer.fit()


def train_losses(run_dir):
    return {e["step"]: e["loss"] for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"}


def sigint_at(step):
    def callback(trainer, event):
        if event["event"] == "train" and event["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return callback


def test_interrupted_and_resumed_run_matches_the_straight_run(tmp_path):
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    straight_model, straight = run(tmp_path / "straight")

    _, stopped = run(tmp_path / "resumed", callbacks=[sigint_at(6)])
    assert stopped.interrupted and stopped.steps == 6
    assert stopped.last_checkpoint == str(tmp_path / "resumed" / "checkpoints" / "step-6")

    resumed_model, resumed = run(tmp_path / "resumed", resume=True)
    assert resumed.resumed_from_step == 6 and resumed.steps == 10 and not resumed.interrupted

    expected, got = trainable_snapshot(straight_model), trainable_snapshot(resumed_model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 11))  # every step logged exactly once
    for step in range(7, 11):
        assert b[step] == pytest.approx(a[step], abs=1e-6)
    assert resumed.train_tokens == straight.train_tokens
    assert resumed.final_eval_loss == pytest.approx(straight.final_eval_loss, abs=1e-6)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored


def test_request_stop_then_resume_from_an_explicit_checkpoint(tmp_path):
    def stop_at_5(trainer, event):
        if event["event"] == "train" and event["step"] == 5:
            trainer.request_stop("test")
    _, first = run(tmp_path / "a", callbacks=[stop_at_5], max_steps=6)
    assert first.interrupted and first.steps == 5
    checkpoint = tmp_path / "a" / "checkpoints" / "step-5"
    # resuming from another run's checkpoint writes into this run folder
    _, second = run(tmp_path / "b", resume=str(checkpoint), max_steps=6)
    assert second.resumed_from_step == 5 and second.steps == 6
    assert (tmp_path / "b" / "checkpoints" / "step-6").is_dir()


def test_checkpoint_layout_and_retention(tmp_path):
    run(tmp_path, max_steps=9, save_every=2, keep_checkpoints=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-8", "step-9"]  # every 2 steps, plus the end; the newest two kept
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step-9").iterdir())
    assert files == ["checksums.json", "config.json", "optimizer.pt", "rng.pt",
                     "trainable.safetensors", "trainer_state.json"]
    state = json.loads((tmp_path / "checkpoints" / "step-9" / "trainer_state.json").read_text())
    # step 9 ends epoch 2 (0-based): all 5 of its micro-batches consumed
    assert (state["step"], state["epoch"], state["micro_batch"]) == (9, 2, 5)
    assert len(state["param_names"]) == 8 and state["input_tokens"] > 0
    for pt in ("optimizer.pt", "rng.pt"):  # plain tensors and data: safe to load
        torch.load(tmp_path / "checkpoints" / "step-9" / pt, weights_only=True)


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_and_incomplete_checkpoints_are_skipped(tmp_path):
    run(tmp_path, max_steps=6, save_every=2, keep_checkpoints=3)
    checkpoints = tmp_path / "checkpoints"
    corrupt(checkpoints / "step-6" / "trainable.safetensors")
    (checkpoints / "step-4" / "checksums.json").unlink()  # as if killed mid-write
    assert verify_checkpoint(checkpoints / "step-6") == ["trainable.safetensors does not match its checksum"]
    with pytest.warns(UserWarning, match="skipping checkpoint") as caught:
        assert latest_good_checkpoint(tmp_path) == checkpoints / "step-2"
    messages = [str(w.message) for w in caught]
    assert any("step-6: trainable.safetensors does not match its checksum" in m for m in messages)
    assert any("step-4: checksums.json missing" in m for m in messages)

    with pytest.warns(UserWarning) as caught:
        model, result = run(tmp_path, max_steps=6, save_every=2, resume=True)
    messages = " | ".join(str(w.message) for w in caught)
    assert "skipping checkpoint" in messages and "superseded-step-4, superseded-step-6" in messages
    assert result.resumed_from_step == 2 and result.steps == 6
    assert (checkpoints / "superseded-step-6").is_dir()  # the broken ones are kept aside, not deleted
    assert verify_checkpoint(checkpoints / "step-6") == []  # rewritten by the resumed run
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_naming_a_broken_checkpoint_is_an_error(tmp_path):
    run(tmp_path, max_steps=4, save_every=2)
    corrupt(tmp_path / "checkpoints" / "step-4" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"step-4.*optimizer.pt does not match.*newest good one is .*step-2"):
        with pytest.warns(UserWarning):
            resolve_resume(str(tmp_path / "checkpoints" / "step-4"), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    assert resolve_resume(True, tmp_path / "empty-run") is None
    assert resolve_resume(False, tmp_path) is None


@pytest.mark.filterwarnings("ignore:resuming from")
def test_a_checkpoint_for_other_targets_is_refused(tmp_path):
    run(tmp_path / "a", max_steps=2, save_every=2)
    model = tiny_lora_model(seed=2, targets=["k_proj"])
    trainer = Trainer(model, resume_data(), collate, fast_config(max_steps=3, resume=str(tmp_path / "a")),
                      tmp_path / "b", progress=False)
    with pytest.raises(CheckpointError, match="does not fit this model's trainable parameters"):
        trainer.fit()


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)
    restore_rng(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_resuming_with_changed_options_warns(tmp_path):
    run(tmp_path, max_steps=2, save_every=2)
    with pytest.warns(UserWarning, match=r"changed options \(max_steps: 2 -> 3; lr: 0.01 -> 0.02\)"):
        _, result = run(tmp_path, max_steps=3, lr=2e-2, resume=True)
    assert result.resumed_from_step == 2 and result.steps == 3


def test_sigterm_requests_a_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag()
    with stop_on_signals(flag):
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.reason == "SIGTERM received"
    assert signal.getsignal(signal.SIGTERM) is before


def test_adamw8bit_trains_checkpoints_and_resumes_exactly(tmp_path):
    """--optimizer adamw8bit through the Trainer: logged lr is a number (torchao keeps it as a tensor),
    its 8-bit states go into the checkpoint and a resumed run ends where the straight one does."""
    pytest.importorskip("torchao", reason="adamw8bit is torchao's")

    def go(run_dir, callbacks=(), **overrides):
        model = tiny_lora_model(seed=2, r=128)  # lora_A 128 x 32: 4,096 values, the smallest AdamW8bit quantizes
        config = fast_config(**{**RESUME_SETTINGS, "max_steps": 4, "save_every": 2, "optimizer": "adamw8bit",
                                **overrides})
        trainer = Trainer(model, resume_data(), collate, config, run_dir, callbacks=callbacks, progress=False)
        return model, trainer.fit()

    straight_model, _ = go(tmp_path / "straight")
    assert all(isinstance(lr, float) for lr in
               (e["lr"] for e in read_metrics(tmp_path / "straight" / "metrics.jsonl") if e["event"] == "train"))
    _, stopped = go(tmp_path / "resumed", callbacks=[sigint_at(2)])
    assert stopped.interrupted and stopped.steps == 2
    resumed_model, resumed = go(tmp_path / "resumed", resume=True)
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    expected, got = trainable_snapshot(straight_model), trainable_snapshot(resumed_model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


def test_a_dora_checkpoint_from_when_magnitudes_were_bare_parameters_still_fits():
    from lorakit import LoraConfig, get_peft_model
    from pathlib import Path

    from lorakit.train.checkpoint import check_fits, with_current_names
    from lorakit.train.optim import trainable_parameters
    from tests.conftest import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    old = {n.removesuffix(".weight") if "magnitude" in n else n: p.detach().clone() for n, p in trainable_parameters(model)}
    with pytest.raises(CheckpointError, match="does not fit"):
        check_fits(old, model, Path("step-10"))
    check_fits(with_current_names(old, model), model, Path("step-10"))
