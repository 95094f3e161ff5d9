"""What a fit() ends with: its figures (`TrainResult`), or the error that stopped a run going wrong."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from lorakit.errors import LorakitError


class NonFiniteLossError(LorakitError):
    """The loss became NaN or infinite and nan_policy is "stop"."""


@dataclass
class TrainResult:
    """Figures of a finished (or interrupted) fit(); `summary_figures()` feeds summary.json."""

    run_dir: str
    steps: int
    total_steps: int
    epochs: float
    train_seconds: float
    """Wall-clock seconds in fit() over all sessions, checkpoints included, evaluation left out (so that
    tokens_per_second is the training's own rate)."""
    train_tokens: int
    """Non-padding input tokens processed by successful optimizer steps."""
    train_label_tokens: int
    """Loss units (label tokens, or examples for seq-cls / qa) those steps learned from."""
    tokens_per_second: float
    """train_tokens / train_seconds."""
    final_loss: Optional[float]
    """Mean train loss of the last logging interval."""
    final_eval_loss: Optional[float]
    final_eval_perplexity: Optional[float]
    skipped_batches: int
    interrupted: bool
    resumed_from_step: Optional[int]
    last_checkpoint: Optional[str]
    final_eval: Optional[dict] = None
    """Every figure of the evaluation at the last step (None when it did not run there): callers reuse it
    instead of evaluating the same data again."""

    def summary_figures(self) -> dict[str, Any]:
        keys = ("train_seconds", "train_tokens", "train_label_tokens", "tokens_per_second",
                "steps", "epochs", "final_loss", "final_eval_loss", "final_eval_perplexity",
                "skipped_batches", "interrupted")
        return {k: v for k, v in asdict(self).items()
                if k in keys and not (k == "final_eval_perplexity" and v is None)}  # (none for classifiers)
