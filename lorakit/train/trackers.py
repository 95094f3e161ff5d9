"""Experiment trackers: `lorakit train --report-to tensorboard,wandb,mlflow,trackio`.

`Trackers` is a Trainer callback: every `train` and `eval` event written to metrics.jsonl goes to each
tracker asked for, under the same step number (names from `event_metrics`: train/loss, train/lr,
train/grad_norm, train/tokens_per_second, eval/loss, ...). The resolved options are the tracker run's
parameters; at the end `finish` adds the adapter's provenance (lorakit.json), the scores after training,
and the adapter and plots as files where the tracker keeps files (W&B, MLflow, trackio).

Each tracker's library is imported only when that tracker is asked for (each an extra: `lorakit[wandb]`
...). Offline by default: W&B in offline mode (unless WANDB_MODE says otherwise), MLflow in a file store
in the run folder (unless MLFLOW_TRACKING_URI is set), TensorBoard event files in <run>/tensorboard,
trackio in its local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio).

Resume. `trackers.json` in the run folder keeps each tracker's run id and the last step of each kind
(train, eval, score) it has received. A resumed run reopens the same tracker runs and does not send
again a step they already hold: the steps between the checkpoint and the kill are lived again, with the
same values (resume is exact), and each tracker still has each step once.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from lorakit.atomic import atomic_write_json
from lorakit.train.metrics import read_metrics

STATE_FILE = "trackers.json"
METRICS_FILE = "metrics.jsonl"  # (the Trainer's; loop.py imports torch)
TENSORBOARD_DIR, MLFLOW_DIR, WANDB_DIR = "tensorboard", "mlruns", "wandb"
DEFAULT_PROJECT = "lorakit"
# tracker -> (the module it needs, the lorakit extra that installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
KINDS = ("train", "eval", "score", "summary")
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_second", "epoch", "tokens")


def tracker_names(report_to: Union[str, Sequence[str], None]) -> list[str]:
    """'tensorboard,wandb' / ['tensorboard', 'wandb'] -> ['tensorboard', 'wandb']; None, 'none' or [] -> []."""
    if report_to is None:
        return []
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    return [] if names in (["none"], []) else list(dict.fromkeys(names))


def tracker_problems(report_to: Any) -> list[str]:
    """What is wrong with a --report-to value: unknown names, or a tracker whose package is missing."""
    if report_to is not None and not isinstance(report_to, (str, list, tuple)):
        return [f"report_to must be none or a list of trackers ({', '.join(REQUIREMENTS)}); got {report_to!r}"]
    problems = []
    for name in tracker_names(report_to):
        if name not in REQUIREMENTS:
            problems.append(f"report_to: unknown tracker {name!r}; choose from none, {', '.join(REQUIREMENTS)}")
            continue
        module, extra = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            problems.append(f"report_to {name} needs the {module} package: pip install 'lorakit[{extra}]'")
    return problems


def event_metrics(event: Mapping[str, Any]) -> dict[str, float]:
    """The tracker metrics of one metrics.jsonl event: train/<key> for a train event (TRAIN_KEYS),
    eval/<key without eval_> for every number of an eval event; {} for other events. Non-finite values
    (null in metrics.jsonl) are left out."""
    kind = event.get("event")
    if kind == "train":
        values = {f"train/{k}": event.get(k) for k in TRAIN_KEYS}
    elif kind == "eval":
        values = {f"eval/{k.removeprefix('eval_')}": v for k, v in event.items()
                  if k not in ("event", "step", "epoch")}
    else:
        return {}
    return {k: float(v) for k, v in values.items() if _is_number(v)}


def score_metrics(scores: Mapping[str, Any], prefix: str = "score") -> dict[str, float]:
    """The numbers among a run's scores (eval_accuracy, heldout_accuracy ...) as `prefix/<name>`."""
    return {f"{prefix}/{k}": float(v) for k, v in scores.items() if _is_number(v)}


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested options as flat `a.b` keys with string values (what every tracker accepts as parameters)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the `with` block (those already set are left as the user set them)."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrackerRun:
    """Where and under which names a tracker records one lorakit run."""

    run_dir: Path
    name: str
    project: str
    run_id: Optional[str]  # None: a new tracker run; else the one to continue


