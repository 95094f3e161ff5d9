"""--report-to: every step of metrics.jsonl reaches TensorBoard, W&B (offline), MLflow (file store) and trackio
(local store) with the same values, read back with each tracker's own reader; a run killed with SIGKILL and
resumed has each step exactly once in each. Nothing here touches the network."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import struct
from pathlib import Path

import pytest

from lorakit.errors import ConfigError
from lorakit.train import Trainer, TrainConfig, read_metrics
from lorakit.train.trackers import (STATE_FILE, Trackers, event_metrics, flat_params, tracker_names,
                                    tracker_problems)
from tests.test_train_fixtures import (collate, fast_config, one_torch_thread,  # noqa: F401 (fixture)
                                       random_examples, tiny_lora_model, write_chat_data, write_tiny_model_dir)

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]
PROJECT = "lorakit-tests"


@pytest.fixture(autouse=True, scope="module")
def trackio_store(tmp_path_factory):
    """trackio's store in a folder of this module's (trackio reads TRACKIO_DIR once, when first imported;
    the tests use run names of their own)."""
    with pytest.MonkeyPatch.context() as patch:
        store = tmp_path_factory.mktemp("trackio")
        patch.setenv("TRACKIO_DIR", str(store))
        import trackio.utils

        if trackio.utils.TRACKIO_DIR != store:
            pytest.skip(f"trackio was imported before this module (its store is {trackio.utils.TRACKIO_DIR})")
        yield store


@pytest.fixture(autouse=True)
def offline_trackers(monkeypatch):
    """W&B offline and quiet, MLflow's own file store (no tracking server)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# --- each tracker's own reader: {metric: {step: [values]}} (a list, so a step logged twice shows) -------------

def read_tensorboard(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for e in accumulator.Scalars(tag):
                found.setdefault(tag, {}).setdefault(e.step, []).append(e.value)
    return found


def read_mlflow(run_dir: Path, monkeypatch) -> tuple[dict, object]:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    run = client.get_run(json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"])
    found: dict = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            found.setdefault(key, {}).setdefault(m.step, []).append(m.value)
    return found, (client, run)


def _wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb): LevelDB-log blocks of 32 KiB after a 7-byte header,
    each chunk a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); payloads are W&B's
    protobuf Record."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # block trailer
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding to the end of the block
            position += room
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def read_wandb(run_dir: Path) -> tuple[dict, list]:
    from wandb.proto import wandb_internal_pb2

    found: dict = {}
    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for payload in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith(("_", "lorakit/")):
                    found.setdefault(key, {}).setdefault(row["lorakit/step"], []).append(value)
    return found, records


def read_trackio(run_name: str) -> dict:
    from trackio.sqlite_storage import SQLiteStorage

    found: dict = {}
    for row in SQLiteStorage.get_logs(PROJECT, run_name):
        for key, value in row.items():
            if "/" in key and isinstance(value, (int, float)):
                found.setdefault(key, {}).setdefault(row["step"], []).append(value)
    return found


def expected_from_metrics(run_dir: Path) -> dict:
    """metrics.jsonl as tracker metrics: {metric: {step: value}}."""
    expected: dict = {}
    for event in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in event_metrics(event).items():
            assert event["step"] not in expected.get(key, {}), f"metrics.jsonl has step {event['step']} twice"
            expected.setdefault(key, {})[event["step"]] = value
    return expected


def assert_same(found: dict, expected: dict, tracker: str, keys=None, rel: float = 1e-6) -> None:
    for key, steps in expected.items():
        if keys is not None and key not in keys:
            continue
        assert key in found, f"{tracker}: no {key} (has {sorted(found)})"
        got = found[key]
        assert sorted(got) == sorted(steps), f"{tracker} {key}: steps {sorted(got)} != {sorted(steps)}"
        for step, value in steps.items():
            assert len(got[step]) == 1, f"{tracker} {key}: step {step} logged {len(got[step])} times"
            assert got[step][0] == pytest.approx(value, rel=rel, abs=1e-9), f"{tracker} {key} step {step}"


