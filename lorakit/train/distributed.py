"""Data-parallel training across processes started by `torchrun`: joining the group, who writes, syncing.

    torchrun --nproc-per-node 2 -m lorakit train --data d.jsonl --batch-size 2

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in every process it starts; `init_distributed` reads
them, joins the process group (NCCL on CUDA, gloo on CPU) and pins each process to cuda:LOCAL_RANK.
Without those variables (plain `lorakit train`) nothing here does anything and one process trains.

What is synchronised, and why not DDP: only the trainable parameters' gradients, once per optimizer
step, by one all-reduce of a flat buffer (`LocalGroup` / `ProcessGroup.reduce_gradients`). LoRA
gradients are a few MB at most, so DDP's bucketing and overlap buy little, while doing it by hand
(a) reduces once per accumulation window whatever the micro-batch count (DDP needs `no_sync`),
(b) works with loss functions that call a sub-module directly (lorakit.fast's label-only loss
bypasses the wrapper's forward, which DDP needs to see), (c) lets a rank with no rows in the last,
short micro-batch skip its forward (DDP would hang waiting for its gradients), and (d) makes the
loss normalisation explicit: each rank back-propagates loss_i * n_i / N, where N is the number of
loss units (label tokens) of the whole *global* window, and the gradients are summed, not averaged.
With `--fsdp`, FSDP2's reduce-scatter does the syncing instead (see `fsdp.py`).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LorakitError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(LorakitError):
    """The process group cannot be set up, or another rank failed."""


def launched_by_torchrun() -> bool:
    """True when torchrun's RANK / WORLD_SIZE / LOCAL_RANK are all set (even for one process)."""
    return all(name in os.environ for name in ENV_VARS)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes logs, checkpoints and the adapter."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def init_distributed(config: Any) -> Any:
    """Join torchrun's process group if this process was started by torchrun; else return `config`.

    Args:
        config: a `TrainConfig`; never modified.
    Returns:
        `config`, or a copy whose `device` is this process's device: cuda:LOCAL_RANK when CUDA is
        used (NCCL), cpu otherwise (gloo).
    Raises:
        DistributedError: the environment variables are malformed, the device choice cannot work
            with several processes (mps, an explicit cuda:N), or there are fewer GPUs than processes.
    """
    if not launched_by_torchrun():
        return config
    try:
        local_rank, size = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError as err:
        raise DistributedError(f"torchrun's LOCAL_RANK / WORLD_SIZE are not integers ({err}); "
                               "start the run with torchrun or unset them") from err
    device = _process_device(config.device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_destroy)
    if rank() == 0 and size > 1:
        print(f"lorakit: distributed training on {size} processes ({dist.get_backend()}); "
              f"rank 0 writes the run folder", flush=True)
    return dataclasses.replace(config, device=str(device))


def _process_device(word: str, local_rank: int) -> torch.device:
    """The device of the process with `local_rank` for the --device option `word`."""
    if word == "mps":
        raise DistributedError("--device mps cannot be used with torchrun (one device only); "
                               "use --device cpu, or train without torchrun")
    if word.startswith("cuda:"):
        raise DistributedError(f"--device {word} names one GPU, but under torchrun every process uses "
                               "cuda:LOCAL_RANK; pass --device cuda (or auto) and choose GPUs with "
                               "CUDA_VISIBLE_DEVICES")
    if word == "cpu" or (word == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError("--device cuda was given but CUDA is not available; use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(f"LOCAL_RANK {local_rank} has no GPU: this node has "
                               f"{torch.cuda.device_count()}; start at most that many processes per "
                               "node (--nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dist.destroy_process_group()


def local_slice(micro_batch: list[int], per_rank: int, rank_: int) -> list[int]:
    """This rank's rows of a global micro-batch: rank r takes positions [r*per_rank, (r+1)*per_rank).

    Every rank walks the same seeded permutation in global micro-batches of per_rank x world rows, so
    the slices are disjoint and together are exactly what one process with the global batch reads.
    (A short last micro-batch can leave a rank with no rows.)
    """
    return micro_batch[rank_ * per_rank:(rank_ + 1) * per_rank]


class LocalGroup:
    """The single-process case: every collective is the identity."""

    world_size, rank, is_main = 1, 0, True

    def sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values]

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        pass

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        pass

    def gather(self, obj: Any) -> Optional[list[Any]]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def on_main(self, action: Callable[[], Any], what: str) -> Any:
        return action()


class ProcessGroup(LocalGroup):
    """Collectives over the default process group, on `device` (a CUDA device for NCCL)."""

    def __init__(self, device: torch.device):
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (in float64, so token counts stay exact)."""
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks with one all-reduce (a missing grad counts as 0)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(self.device, torch.float32) for g in grads])  # (n_trainable,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param in params:
            n = param.numel()
            param.grad = flat[offset:offset + n].view_as(param).to(param.device, param.dtype)
            offset += n

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Give every rank rank 0's values (as DDP does at construction)."""
        with torch.no_grad():
            for param in params:
                buffer = param.detach().to(self.device).clone()
                dist.broadcast(buffer, src=0)
                param.copy_(buffer.to(param.device))

    def gather(self, obj: Any) -> Optional[list[Any]]:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, action: Callable[[], Any], what: str) -> Any:
        """Run `action` on rank 0 and give its result to every rank; if it fails, every rank raises
        (so nobody waits forever in the next collective)."""
        error, result = None, None
        if self.is_main:
            try:
                result = action()
            except Exception as err:  # re-raised below on rank 0 itself, unchanged
                error = err
        message, result = self.broadcast(
            (None if error is None else f"{type(error).__name__}: {error}", result))
        if error is not None:
            raise error
        if message is not None:
            raise DistributedError(f"rank 0 failed while {what}: {message}")
        return result


def group_for(device: torch.device) -> LocalGroup:
    """A `ProcessGroup` when a multi-process group is initialised, else a `LocalGroup`."""
    return ProcessGroup(device) if is_distributed() else LocalGroup()
