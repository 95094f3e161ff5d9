"""The training loop: `Trainer(model, data, collate_fn, config, run_dir).fit() -> TrainResult`.

The Trainer knows nothing about model loading or data formats: it gets an `nn.Module` whose
`forward(**batch)` returns an object with `.loss`, a sequence of examples, and a `collate_fn`
turning a list of examples into a batch dict. Trainable parameters are exactly those with
`requires_grad`.

Gradient accumulation. Each micro-batch's `.loss` is a mean over its own loss units (label tokens
after the causal shift, or examples for classification / QA; see `batching.loss_unit_counter`).
Before any backward pass the trainer counts the units n_i of every micro-batch in the window and
back-propagates loss_i * n_i / sum(n). The window's gradient is therefore the gradient of the mean
loss over *all* its tokens, the same as one big batch, however unevenly the tokens are spread;
a plain average of the micro-batch losses would over-weight short micro-batches.

Several processes (torchrun; see `distributed.py` and docs/DISTRIBUTED.md). Every rank walks the
same seeded order in global micro-batches of batch_size x world_size rows and trains on its own
slice. The counts n_i are summed over ranks before any backward pass, each rank back-propagates
loss_i * n_i / N_global, and the trainable gradients are then summed over ranks: the step equals one
process's step on the global batch. Only rank 0 writes files; a stop (signal, NaN) is agreed by all.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.atomic import disk_error
from lorakit.errors import DataError
from lorakit.progress import phase, progress_bar
from lorakit.fast.memory import keep_freed_memory
from lorakit.train import batching, distributed, fsdp, runtime
from lorakit.train.checkpoint import (TrainState, clean_interrupted_writes, config_differences,
                                      latest_good_checkpoint, resolve_resume,
                                      set_aside_later_checkpoints)
from lorakit.train.checkpointer import Checkpointer
from lorakit.train.config import TrainConfig
from lorakit.train.interrupt import StopFlag, stop_on_signals
from lorakit.train.metrics import MetricsLog, log_interval
from lorakit.train.optim import build_optimizer, build_scheduler, trainable_parameters
from lorakit.train.divergence import DivergenceWatch
from lorakit.train.result import NonFiniteLossError, TrainResult
from lorakit.train.report import PLOT_FILE, plot_metrics, write_resolved_config
from lorakit.train.storage import RunFolderError, describe, prepare_run_dir

METRICS_FILE = "metrics.jsonl"
Callback = Callable[["Trainer", dict], None]


@dataclass
class _StepOutcome:
    loss: float  # mean loss per unit over the window
    grad_norm: float  # before clipping
    lr: float  # base lr used for this step
    units: int
    input_tokens: int


class Trainer:
    """Fine-tunes the trainable parameters of `model` as `config` says, writing into `run_dir`.

    Args:
        model: the model to train (already on its device; e.g. a PEFT / lorakit LoRA model).
        train_data: examples, indexed by position; never modified.
        collate_fn: list of examples -> dict of tensors for `model(**batch)` (with labels).
        config: the options; deep-copied and validated (ConfigError lists every problem).
        run_dir: the run folder; None = `config.run_dir()`.
        eval_data: examples scored every `eval_every` steps and at the end (mean loss per unit).
        count_loss_units: batch -> how many units its mean loss averages over; default by task.
        callbacks: called as `callback(trainer, event)` after each metrics event is written.
        progress: show a tqdm bar (loss, tokens/s, ETA).
        loss_fn: `loss_fn(model, batch) -> loss`; default `model(**batch).loss` (e.g. lorakit.fast's
            label-only LM loss, which gives the same value faster).
        evaluate_fn: `evaluate_fn() -> {"eval_loss": ..., other eval_* figures}` in place of `evaluate()`
            (e.g. a task's own metrics, computed in the same pass as its loss).
    """

    def __init__(self, model: nn.Module, train_data: Sequence[Any],
                 collate_fn: Callable[[list], dict], config: TrainConfig,
                 run_dir: Optional[Path | str] = None, eval_data: Optional[Sequence[Any]] = None,
                 *, count_loss_units: Optional[batching.LossUnitCounter] = None,
                 callbacks: Sequence[Callback] = (), progress: bool = True,
                 loss_fn: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None,
                 evaluate_fn: Optional[Callable[[], dict[str, float]]] = None):
        self.config = copy.deepcopy(config).validate()
        if len(train_data) == 0:
            raise ValueError("the training data is empty")
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.collate_fn = collate_fn
        self.run_dir = Path(run_dir) if run_dir is not None else self.config.run_dir()
        self.count_loss_units = count_loss_units or batching.loss_unit_counter(self.config.task)
        self.callbacks, self.progress = list(callbacks), progress
        self.loss_fn = loss_fn or (lambda model, batch: model(**batch).loss)
        self.evaluate_fn = evaluate_fn
        self.device = runtime.model_device(model)
        if self.device.type == "cpu":  # freed activations stay in the process: no page faults every step
            keep_freed_memory()
        self.amp_dtype = runtime.autocast_dtype(self.device, self.config.dtype, runtime.frozen_weights_dtype(model))
        if self.amp_dtype is not None and self.device.type == "cpu" and not self.config.fsdp:
            runtime.keep_trainable_in_fp32(model)  # fp32 masters, half-precision matmuls (autocast)
        self.group = distributed.group_for(self.device)
        c = self.config
        self.global_batch = c.batch_size * self.group.world_size  # rows of one global micro-batch
        self.micro_batches_per_epoch = batching.micro_batches_per_epoch(len(train_data), self.global_batch)
        self.steps_per_epoch = batching.steps_per_epoch(len(train_data), self.global_batch, c.grad_accum)
        by_epochs = c.max_steps == -1
        self.total_steps = math.ceil(c.epochs * self.steps_per_epoch) if by_epochs else c.max_steps
        self.max_epochs = math.ceil(c.epochs) if by_epochs else None
        self.log_every = log_interval(c.log_every, self.total_steps)
        self.loss_module, self.sharded = self._prepare_model()
        self.params = [p for _, p in trainable_parameters(model)]  # (FSDP: this rank's shards)
        # finite divergence; the weight-norm sign only where this process holds whole tensors
        self._divergence = DivergenceWatch([] if self.sharded else self.params)
        self._divergence_reported = False
        self.optimizer = build_optimizer(model, c)
        self.scheduler = build_scheduler(self.optimizer, c, self.total_steps)
        self.grad_scaler = runtime.grad_scaler(self.device, self.amp_dtype)
        self.checkpointer = Checkpointer(self.run_dir, self.config, self.group, model, self.loss_module,
                                         self.sharded, self.optimizer, self.scheduler, self.grad_scaler)
        self.state = TrainState()
        self.stop_flag = StopFlag()
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE)
        self.last_checkpoint: Optional[Path] = None
        self._saved_step = -1
        self._stop_agreed = False  # a stop every rank has agreed on (see _agree_on_stop)
        self._filler_batch: Optional[dict] = None

    # --- public -------------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """End training after the current step, with a checkpoint (what SIGINT/SIGTERM do)."""
        self.stop_flag.request(reason)

    def fit(self) -> TrainResult:
        """Train until max_steps / epochs are done or a stop is requested; return the figures.

        Raises:
            NonFiniteLossError: NaN/inf loss with nan_policy "stop" (checkpoints stay as they were).
            CheckpointError: `resume` names a broken or unfitting checkpoint.
        """
        resumed_from = self._start()
        self._eval_seconds = 0.0  # spent evaluating in this session: not training time (see _clock)
        self._session = (self._clock(), self.state.train_seconds, self.state.input_tokens)
        self._interval = (self._clock(), self.state.input_tokens)
        with stop_on_signals(self.stop_flag), self._progress_bar() as bar:
            try:
                self._run_epochs(bar)
            except BaseException:  # NaN stop, a second Ctrl-C, a crash: still leave the plot
                self._tick()
                if self.group.is_main:
                    with contextlib.suppress(OSError):  # a full disk must not hide the first error
                        plot_metrics(self.metrics.path, self.run_dir / PLOT_FILE)
                raise
            return self._finish(resumed_from)

    def evaluate(self, data: Optional[Sequence[Any]] = None) -> dict[str, float]:
        """Mean loss per unit over `data` (default: the eval set), and its perplexity."""
        data = self.eval_data if data is None else data
        was_training = self.model.training
        self.model.eval()
        loss_sum, units, size = 0.0, 0, self.config.batch_size
        try:  # batches of similar lengths, so little padding (the mean over units does not depend on order)
            order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
        except (TypeError, KeyError, IndexError):  # examples of another form: as they come
            order = list(range(len(data)))
        label = "evaluating" if self.progress and self.group.is_main else None
        try:
            with torch.no_grad(), progress_bar(len(data), label, unit="example", leave=False) as bar:
                for start in range(0, len(data), size):
                    batch = self.collate_fn([data[i] for i in order[start:start + size]])
                    bar.update(len(order[start:start + size]))
                    n = self.count_loss_units(batch)
                    if n == 0:
                        continue
                    with runtime.autocast(self.device, self.amp_dtype):
                        loss = self.loss_module(batching.to_device(batch, self.device))
                    loss_sum += loss.float().item() * n
                    units += n
        finally:
            self.model.train(was_training)
        eval_loss = loss_sum / units if units else float("nan")
        if self.config.task not in ("causal-lm", "seq2seq"):  # a loss per example or tag has no perplexity
            return {"eval_loss": eval_loss, "eval_tokens": units}
        return {"eval_loss": eval_loss, "eval_perplexity": _perplexity(eval_loss), "eval_tokens": units}

    # --- start and finish ---------------------------------------------------------------------

    def _prepare_model(self) -> tuple[fsdp.LossModule, bool]:
        """Model + loss as one module; every rank starts from rank 0's trainable values (as DDP
        does); with --fsdp under torchrun the weights are then sharded. Returns (module, sharded)."""
        module = fsdp.LossModule(self.model, self.loss_fn)
        self.group.broadcast_parameters([p for _, p in trainable_parameters(self.model)])
        if not self.config.fsdp:
            return module, False
        if self.group.world_size == 1:
            warnings.warn("--fsdp shards the model over processes, but this is a single process; "
                          "start with torchrun --nproc-per-node N to shard", stacklevel=3)
            return module, False
        fsdp.shard(module, self.device)
        return module, True

    def _start(self) -> Optional[int]:
        """Prepare the run folder and the model; restore a checkpoint or seed a fresh run."""
        self.group.on_main(self._prepare_folder, "preparing the run folder")
        if self.config.gradient_checkpointing:
            runtime.enable_gradient_checkpointing(self.model)
        self.model.train()
        checkpoint = self.group.on_main(lambda: resolve_resume(self.config.resume, self.run_dir),
                                        "looking for the checkpoint to resume")
        if checkpoint is None:
            if self.config.resume is True and self.group.is_main:
                warnings.warn(f"--resume: no checkpoint in {self.run_dir}; starting fresh", stacklevel=3)
            runtime.seed_everything(self.config.seed + self.group.rank)  # own dropout masks per rank
            self.group.on_main(lambda: self._begin_record(0), "preparing the run folder")
            return None
        changed = config_differences(checkpoint, self.config.to_dict()) if self.group.is_main else []
        if changed:
            warnings.warn(f"resuming from {checkpoint} with changed options ({'; '.join(changed)}); "
                          "training continues but not on the exact same curve", stacklevel=3)
        self.state = self.checkpointer.load(checkpoint)
        self._saved_step, self.last_checkpoint = self.state.step, checkpoint
        self.group.on_main(lambda: self._begin_record(self.state.step), "preparing the run folder")
        self._emit({"event": "resume", "step": self.state.step, "checkpoint": str(checkpoint)})
        return self.state.step

    def _prepare_folder(self) -> None:
        prepare_run_dir(self.run_dir)
        clean_interrupted_writes(self.run_dir / "checkpoints")

    def _begin_record(self, step: int) -> None:
        """The run folder from `step` on (0: a fresh run): config.yaml written now that the run's start (or its
        checkpoint) is accepted, later checkpoints set aside, later metric lines dropped."""
        write_resolved_config(self.run_dir, self.config)
        self._set_aside_after(step)
        self.metrics.truncate_after(step)

    def _set_aside_after(self, step: int) -> None:
        moved = set_aside_later_checkpoints(self.run_dir, step)
        if moved:
            warnings.warn(f"checkpoints after step {step} in {self.run_dir} belong to an earlier "
                          f"attempt; renamed to {', '.join(p.name for p in moved)}", stacklevel=4)

    def _finish(self, resumed_from: Optional[int]) -> TrainResult:
        """Final evaluation (unless interrupted) and checkpoint; the result figures."""
        s, interrupted = self.state, self._stop_agreed
        evaluated_now = s.last_eval is not None and s.last_eval.get("step") == s.step
        if self.eval_data is not None and not interrupted and not evaluated_now:
            self._log_eval()
        if self._saved_step != s.step:
            self._save()
        if interrupted:
            self._emit({"event": "stop", "step": s.step, "reason": self.stop_flag.reason})
        self._tick()
        if self.group.is_main:
            plot_metrics(self.metrics.path, self.run_dir / PLOT_FILE)
        if self.sharded:  # callers score and save the model as usual afterwards
            fsdp.release(self.loss_module)
        pending = s.log_loss_sum / s.log_loss_steps if s.log_loss_steps else None
        last_eval = s.last_eval or {}
        return TrainResult(
            run_dir=str(self.run_dir), steps=s.step, total_steps=self.total_steps,
            epochs=self._epoch_float(), train_seconds=s.train_seconds,
            train_tokens=s.input_tokens, train_label_tokens=s.label_tokens,
            tokens_per_second=s.input_tokens / s.train_seconds if s.train_seconds > 0 else 0.0,
            final_loss=pending if pending is not None else s.last_logged_loss,
            final_eval_loss=last_eval.get("eval_loss"),
            final_eval_perplexity=last_eval.get("eval_perplexity"),
            skipped_batches=s.skipped_batches, interrupted=interrupted,
            resumed_from_step=resumed_from,
            last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            final_eval=dict(last_eval) if last_eval.get("step") == s.step else None)

    # --- the loop -----------------------------------------------------------------------------

    def _done(self) -> bool:
        s = self.state
        out_of_epochs = self.max_epochs is not None and s.epoch >= self.max_epochs
        return s.step >= self.total_steps or out_of_epochs or self._stop_agreed

    def _run_epochs(self, bar: tqdm) -> None:
        """Walk epochs and accumulation windows from the current state until done."""
        c, s = self.config, self.state
        self._agree_on_stop()
        while not self._done():
            order = batching.epoch_order(len(self.train_data), c.seed, s.epoch)
            if c.group_by_length:  # similar lengths share a micro-batch: far less padding
                order = batching.group_by_length(order, batching.example_lengths(self.train_data),
                                                 self.global_batch)
            epoch_windows = batching.windows(batching.micro_batches(order, self.global_batch),
                                             c.grad_accum)
            first = -(-s.micro_batch // c.grad_accum)  # windows already consumed (last may be short)
            steps_before = s.step
            for window in epoch_windows[first:]:
                self._train_window(window, bar)
                self._agree_on_stop()
                if self._done():
                    return
            if first == 0 and s.step == steps_before:
                self._no_progress()
            s.epoch, s.micro_batch = s.epoch + 1, 0

    def _no_progress(self) -> None:
        """A whole epoch without one optimizer step would repeat forever under max_steps."""
        if self.state.skipped_batches:
            raise NonFiniteLossError(
                f"every batch of epoch {self.state.epoch} had a NaN/inf loss and was skipped; "
                "stopping. Lower --lr or check the data.")
        raise DataError("no training batch has any label tokens to learn from (all labels are "
                        "-100: prompts longer than --seq-len, or completions masked away?)")

    def _agree_on_stop(self) -> None:
        """Every rank stops after the same step: a stop asked of any one (a signal, request_stop)
        counts for all. (One tiny all-reduce per step; nothing in a single process.)"""
        self._stop_agreed = self.group.any(self.stop_flag.requested)
        if self._stop_agreed:
            self.stop_flag.request("another process was asked to stop")  # kept if already set

    def _local_batch(self, micro_batch: list[int]) -> Optional[dict]:
        """This rank's rows of a global micro-batch, collated (None when it has no rows)."""
        rows = distributed.local_slice(micro_batch, self.config.batch_size, self.group.rank)
        return self.collate_fn([self.train_data[i] for i in rows]) if rows else None

    def _train_window(self, window: list[list[int]], bar: tqdm) -> None:
        """One optimizer step from one accumulation window, then log / eval / save as due."""
        batches = [self._local_batch(idx) for idx in window]
        outcome = self._optimizer_step(batches)
        self.state.micro_batch += len(window)
        if outcome is None:
            self._on_nonfinite()
            return
        if outcome.units == 0:  # every label masked: nothing learned, no step taken
            return
        s, c = self.state, self.config
        s.step += 1
        s.input_tokens += outcome.input_tokens
        s.label_tokens += outcome.units
        s.log_loss_sum += outcome.loss
        s.log_loss_steps += 1
        self._tick()
        bar.update(1)
        bar.set_postfix(loss=f"{outcome.loss:.4f}", tok_s=f"{self._session_rate():.0f}")
        self._check_divergence(outcome)
        if s.step % self.log_every == 0 or s.step == self.total_steps:
            self._log_train(outcome)
        if self.eval_data is not None and c.eval_every and s.step % c.eval_every == 0:
            self._log_eval()
        if c.save_every and s.step % c.save_every == 0:
            self._save()

    def _optimizer_step(self, batches: list[Optional[dict]]) -> Optional[_StepOutcome]:
        """Forward/backward this rank's micro-batches (weighted by the global window's loss units),
        sum the gradients over ranks, clip and step; None on a NaN/inf loss on any rank."""
        units = [self.count_loss_units(b) if b is not None else 0 for b in batches]
        local_tokens = sum(batching.count_input_tokens(b) for b in batches if b is not None)
        total, tokens = (int(v) for v in self.group.sum([sum(units), local_tokens]))
        self.optimizer.zero_grad(set_to_none=True)
        if total == 0:  # every label masked: nothing to learn from, not an error
            self._emit({"event": "empty_batch", "step": self.state.step + 1})
            return _StepOutcome(loss=float("nan"), grad_norm=0.0, lr=0.0, units=0, input_tokens=0)
        window_loss, finite = self._backward(batches, units, total)
        window_loss, nonfinite = self.group.sum([window_loss if finite else 0.0, 0.0 if finite else 1.0])
        if nonfinite:
            return None
        if not self.sharded:  # (FSDP reduce-scattered them during backward)
            self.group.reduce_gradients(self.params)
        self.grad_scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm or math.inf  # inf: measure the norm, change nothing
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(fsdp.full_tensor(norm))
        if not math.isfinite(grad_norm) and not self.grad_scaler.is_enabled():
            return None  # (with fp16 loss scaling, inf grads are routine: the scaler skips the step)
        lr = float(self.scheduler.get_last_lr()[0]) / self._group_ratio(0)  # (torchao keeps lr as a tensor)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.scheduler.step()
        return _StepOutcome(window_loss, grad_norm, lr, total, tokens)

    def _backward(self, batches: list[Optional[dict]], units: list[int],
                  total: int) -> tuple[float, bool]:
        """Back-propagate loss_i * n_i / total for each local micro-batch.

        Returns this rank's share of the window's mean loss, and whether every loss was finite.
        With FSDP every rank must run every forward/backward (they hold collectives), so a rank
        without rows runs a filler batch with weight 0, and the loss is scaled by the world size
        because FSDP averages the gradients over ranks where a sum is wanted.
        """
        scale = self.group.world_size if self.sharded else 1
        window_loss, finite = 0.0, True
        for batch, n in zip(batches, units):
            if n == 0:
                if not self.sharded:
                    continue
                batch = self._filler()
            with runtime.autocast(self.device, self.amp_dtype):
                loss = self.loss_module(batching.to_device(batch, self.device)).float()
            # backward first, then read the loss: reading it between the two would leave the GPU idle
            # while the backward is queued (a NaN loss only makes gradients that _on_nonfinite drops)
            self.grad_scaler.scale(loss * (n * scale / total)).backward()
            value = loss.item()
            if not math.isfinite(value):
                finite = False
                if not self.sharded:
                    break
            window_loss += value * n / total
        return window_loss, finite

    def _filler(self) -> dict:
        """A batch with loss units, for FSDP ranks that have none in a micro-batch (weight 0)."""
        if self._filler_batch is None:
            for i in range(min(64, len(self.train_data))):
                batch = self.collate_fn([self.train_data[i]])
                if self.count_loss_units(batch) > 0:
                    self._filler_batch = batch
                    break
            else:
                raise DataError("none of the first 64 training examples has a label token to learn from")
        return self._filler_batch

    def _on_nonfinite(self) -> None:
        """Apply nan_policy to a window whose loss (or gradient) was NaN/inf."""
        s = self.state
        self.optimizer.zero_grad(set_to_none=True)
        event = {"event": "nonfinite_loss", "step": s.step + 1, "epoch": self._epoch_float(),
                 "policy": self.config.nan_policy}
        if self.config.nan_policy == "skip":
            s.skipped_batches += 1
            self._emit({**event, "skipped_batches": s.skipped_batches})
            if not self.sharded and not all(bool(torch.isfinite(p).all()) for p in self.params):
                # (every later batch would be NaN too: skipping them would run out the epoch doing nothing)
                self._stop_run(f"the trainable weights are no longer finite at step {s.step + 1}, so every batch "
                               "gives a NaN/inf loss and skipping cannot recover",
                               "Lower --lr and start again, or resume from a checkpoint before the blow-up.")
            return
        self._emit(event)
        self._stop_run(f"the loss became NaN/inf at step {s.step + 1} (epoch {self._epoch_float():.2f})",
                       "Lower --lr, check the data, resume with --resume, or pass --nan-policy skip to drop such "
                       "batches.")

    def _check_divergence(self, outcome: _StepOutcome) -> None:
        """Apply nan_policy to a run that diverged with finite numbers (lorakit.train.divergence): "stop"
        raises as for a NaN (after logging this step, so the curve shows it); "skip" warns once and goes on."""
        reason = self._divergence.observe(self.state.step, outcome.loss, outcome.grad_norm)
        if reason is None or self._divergence_reported:
            return
        self._divergence_reported = True
        self._emit({"event": "diverged", "step": self.state.step, "reason": reason,
                    "policy": self.config.nan_policy})
        if self.config.nan_policy == "skip":
            warnings.warn(f"{reason}. Training goes on (--nan-policy skip); lower --lr and start again.", stacklevel=2)
            return
        self._log_train(outcome)
        self._stop_run(reason, "Lower --lr (or raise --warmup-steps) and start again, or pass --nan-policy skip "
                               "to only warn.")

    def _stop_run(self, what: str, advice: str) -> None:
        """nan_policy "stop": raise, naming the checkpoint a resume would start from."""
        good = latest_good_checkpoint(self.run_dir)
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        raise NonFiniteLossError(f"{what}; training stopped and {where}. {advice}")

    # --- logging, evaluation, checkpoints -----------------------------------------------------

    def _log_train(self, outcome: _StepOutcome) -> None:
        s = self.state
        now, (since, tokens_then) = self._clock(), self._interval
        loss = s.log_loss_sum / s.log_loss_steps
        s.log_loss_sum, s.log_loss_steps, s.last_logged_loss = 0.0, 0, loss
        self._interval = (now, s.input_tokens)
        self._emit({"event": "train", "step": s.step, "epoch": self._epoch_float(), "loss": loss,
                    "lr": outcome.lr, "grad_norm": outcome.grad_norm, "tokens": s.input_tokens,
                    "label_tokens": s.label_tokens,
                    "tokens_per_second": (s.input_tokens - tokens_then) / max(now - since, 1e-9),
                    "elapsed_seconds": s.train_seconds})

    def _log_eval(self) -> None:
        started = time.perf_counter()
        with phase("evaluating" if self.progress and self.group.is_main else None):
            figures = self.evaluate_fn() if self.evaluate_fn is not None else self.evaluate()
        self._eval_seconds += time.perf_counter() - started
        bar = getattr(self, "_bar", None)
        if bar is not None and not bar.disable:
            bar.start_t += time.perf_counter() - started
        self.state.last_eval = {**figures, "step": self.state.step}
        self._emit({"event": "eval", "step": self.state.step, "epoch": self._epoch_float(), **figures})

    def _save(self) -> None:
        """Checkpoint now (every rank takes part; rank 0 writes)."""
        self._tick()
        self.last_checkpoint = self.checkpointer.save(self.state)
        self._saved_step = self.state.step
        self._emit({"event": "checkpoint", "step": self.state.step, "path": str(self.last_checkpoint)})

    def _emit(self, event: dict) -> None:
        """Log an event (rank 0 writes metrics.jsonl) and tell the callbacks (on every rank)."""
        if self.group.is_main:
            try:
                self.metrics.write(event)
            except OSError as err:  # a full disk: the folder's free space said, as for every other write
                raise disk_error(err, self.metrics.path) or RunFolderError(
                    f"could not append to {self.metrics.path}: {describe(err)}. "
                    "Free space or make --out writable, then rerun with --resume") from err
        for callback in self.callbacks:
            callback(self, event)

    # --- small helpers ------------------------------------------------------------------------

    def _progress_bar(self) -> tqdm:
        """The training bar. Its ETA is the mean step rate of this session (see lorakit.progress), with the
        time spent evaluating taken out (_log_eval moves its start), so an evaluation does not swing it."""
        self._bar = progress_bar(self.total_steps, "train" if self.progress and self.group.is_main else None,
                                 unit="step", initial=self.state.step)
        return self._bar

    def _clock(self) -> float:
        """Seconds on a clock that stands still while the trainer evaluates (training time only)."""
        return time.perf_counter() - self._eval_seconds

    def _tick(self) -> None:
        """Bring state.train_seconds up to now (it sums every session of a resumed run)."""
        started, before, _ = self._session
        self.state.train_seconds = before + (self._clock() - started)

    def _session_rate(self) -> float:
        """Input tokens per second since this fit() began (the progress bar's figure)."""
        started, _, tokens_then = self._session
        return (self.state.input_tokens - tokens_then) / max(self._clock() - started, 1e-9)

    def _group_ratio(self, index: int) -> float:
        """How the group's peak lr relates to config.lr (LoRA+ B groups run at lr x ratio)."""
        return float(self.optimizer.param_groups[index]["initial_lr"]) / self.config.lr

    def _epoch_float(self) -> float:
        return self.state.epoch + self.state.micro_batch / self.micro_batches_per_epoch


def _perplexity(loss: float) -> float:
    if not math.isfinite(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")