# --- names and problems -------------------------------------------------------------------------------------

def test_report_to_names_and_problems(monkeypatch):
    assert tracker_names(None) == tracker_names("none") == tracker_names([]) == []
    assert tracker_names("TensorBoard, wandb,wandb") == ["tensorboard", "wandb"]
    assert tracker_names(["mlflow"]) == ["mlflow"]
    assert tracker_problems("tensorboard,wandb,mlflow,trackio") == []
    assert "unknown tracker 'comet'" in tracker_problems("comet")[0]
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        TrainConfig(report_to="tensorboard,neptune").validate()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert tracker_problems("wandb") == ["report_to wandb needs the wandb package: pip install 'lorakit[wandb]'"]


def test_flat_params_flattens_nested_options():
    assert flat_params({"r": 8, "targets": ["q", "v"], "training": {"lr": 0.1, "seed": None}}) == \
        {"r": "8", "targets": '["q", "v"]', "training.lr": "0.1", "training.seed": "null"}


# --- a short run, read back -----------------------------------------------------------------------------------

def _fit(run_dir: Path, names, callbacks=(), resume=False, name="tiny", **overrides):
    config = fast_config(max_steps=8, eval_every=3, save_every=2, report_to=names, resume=resume, **overrides)
    trackers = Trackers(names, run_dir, config.to_dict(), name, PROJECT, resume=resume)
    trainer = Trainer(tiny_lora_model(), random_examples(24), collate, config, run_dir,
                      eval_data=random_examples(6, seed=3), callbacks=[trackers, *callbacks], progress=False)
    result = trainer.fit()
    if not result.interrupted:
        trackers.finish(result.steps, {"eval_loss": result.final_eval_loss}, [run_dir / "loss.png"],
                        {"provenance": {"base_model": "tiny-llama", "data_fingerprint": "abc"}})
    return result


