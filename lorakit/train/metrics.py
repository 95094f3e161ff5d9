"""`metrics.jsonl`: one JSON object per event (train log, eval, skipped batch, resume, stop).

Every line has `event` and `step`. Train lines add epoch, loss, lr, grad_norm, tokens,
label_tokens, tokens_per_second, elapsed_seconds; eval lines add eval_loss, eval_perplexity,
eval_tokens. Non-finite numbers are written as null (JSON has no NaN).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from lorakit.atomic import atomic_write_text

LOG_POINTS = 50
"""About how many train lines a run logs when --log-every is not given."""
MAX_LOG_INTERVAL = 25
"""... and at most this many steps apart (a long run keeps a detailed curve)."""


def log_interval(log_every: Optional[int], total_steps: int) -> int:
    """Steps between train lines: `log_every`, or without it about LOG_POINTS over the run (1 to
    MAX_LOG_INTERVAL steps apart), so a 30-step run logs every step and a 4-step run still has its points."""
    if log_every is not None:
        return log_every
    return max(1, min(MAX_LOG_INTERVAL, round(total_steps / LOG_POINTS)))


def json_safe(value: Any) -> Any:
    """`value` with NaN/inf floats replaced by None, recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Every event in a metrics.jsonl file (a torn last line, from a killed run, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


class MetricsLog:
    """Appends events to `metrics.jsonl`, flushing each line so a crash loses at most one."""

    def __init__(self, path: Path | str):
        self.path = Path(path)  # its folder is created by whoever starts the run (Trainer._start)

    def write(self, event: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(event), sort_keys=False) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop events logged after `step` (a resumed run re-lives those steps and logs them again)."""
        kept: Iterable[dict] = [e for e in read_metrics(self.path) if e.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in kept))
