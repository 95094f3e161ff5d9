"""`Checkpointer`: the Trainer's checkpoints across processes - who gathers, who writes, who reads.

One process, or data-parallel ranks: every rank holds the same trainable values and optimizer state,
so rank 0 writes its own copy. With --fsdp the shards are gathered into full tensors first (every
rank takes part) and rank 0 writes them. Every rank's RNG states are gathered into rng.pt so each
rank gets its own dropout stream back on resume. On resume every rank reads the checkpoint rank 0
chose (multi-node runs need --out on a shared filesystem) and checks that all of them could.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.train import fsdp
from lorakit.train.checkpoint import (CheckpointError, TrainState, capture_rng, check_fits,
                                      checkpoint_dir, latest_good_checkpoint, load_trainable,
                                      read_checkpoint, restore_rank_rng, restore_training,
                                      rng_payload, saved_config, training_state, with_current_names,
                                      write_checkpoint)
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import LocalGroup
from lorakit.train.optim import trainable_parameters
from lorakit.train.storage import RunFolderError, describe


class Checkpointer:
    """Writes and restores `<run>/checkpoints/step-N/` for one Trainer (see module docstring)."""

    def __init__(self, run_dir: Path, config: TrainConfig, group: LocalGroup, model: nn.Module,
                 loss_module: nn.Module, sharded: bool, optimizer: torch.optim.Optimizer,
                 scheduler: Any, grad_scaler: Any):
        self.run_dir, self.config, self.group = run_dir, config, group
        self.model, self.loss_module, self.sharded = model, loss_module, sharded
        self.optimizer, self.scheduler, self.grad_scaler = optimizer, scheduler, grad_scaler

    def save(self, state: TrainState) -> Path:
        """Write the checkpoint of `state.step` (collective: every rank calls it); its folder."""
        state.world_size = self.group.world_size
        named = trainable_parameters(self.model)
        if self.sharded:
            params = fsdp.full_trainable(named)
            optimizer_state = fsdp.optimizer_state(self.loss_module, self.optimizer)
        else:
            params = {n: p.detach().contiguous().cpu() for n, p in named} if self.group.is_main else {}
            optimizer_state = None
        rng = self.group.gather(capture_rng())

        def write() -> Path:
            training = training_state(self.optimizer, self.scheduler, self.grad_scaler, optimizer_state)
            return self._write(state, params, training, rng_payload(rng))

        return self.group.on_main(write, f"writing checkpoint step-{state.step}")

    def _write(self, state: TrainState, params: dict, training: dict, rng: dict) -> Path:
        try:
            return write_checkpoint(self.run_dir, params, training, rng, state,
                                    self.config.to_dict(), self.config.keep_checkpoints)
        except OSError as err:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                good = latest_good_checkpoint(self.run_dir)
            raise RunFolderError(
                f"could not write checkpoint {checkpoint_dir(self.run_dir, state.step)}: "
                f"{describe(err)}. The last complete checkpoint ({good or 'none written yet'}) is "
                "untouched; free space or make --out writable, then rerun the same command with "
                "--resume") from err

    def load(self, path: Path) -> TrainState:
        """Restore parameters, optimizer, scheduler, scaler and this rank's RNG from `path`.

        Raises:
            CheckpointError: some rank cannot read it, it is broken, or it does not fit the model.
        """
        problem = None
        try:
            saved = read_checkpoint(path)
        except (CheckpointError, OSError) as err:
            problem = err
        if self.group.any(problem is not None):
            raise problem if problem is not None else CheckpointError(
                f"another process cannot read checkpoint {path}; with several nodes, --out must be "
                "on a filesystem every node shares")
        saved.params = with_current_names(saved.params, self.model)
        check_fits(saved.params, self.model, path)
        if self.sharded:
            if saved.training.get("layout") != "fsdp":
                raise CheckpointError(f"checkpoint {path} was written without --fsdp; resume it "
                                      "without --fsdp")
            fsdp.load_trainable(trainable_parameters(self.model), saved.params)
            fsdp.load_optimizer_state(self.loss_module, self.optimizer, saved.training["optimizer"])
        else:
            load_trainable(self.model, saved.params)
        restore_training(saved.training, self.optimizer, self.scheduler, self.grad_scaler, path,
                         optimizer_loaded=self.sharded)
        self._restore_rng(saved.rng, saved.state, path)
        return saved.state

    def _restore_rng(self, rng: dict, state: TrainState, path: Path) -> None:
        world = self.group.world_size
        same = restore_rank_rng(rng, self.group.rank, world)
        if self.group.is_main and (not same or state.world_size != world):
            saved = saved_config(path)
            before = saved.get("batch_size", 0) * saved.get("grad_accum", 0) * state.world_size
            now = self.config.batch_size * self.config.grad_accum * world
            batch = f"the global batch is the same ({now})" if before == now else \
                f"the global batch differs ({before} -> {now})"
            warnings.warn(f"checkpoint {path} was written by {state.world_size} process(es), this run has {world}: "
                          f"the dropout masks differ from the original run, and {batch}", stacklevel=4)
        if not same:  # every rank got rank 0's states: give each its own stream again
            torch.manual_seed(self.config.seed + 7919 * (state.step + 1) + self.group.rank)
        state.world_size = world