class Tracker:
    """One tracker: `start` opens (or reopens) its run and returns the run id; `log` sends numbers at a
    step; `log_params` string parameters; `log_files` files and folders; `finish` closes the run."""

    def __init__(self, run: TrackerRun):
        self.run = run

    def start(self, params: dict[str, str]) -> str:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_params(self, params: dict[str, str]) -> None:
        raise NotImplementedError

    def log_files(self, paths: Sequence[Path]) -> None:
        """Keep copies of `paths` with the run; trackers that keep no files ignore it."""

    def held_steps(self) -> Optional[dict[str, int]]:
        """The last step of each kind (train, eval, score) the tracker's own store holds, where it can say;
        None: trust trackers.json (written right after each report)."""
        return None

    def finish(self, status: str) -> None:
        """status: finished, failed or killed."""
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """torch's SummaryWriter writing event files to <run>/tensorboard (`tensorboard --logdir runs`)."""

    def start(self, params: dict[str, str]) -> str:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run.run_dir / TENSORBOARD_DIR))
        if self.run.run_id is None:
            self.log_params(params)
        return self.run.run_id or self.run.name

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it reported

    def log_params(self, params: dict[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("parameters", "| parameter | value |\n|---|---|\n" + table)
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """Weights & Biases, offline by default (files in <run>/wandb; `wandb sync` uploads them)."""

    STEP = "lorakit/step"

    def start(self, params: dict[str, str]) -> str:
        import wandb

        (self.run.run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        run_id = self.run.run_id or secrets.token_hex(4)  # (W&B ids: letters and digits)
        self.wandb = wandb
        self.handle = wandb.init(project=self.run.project, name=self.run.name, id=run_id, resume="allow",
                                 dir=str(self.run.run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                                 config=params, reinit="create_new", settings=wandb.Settings(console="off"))
        # Each report is its own row, written at once, with lorakit's step as the x-axis (as transformers'
        # W&B callback does): W&B's own step would hold a row open until the next step, and a train and an
        # eval report of the same step would collide.
        self.handle.define_metric(self.STEP)
        self.handle.define_metric("*", step_metric=self.STEP, step_sync=True)
        return run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.handle.log({**metrics, self.STEP: step})

    def log_params(self, params: dict[str, str]) -> None:
        self.handle.config.update(params, allow_val_change=True)

    def log_files(self, paths: Sequence[Path]) -> None:
        artifact = self.wandb.Artifact(f"lorakit-{self.handle.id}", type="model")
        for path in paths:
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            else:
                artifact.add_file(str(path), name=path.name)
        self.handle.log_artifact(artifact)

    def finish(self, status: str) -> None:
        self.handle.finish(exit_code=0 if status == "finished" else 1)

    def held_steps(self) -> Optional[dict[str, int]]:
        """Read from the run's offline files: W&B's service writes them in batches, and a `kill -9` loses
        whatever it had not written yet."""
        held: dict[str, int] = {}
        for row in wandb_history(self.run.run_dir / WANDB_DIR, self.handle.id):
            for key in row:
                kind = key.split("/", 1)[0]
                if "/" in key and kind in KINDS and self.STEP in row:
                    held[kind] = max(held.get(kind, -1), int(row[self.STEP]))
        return held


def wandb_history(folder: Path, run_id: str) -> Iterator[dict[str, Any]]:
    """The history rows in W&B's files of run `run_id` under `folder` (<run>/wandb), oldest file first.

    A .wandb file is W&B's transaction log: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks
    have a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and hold protobuf Records.
    A torn tail (a killed run) ends the file."""
    from wandb.proto import wandb_internal_pb2

    for path in sorted(folder.glob(f"*-{run_id}/run-{run_id}.wandb")):
        for payload in _log_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(payload)
            except Exception:  # (protobuf's DecodeError) a torn record: the file ends here
                break
            if record.WhichOneof("record_type") == "history":
                yield {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}


def _log_records(data: bytes) -> Iterator[bytes]:
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's trailer
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if kind == 0:  # zeros to the end of the block
            position += room
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if len(chunk) < length:
            return
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


class MlflowTracker(Tracker):
    """MLflow through its client; a file store in <run>/mlruns unless MLFLOW_TRACKING_URI is set."""

    STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def start(self, params: dict[str, str]) -> str:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            self.client = client = MlflowClient(tracking_uri=uri)
        else:  # MLflow 3.7+ refuses file stores unless MLFLOW_ALLOW_FILE_STORE says yes: asked for here only
            with _environment(MLFLOW_ALLOW_FILE_STORE="true"):
                uri = (self.run.run_dir / MLFLOW_DIR).resolve().as_uri()
                self.client = client = MlflowClient(tracking_uri=uri)
        if self.run.run_id is None:
            experiment = client.get_experiment_by_name(self.run.project)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.run.project)
            self.run_id = client.create_run(experiment_id, run_name=self.run.name).info.run_id
        else:
            self.run_id = self.run.run_id
            client.update_run(self.run_id, status="RUNNING")
        self.log_params(params)
        return self.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, str]) -> None:
        """Parameters the run does not hold yet (MLflow refuses to change a logged one; a resumed run whose
        options changed keeps the first values, and the change is in config.yaml and the warning)."""
        from mlflow.entities import Param

        held = self.client.get_run(self.run_id).data.params
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in held]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def log_files(self, paths: Sequence[Path]) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS[status])


