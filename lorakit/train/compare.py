"""Comparing finished runs (`lorakit runs compare RUN_DIR...`): the options that differ, the final figures,
and the loss curves on shared axes. Reads only what every run folder holds (config.yaml, metrics.jsonl,
summary.json), so a sweep on one machine needs no tracker."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from lorakit.atomic import atomic_write
from lorakit.errors import ConfigError
from lorakit.train.metrics import read_metrics
from lorakit.train.report import CONFIG_FILE, SUMMARY_FILE

METRICS_FILE = "metrics.jsonl"  # (the Trainer's name for it; loop.py imports torch)
# Options that name a run rather than shape it: never "what differs".
IDENTITY_OPTIONS = ("out", "name", "run_name", "resume", "report_to", "project", "device")
# The final figures shown, in this order, when a run has them (summary.json; *_after scores are added).
FIGURES = ("steps", "final_loss", "final_eval_loss", "final_eval_perplexity", "retention", "tokens_per_second",
           "train_seconds", "trainable_params", "adapter_bytes")


@dataclass
class RunRecord:
    """What one run folder says: its options, its metric events and its summary figures."""

    path: Path
    options: dict[str, Any]
    events: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)


def read_run(path: Path | str) -> RunRecord:
    """A run folder's record; a ConfigError naming the folder when it holds no run."""
    path = Path(path)
    config, metrics = path / CONFIG_FILE, path / METRICS_FILE
    if not config.is_file() and not metrics.is_file():
        raise ConfigError([f"{path} is not a lorakit run folder: it has neither {CONFIG_FILE} nor {METRICS_FILE} "
                           "(give the folders `lorakit train --out` wrote)"], where="runs compare")
    try:
        options = yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{config}: not valid YAML ({err})"], where="runs compare") from None
    summary_path = path / SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    except ValueError:
        summary = {}
    return RunRecord(path, options if isinstance(options, dict) else {}, read_metrics(metrics),
                     summary if isinstance(summary, dict) else {})


def differing_options(runs: Sequence[RunRecord]) -> list[str]:
    """The option names whose values are not the same in every run (identity options left out)."""
    names = sorted({k for run in runs for k in run.options} - set(IDENTITY_OPTIONS))
    return [k for k in names if len({json.dumps(run.options.get(k), sort_keys=True, default=str) for run in runs}) > 1]


def final_figures(run: RunRecord) -> dict[str, Any]:
    """The run's final figures: summary.json's, or for a run without one (unfinished) the last train loss
    and eval loss of metrics.jsonl."""
    figures = {k: run.summary[k] for k in FIGURES if run.summary.get(k) is not None}
    figures.update({k: v for k, v in run.summary.items() if k.endswith("_after") and isinstance(v, (int, float))})
    train = [e for e in run.events if e.get("event") == "train" and e.get("loss") is not None]
    evals = [e for e in run.events if e.get("event") == "eval" and e.get("eval_loss") is not None]
    if train:
        figures.setdefault("steps", train[-1]["step"])
        figures.setdefault("final_loss", train[-1]["loss"])
    if evals:
        figures.setdefault("final_eval_loss", evals[-1]["eval_loss"])
    return figures


def run_label(run: RunRecord, differing: Sequence[str]) -> str:
    """'r8' style legend text: the folder name and what differs in it (r=8, lr=0.001)."""
    shown = ", ".join(f"{k}={_short(run.options.get(k))}" for k in differing[:4])
    return f"{run.label} ({shown})" if shown else run.label


def comparison_table(runs: Sequence[RunRecord]) -> str:
    """One text table: a column per run; rows for the options that differ, then the final figures."""
    differing = differing_options(runs)
    figures = [final_figures(run) for run in runs]
    names = [k for k in FIGURES if any(k in f for f in figures)]
    names += sorted({k for f in figures for k in f} - set(FIGURES))
    rows = [("run", [run.label for run in runs])]
    rows += [(k, [_short(run.options.get(k)) for run in runs]) for k in differing]
    if not differing:
        rows.append(("(options)", ["all the same" for _ in runs]))
    rows += [(k, [_number(f.get(k)) for f in figures]) for k in names]
    first = max(len(name) for name, _ in rows)
    widths = [max(len(values[i]) for _, values in rows) for i in range(len(runs))]
    lines = []
    for index, (name, values) in enumerate(rows):
        lines.append(f"{name:<{first}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths)))
        if index == 0 or (differing and index == len(differing)):
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def plot_comparison(runs: Sequence[RunRecord], png_path: Path | str) -> Optional[Path]:
    """Train loss (and eval loss, where any run has one) of every run against the optimizer step, on shared
    axes, the legend naming what differs; written atomically. None when no run has a loss yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    differing = differing_options(runs)
    curves = [(run, _series(run, "train", "loss"), _series(run, "eval", "eval_loss")) for run in runs]
    if not any(train or evals for _, train, evals in curves):
        return None
    has_eval = any(evals for _, _, evals in curves)
    fig = Figure(figsize=(12 if has_eval else 8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True) if has_eval else [fig.add_subplot(1, 1, 1)]
    markers = "osD^v<>ph*"  # runs whose curves coincide (the same first steps) stay visible by their markers
    for index, (run, train, evals) in enumerate(curves):
        label, color = run_label(run, differing), f"C{index % 10}"
        style = {"label": label, "color": color, "marker": markers[index % len(markers)], "markersize": 8 - index % 4,
                 "markerfacecolor": "none" if index % 2 else color}
        if train:
            axes[0].plot(*zip(*train), **style)
        if has_eval and evals:
            axes[1].plot(*zip(*evals), **style)
    titles = ["train loss", "eval loss"]
    for ax, title in zip(axes, titles):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    what = ", ".join(differing[:4]) if differing else "same options"
    fig.suptitle(f"lorakit runs compared ({what})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    png_path = Path(png_path)
    atomic_write(png_path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return png_path


def _series(run: RunRecord, event: str, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in run.events if e.get("event") == event and e.get(key) is not None]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _short(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"
