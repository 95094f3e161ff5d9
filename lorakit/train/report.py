"""What a run leaves for people and programs: the loss plot, the resolved config, `summary.json`."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Mapping

import yaml

from lorakit.atomic import atomic_write, atomic_write_json, atomic_write_text
from lorakit.train.metrics import json_safe, read_metrics

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
PLOT_FILE = "loss.png"


def plot_metrics(metrics_path: Path | str, png_path: Path | str, title: str | None = None) -> Path | None:
    """Draw `metrics_figure` of the metrics file and write it as a PNG atomically. The title names the run:
    `title`, else the run folder's name with the model, task and data its config.yaml records.

    Returns the PNG path, or None when there is nothing to plot yet.
    """
    fig = metrics_figure(read_metrics(metrics_path), title or run_title(Path(png_path).parent))
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    png_path = Path(png_path)
    atomic_write(png_path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return png_path


def metrics_figure(events: list[dict[str, Any]], title: str):
    """A matplotlib Figure: train and eval loss against steps in the top panel, the learning rate in its own
    panel below (on one axis with the loss, its line hid the loss curve), every point marked (a short run has
    few). None when there is no loss to draw."""
    # The Agg canvas drawn directly: no display needed, and pyplot's global backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train" and e.get("loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in events
             if e.get("event") == "eval" and e.get("eval_loss") is not None]
    lrs = [(e["step"], e["lr"]) for e in events if e.get("event") == "train" and e.get("lr") is not None]
    if not train and not evals:
        return None
    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        loss_ax.plot(*zip(*train), marker="o", markersize=_marker_size(len(train)), lw=1.2, color="C0",
                     label=f"train loss ({len(train)} points)")
    if evals:
        loss_ax.plot(*zip(*evals), marker="s", markersize=5, lw=1.2, color="C1", label="eval loss")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="upper right")
    if lrs:
        lr_ax.plot(*zip(*lrs), marker=".", markersize=_marker_size(len(lrs)), lw=1, color="C2")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.grid(alpha=0.3)
    lr_ax.set_xlabel("optimizer step")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers (a 4-step run: 1, 2, 3, 4)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _marker_size(points: int) -> float:
    """Big markers when there are few points (each one matters), small ones when the line is dense."""
    return 5.0 if points <= 30 else 3.0 if points <= 200 else 0.0


def run_title(run_dir: Path) -> str:
    """'lorakit run NAME: model M, task T, data D' from the run folder and its config.yaml (what it records)."""
    parts = []
    try:
        recorded = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        recorded = {}
    if isinstance(recorded, dict):
        for key in ("model", "task", "data"):
            if recorded.get(key):
                parts.append(f"{key} {Path(str(recorded[key])).name if key == 'data' else recorded[key]}")
    if isinstance(recorded, dict) and not recorded.get("data") and recorded:
        parts.append("built-in demo data")
    return f"lorakit run {run_dir.resolve().name}" + (": " + ", ".join(parts) if parts else "")


def write_resolved_config(run_dir: Path | str, config: Any) -> Path:
    """Write the run's resolved options to `<run>/config.yaml` (atomically).

    `config` is a dataclass (e.g. `TrainConfig`) or a mapping; it is copied, never modified.
    """
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    text = yaml.safe_dump(json_safe(values), sort_keys=False, allow_unicode=True)
    path = Path(run_dir) / CONFIG_FILE
    atomic_write_text(path, text)
    return path


def write_summary(run_dir: Path | str, figures: Mapping[str, Any]) -> Path:
    """Write `<run>/summary.json` atomically: the run's last act, read by programs.

    NaN / inf become null so the file stays valid JSON.
    """
    path = Path(run_dir) / SUMMARY_FILE
    atomic_write_json(path, json_safe(dict(figures)))
    return path