class TrackioTracker(Tracker):
    """trackio in its local store (`trackio show` opens the dashboard); the run name is its id."""

    def start(self, params: dict[str, str]) -> str:
        import trackio

        self.handle = trackio.init(project=self.run.project, name=self.run.run_id or self.run.name,
                                   config=params, resume="allow" if self.run.run_id else "never",
                                   embed=False, auto_log_gpu=False, auto_log_cpu=False)
        return self.handle.name

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.handle.log(metrics, step=step)

    def log_params(self, params: dict[str, str]) -> None:
        self.handle.config.update(params)  # (sent with the next log)

    def held_steps(self) -> Optional[dict[str, int]]:
        """Read from trackio's store: its sender thread writes every half second, so a killed run may have
        reported steps the store never got."""
        from trackio.sqlite_storage import SQLiteStorage

        held: dict[str, int] = {}
        for row in SQLiteStorage.get_logs(self.run.project, self.handle.name):
            for key in row:
                kind = key.split("/", 1)[0]
                if "/" in key and kind in KINDS:
                    held[kind] = max(held.get(kind, -1), int(row["step"]))
        return held

    def log_files(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.handle.log_artifact(path, name=f"{self.handle.name}-{path.stem}",
                                     type="model" if path.is_dir() else "plot")

    def finish(self, status: str) -> None:
        self.handle.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                      "mlflow": MlflowTracker, "trackio": TrackioTracker}