def test_every_step_reaches_every_tracker_with_the_values_of_metrics_jsonl(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _fit(run_dir, ALL)
    expected = expected_from_metrics(run_dir)
    assert sorted(expected["train/loss"]) == list(range(1, 9)) and sorted(expected["eval/loss"]) == [3, 6, 8]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_second", "eval/perplexity"} <= set(expected)

    assert_same(read_tensorboard(run_dir), expected, "tensorboard", rel=1e-6)  # (float32 in event files)
    mlflow_found, (client, run) = read_mlflow(run_dir, monkeypatch)
    assert_same(mlflow_found, expected, "mlflow")
    wandb_found, records = read_wandb(run_dir)
    assert_same(wandb_found, expected, "wandb")
    assert_same(read_trackio("tiny"), expected, "trackio")

    # the options and the provenance are the run's parameters; the files are kept where the tracker keeps files
    assert run.data.params["max_steps"] == "8" and run.data.params["provenance.base_model"] == "tiny-llama"
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss.png"]
    assert mlflow_found["score/eval_loss"] == {8: [pytest.approx(expected["eval/loss"][8])]}
    configs = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    keys = {u.key for c in configs for u in c.update} | {u.key for r in records
                                                         if r.WhichOneof("record_type") == "run" for u in r.run.config.update}
    assert {"r", "lr", "provenance.base_model"} <= keys
    assert any(r.WhichOneof("record_type") == "artifact" for r in records)


# --- killed with SIGKILL, then resumed ------------------------------------------------------------------------

def _fresh_process() -> None:
    """As a new `lorakit train` process starts: its own W&B service (this test process's is named in
    WANDB_SERVICE, which the child inherited), one torch thread."""
    import torch

    os.environ.pop("WANDB_SERVICE", None)
    torch.set_num_threads(1)


def _killed_child(run_dir: str, kill_at: int) -> None:
    _fresh_process()
    def kill(trainer, event):
        if event["event"] == "train" and event["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # after the trackers got this step; the checkpoint is older
    _fit(Path(run_dir), ALL, callbacks=[kill], name="killed")


def _resumed_child(run_dir: str) -> None:
    _fresh_process()
    _fit(Path(run_dir), ALL, resume=True, name="killed")


def _in_child(target, *args) -> int:
    """Run in a fresh process (spawned, not forked: a forked child would share this process's W&B service,
    which a real `kill -9` of lorakit takes down with it)."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(300)
    return process.exitcode


def test_a_killed_and_resumed_run_has_each_step_once_in_every_tracker(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert _in_child(_killed_child, str(run_dir), 5) == -signal.SIGKILL
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert all(state[name]["last"]["train"] == 5 for name in ("tensorboard", "wandb", "mlflow")), state
    assert [e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"] == [1, 2, 3, 4, 5]
    assert _in_child(_resumed_child, str(run_dir)) == 0  # resumes from step-4: step 5 is lived again

    expected = expected_from_metrics(run_dir)
    assert sorted(expected["train/loss"]) == list(range(1, 9))
    assert json.loads((run_dir / STATE_FILE).read_text())["wandb"]["run_id"] == state["wandb"]["run_id"]
    # steps the killed session reported keep their first values: the same loss, lr and gradient norm (resume is
    # exact); tokens/s, a clock reading, differs between the two sessions
    same = {"train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/epoch", "eval/loss", "eval/perplexity"}
    assert_same(read_tensorboard(run_dir), expected, "tensorboard", keys=same)
    found, (client, run) = read_mlflow(run_dir, monkeypatch)
    assert_same(found, expected, "mlflow", keys=same)
    assert run.info.status == "FINISHED" and run.info.run_id == state["mlflow"]["run_id"]
    wandb_found, records = read_wandb(run_dir)
    assert_same(wandb_found, expected, "wandb", keys=same)
    assert len({r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}) == 1
    assert_same(read_trackio("killed"), expected, "trackio", keys=same)
    for tracker, found in (("tensorboard", read_tensorboard(run_dir)), ("mlflow", found)):
        assert sorted(found["train/tokens_per_second"]) == list(range(1, 9)), tracker


# --- the command line -----------------------------------------------------------------------------------------

def test_lorakit_train_report_to_logs_scores_provenance_and_the_adapter(tmp_path, monkeypatch):
    from lorakit.cli.main import main

    model = write_tiny_model_dir(tmp_path / "model")
    data = write_chat_data(tmp_path / "train.jsonl", 24)
    out = tmp_path / "run"
    main(["train", "--model", model, "--data", data, "--out", str(out), "--max-steps", "4", "--batch-size", "4",
          "--seq-len", "64", "--device", "cpu", "--log-every", "1", "--save-every", "0", "--eval-every", "2",
          "--report-to", "tensorboard,mlflow", "--run-name", "cli-run", "--experiment", "sweep"])
    expected = expected_from_metrics(out)
    assert_same(read_tensorboard(out), expected, "tensorboard")
    found, (client, run) = read_mlflow(out, monkeypatch)
    assert_same(found, expected, "mlflow")
    assert client.get_experiment(run.info.experiment_id).name == "sweep" and run.info.run_name == "cli-run"
    summary = json.loads((out / "summary.json").read_text())
    assert found["score/eval_loss"][0] == [pytest.approx(summary["eval_loss_before"])]
    assert found["score/eval_loss"][4] == [pytest.approx(summary["eval_loss_after"])]
    assert found["summary/trainable_params"] == {4: [summary["trainable_params"]]}
    params = run.data.params
    assert params["report_to"] == '["tensorboard", "mlflow"]' and params["max_steps"] == "4"
    assert params["provenance.base_model"] and params["provenance.data_fingerprint"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "loss.png", "summary.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= \
        {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/lorakit.json"}
    assert not math.isnan(summary["eval_loss_after"])
