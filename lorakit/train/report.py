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


def plot_metrics(metrics_path: Path | str, png_path: Path | str) -> Path | None:
    """Draw train loss and eval loss against steps, lr on a second axis; write a PNG atomically.

    Returns the PNG path, or None when there is nothing to plot yet.
    """
    # The Agg canvas drawn directly: no display needed, and pyplot's global backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    events = read_metrics(metrics_path)
    train = [(e["step"], e["loss"], e.get("lr")) for e in events
             if e.get("event") == "train" and e.get("loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in events
             if e.get("event") == "eval" and e.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot([s for s, _, _ in train], [l for _, l, _ in train], label="train loss", color="C0")
    if evals:
        ax.plot([s for s, _ in evals], [l for _, l in evals], "o-", label="eval loss", color="C1")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    lrs = [(s, lr) for s, _, lr in train if lr is not None]
    if lrs:
        ax_lr = ax.twinx()
        ax_lr.plot([s for s, _ in lrs], [lr for _, lr in lrs], "--", color="C2", label="lr")
        ax_lr.set_ylabel("learning rate")
        more_lines, more_labels = ax_lr.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    ax.legend(lines, labels, loc="upper right")
    ax.set_title("lorakit training")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    png_path = Path(png_path)
    atomic_write(png_path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return png_path


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