class Trackers:
    """The trackers of one run, as a Trainer callback (`callbacks=[trackers]`); on ranks other than 0, and
    with no tracker asked for, it does nothing.

    Args:
        names: trackers to report to (`tracker_names(config.report_to)`).
        run_dir: the run folder (trackers.json, and the TensorBoard / W&B / MLflow files, go there).
        params: the resolved options, logged as the run's parameters (flattened to `a.b` keys).
        run_name: the tracker run's name; project: the W&B / trackio project, the MLflow experiment.
        resume: continue the tracker runs recorded in <run_dir>/trackers.json (if any).
    """

    def __init__(self, names: Sequence[str], run_dir: Path | str, params: Mapping[str, Any], run_name: str,
                 project: str = DEFAULT_PROJECT, resume: bool = False):
        from lorakit.errors import ConfigError
        from lorakit.lora.files import read_json_object

        problems = tracker_problems(list(names))
        if problems:
            raise ConfigError(problems, where="--report-to")
        self.run_dir = Path(run_dir)
        recorded = read_json_object(self.run_dir / STATE_FILE) if resume else {}
        self.trackers: dict[str, Tracker] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self.limits: dict[str, dict[str, int]] = {}  # steps up to these a tracker already holds: not sent again
        flat = flat_params(params)
        for name in names:
            before = recorded.get(name) if isinstance(recorded.get(name), dict) else {}
            tracker = TRACKERS[name](TrackerRun(self.run_dir, run_name, project, before.get("run_id")))
            run_id = tracker.start(flat)
            held = tracker.held_steps() if before else None
            held = dict(before.get("last", {})) if held is None else held
            self.trackers[name] = tracker
            self.limits[name] = dict(held)
            self.state[name] = {"run_id": run_id, "last": dict(held)}
        self.closed = False
        self._save_state()

    def __call__(self, trainer: Any, event: Mapping[str, Any]) -> None:
        """The Trainer callback: report train / eval events; close the runs when training stops early."""
        kind = event.get("event")
        if kind in ("train", "eval"):
            self.report(event_metrics(event), int(event["step"]), kind)
        elif kind == "resume":  # metrics.jsonl now ends at the checkpoint: bring every tracker up to it
            self.catch_up(read_metrics(self.run_dir / METRICS_FILE))
        elif kind == "stop":
            self.close("killed")
        elif kind == "nonfinite_loss" and event.get("policy") == "stop":
            self.close("failed")

    def report(self, metrics: Mapping[str, float], step: int, kind: str) -> None:
        """Send `metrics` at `step` to every tracker that does not hold a `kind` step this late yet."""
        if self.closed or not metrics:
            return
        for name, tracker in self.trackers.items():
            if step <= self.limits[name].get(kind, -1):
                continue
            tracker.log(dict(metrics), step)
            self.state[name]["last"][kind] = step
        self._save_state()

    def catch_up(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Send each tracker the logged steps it lacks (a killed run's tracker may have lost its last ones,
        W&B's and trackio's buffers: metrics.jsonl has them)."""
        for event in events:
            if event.get("event") in ("train", "eval"):
                self.report(event_metrics(event), int(event["step"]), event["event"])

    def finish(self, step: int, scores: Mapping[str, Any], files: Sequence[Path | str] = (),
               params: Mapping[str, Any] | None = None) -> None:
        """The end of a finished run: `scores` (after training) at `step`, `params` (the adapter's
        provenance) as more parameters, `files` (the adapter folder, plots) kept with the run; then close."""
        if self.closed:
            return
        self.report(score_metrics(scores), step, "score")
        existing = [Path(f) for f in files if Path(f).exists()]
        for tracker in self.trackers.values():
            if params:
                tracker.log_params(flat_params(params))
            tracker.log_files(existing)
        self.close("finished")

    def close(self, status: str = "finished") -> None:
        """Close every tracker run (status: finished, failed or killed); later reports are ignored."""
        if self.closed:
            return
        self.closed = True
        for tracker in self.trackers.values():
            tracker.finish(status)

    def _save_state(self) -> None:
        if self.trackers:
            atomic_write_json(self.run_dir / STATE_FILE, self.state)


def open_trackers(config: Any, run_dir: Path | str, scores_before: Optional[Mapping[str, Any]] = None) -> Trackers:
    """The trackers `config.report_to` asks for (none on ranks other than 0), with the scores before training
    reported at step 0. `config` is a TrainConfig (report_to, run_name, project, name, resume)."""
    from lorakit.train.distributed import is_main_process

    names = tracker_names(config.report_to) if is_main_process() else []
    run_dir = Path(run_dir)
    trackers = Trackers(names, run_dir, config.to_dict(), config.run_name or config.name or run_dir.name,
                        config.project or DEFAULT_PROJECT, resume=bool(config.resume))
    if scores_before:
        trackers.report(score_metrics(scores_before), 0, "score")
    return trackers


TRACKER_PRODUCTS = (STATE_FILE, TENSORBOARD_DIR, MLFLOW_DIR, WANDB_DIR)
"""What the trackers leave in a run folder (a fresh run moves an earlier run's aside with the rest)."""


def finish_trackers(callbacks: Sequence[Any], step: int, scores: Mapping[str, Any], summary: Mapping[str, Any],
                    adapter_dir: Path | str, plots: Sequence[Path | str] = ()) -> None:
    """Close the `Trackers` among a Trainer's callbacks after a finished run: the scores after training
    (score/<name>) and the summary figures (summary/<name>) at `step`, the adapter's lorakit.json as
    parameters (provenance.<key>), the adapter folder and the plots as files."""
    from lorakit.lora.files import META_NAME, read_json_object

    for trackers in (c for c in callbacks if isinstance(c, Trackers)):
        trackers.report(score_metrics(summary, "summary"), step, "summary")
        provenance = read_json_object(Path(adapter_dir) / META_NAME)
        trackers.finish(step, scores, [adapter_dir, *plots], {"provenance": provenance} if provenance else None)
