"""Training: `TrainConfig` (every `lorakit train` option), the `Trainer` loop, resumable
checkpoints and the run's report files (metrics.jsonl, loss.png, config.yaml, summary.json);
data-parallel and FSDP2 training under torchrun (`distributed.py`, `fsdp.py`, docs/DISTRIBUTED.md);
`hf_trainer.AdapterTrainer` for users of transformers' own Trainer (imported from there, not here).

    from lorakit.train import TrainConfig, Trainer, write_summary
    result = Trainer(model, examples, collate_fn, TrainConfig(max_steps=100), "runs/demo").fit()
    write_summary("runs/demo", {**result.summary_figures(), "trainable_params": ...})
"""
from lorakit.train.checkpoint import (CheckpointError, TrainState, latest_good_checkpoint,
                                      load_checkpoint, resolve_resume, save_checkpoint,
                                      verify_checkpoint)
from lorakit.train.config import TASK_TYPES, TrainConfig
from lorakit.train.distributed import barrier, init_distributed, is_main_process
from lorakit.train.loop import NonFiniteLossError, Trainer, TrainResult
from lorakit.train.metrics import read_metrics
from lorakit.train.optim import build_optimizer, build_param_groups, build_scheduler, lr_factor
from lorakit.train.report import plot_metrics, write_resolved_config, write_summary
from lorakit.train.runtime import seed_everything
from lorakit.train.storage import RunFolderError, prepare_run_dir

__all__ = [
    "TrainConfig", "TASK_TYPES", "Trainer", "TrainResult", "TrainState", "NonFiniteLossError",
    "CheckpointError", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
    "latest_good_checkpoint", "resolve_resume", "build_optimizer", "build_param_groups",
    "build_scheduler", "lr_factor", "read_metrics", "plot_metrics", "write_resolved_config",
    "write_summary", "seed_everything", "init_distributed", "is_main_process", "barrier",
    "RunFolderError", "prepare_run_dir",
]
