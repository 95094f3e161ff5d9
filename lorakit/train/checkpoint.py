"""Resumable checkpoints: `<run>/checkpoints/step-<N>/`, written atomically, verified on load.

Layout of one checkpoint folder:

    trainable.safetensors   every parameter with requires_grad, keyed by its named_parameters() name
    optimizer.pt            {"optimizer": AdamW state, "scheduler": LambdaLR state, "grad_scaler": ...,
                            "layout": "plain" (optimizer.state_dict()) or "fsdp" (full, name-keyed)}
    rng.pt                  python, numpy, torch CPU (and CUDA) generator states; from a run of N
                            processes also "ranks": every rank's states, in rank order
    trainer_state.json      step, epoch, position in the epoch, token counts, ... (`TrainState`)
    config.json             the TrainConfig of the run that wrote it
    checksums.json          sha256 of every file above; a checkpoint whose files are missing or
                            differ is skipped with a warning and the previous good one is used

`.pt` files are read with `torch.load(weights_only=True)`: they hold tensors and plain data only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.atomic import atomic_directory
from lorakit.errors import LorakitError
from lorakit.lora.files import read_json_object
from lorakit.train.optim import trainable_parameters

PARAMS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.json"
REQUIRED_FILES = (PARAMS_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, CONFIG_FILE)
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(LorakitError):
    """A checkpoint cannot be used: corrupted, incomplete, or made for a different model."""


@dataclass
class TrainState:
    """Where training stands; everything besides tensors that an exact resume needs."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """The epoch being read (0-based)."""
    micro_batch: int = 0
    """Micro-batches of `epoch` already consumed (always at an accumulation-window boundary)."""
    input_tokens: int = 0
    """Non-padding input tokens processed so far."""
    label_tokens: int = 0
    """Units the loss averaged over so far (label tokens, or examples for classification / QA)."""
    skipped_batches: int = 0
    """Accumulation windows dropped because of a NaN/inf loss (nan_policy=skip)."""
    train_seconds: float = 0.0
    """Wall-clock seconds spent in fit(), summed over resumed sessions."""
    log_loss_sum: float = 0.0
    """Sum of step losses since the last metrics line (so resumed log lines match)."""
    log_loss_steps: int = 0
    """Steps since the last metrics line."""
    last_logged_loss: Optional[float] = None
    """The loss written in the last metrics line."""
    last_eval: Optional[dict] = None
    """The last evaluation figures (eval_loss, eval_perplexity, eval_tokens)."""
    world_size: int = 1
    """Processes that trained (the global batch is batch_size x world_size x grad_accum)."""

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# --- RNG ------------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain data (safe for weights_only load)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_payload(states: list[dict[str, Any]]) -> dict[str, Any]:
    """What rng.pt holds for the RNG states of every rank (rank 0's at the top level)."""
    return states[0] if len(states) == 1 else {**states[0], "ranks": states}


def restore_rank_rng(saved: dict[str, Any], rank: int, world_size: int) -> bool:
    """Restore this rank's generators from rng.pt; False when the saved run had another number of
    processes (rank 0's states are restored then, and dropout will not repeat the old run)."""
    ranks = saved.get("ranks") or [saved]
    if len(ranks) == world_size:
        restore_rng(ranks[rank])
        return True
    restore_rng(ranks[0])
    return False


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- files ----------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dir(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def list_checkpoints(checkpoints: Path | str) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-<N>` folder, oldest first. Does not verify them."""
    root = Path(checkpoints)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def verify_checkpoint(path: Path | str) -> list[str]:
    """Problems that make the checkpoint unusable; an empty list means it is intact."""
    path = Path(path)
    try:
        expected = json.loads((path / CHECKSUMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"{CHECKSUMS_FILE} missing or unreadable ({err.__class__.__name__})"]
    problems = [f"{name} is not listed in {CHECKSUMS_FILE}" for name in REQUIRED_FILES
                if name not in expected]
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(file) != digest:
            problems.append(f"{name} does not match its checksum")
    return problems


def latest_good_checkpoint(where: Path | str) -> Optional[Path]:
    """The newest intact checkpoint in a run folder or a `checkpoints/` folder, else None.

    Broken ones are skipped with a warning that says what is wrong with them.
    """
    where = Path(where)
    root = where / "checkpoints" if (where / "checkpoints").is_dir() else where
    for step, path in reversed(list_checkpoints(root)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        warnings.warn(f"skipping checkpoint {path}: {'; '.join(problems)}", stacklevel=2)
    return None


def resolve_resume(resume: bool | str | None, run_dir: Path | str) -> Optional[Path]:
    """The checkpoint folder `--resume` points at, or None to start fresh.

    True: the newest good checkpoint of `run_dir` (None if it has none). A path: a checkpoint
    folder (must be intact), or a run / checkpoints folder (its newest good checkpoint).
    Raises:
        CheckpointError: a named path is missing, broken, or holds no good checkpoint.
    """
    if resume is None or resume is False or resume == "":
        return None
    if resume is True:
        return latest_good_checkpoint(run_dir)
    path = Path(resume)
    if (path / CHECKSUMS_FILE).exists() or _STEP_DIR.fullmatch(path.name):
        problems = verify_checkpoint(path)
        if problems:
            fallback = latest_good_checkpoint(path.parent)
            hint = f"; the newest good one is {fallback}" if fallback else ""
            raise CheckpointError(f"cannot resume from {path}: {'; '.join(problems)}{hint}")
        return path
    if not path.is_dir():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    found = latest_good_checkpoint(path)
    if found is None:
        raise CheckpointError(f"cannot resume: no intact checkpoint under {path}")
    return found


# Options that shape the loss curve: changing one between sessions makes a resume inexact.
CURVE_OPTIONS = ("model", "data", "task", "seed", "batch_size", "grad_accum", "seq_len", "packing",
                 "epochs", "max_steps", "lr", "lr_schedule", "warmup_ratio", "warmup_steps",
                 "weight_decay", "max_grad_norm", "lora_plus_ratio", "r", "alpha", "targets",
                 "dropout", "use_rslora", "dtype", "quantize", "nan_policy")


def saved_config(path: Path | str) -> dict[str, Any]:
    """The options the checkpoint's run recorded ({} if unreadable)."""
    return read_json_object(Path(path) / CONFIG_FILE)


def config_differences(path: Path | str, config: dict[str, Any]) -> list[str]:
    """`option: saved -> now` for each loss-shaping option that differs from the checkpoint's run."""
    saved = saved_config(path)
    return [f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in CURVE_OPTIONS
            if k in saved and saved.get(k) != config.get(k)]


# --- save / load ----------------------------------------------------------------------------

def save_checkpoint(run_dir: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, grad_scaler: Any, state: TrainState,
                    config: dict[str, Any], keep: int) -> Path:
    """Write `<run>/checkpoints/step-<state.step>/` atomically, then keep only the newest `keep`.

    The one-process form of `write_checkpoint`: tensors and RNG come from this process.
    """
    params = {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model)}
    return write_checkpoint(run_dir, params, training_state(optimizer, scheduler, grad_scaler),
                            capture_rng(), state, config, keep)


def training_state(optimizer: torch.optim.Optimizer, scheduler: Any, grad_scaler: Any,
                   optimizer_state: Optional[dict] = None) -> dict[str, Any]:
    """optimizer.pt's content; `optimizer_state` replaces optimizer.state_dict() (FSDP's full one)."""
    return {"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "layout": "plain" if optimizer_state is None else "fsdp",
            "scheduler": scheduler.state_dict(), "grad_scaler": grad_scaler.state_dict()}


def write_checkpoint(run_dir: Path | str, params: dict[str, torch.Tensor], training: dict[str, Any],
                     rng: dict[str, Any], state: TrainState, config: dict[str, Any], keep: int) -> Path:
    """Write `<run>/checkpoints/step-<state.step>/` from prepared parts, atomically; prune to `keep`.

    Args:
        params: full CPU tensors of the trainable parameters, by name.
        training: `training_state(...)`. rng: `capture_rng()` or `rng_payload(...)`.
    Raises:
        OSError: the folder cannot be written (the temporary folder is removed; older checkpoints
            are untouched).
    """
    target = checkpoint_dir(run_dir, state.step)
    clean_interrupted_writes(target.parent)
    with atomic_directory(target) as tmp:
        save_file(params, str(tmp / PARAMS_FILE))
        torch.save(training, tmp / OPTIMIZER_FILE)
        torch.save(rng, tmp / RNG_FILE)
        trainer_state = {"format": FORMAT_VERSION, **dataclasses.asdict(state),
                         "param_names": list(params)}
        _write_json(tmp / STATE_FILE, trainer_state)
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / CHECKSUMS_FILE, {n: sha256_file(tmp / n) for n in REQUIRED_FILES})
    prune_checkpoints(target.parent, keep)
    return target


@dataclass
class CheckpointContents:
    """A verified checkpoint read into memory (CPU tensors)."""

    params: dict[str, torch.Tensor]
    training: dict[str, Any]
    rng: dict[str, Any]
    state: TrainState


def read_checkpoint(path: Path | str) -> CheckpointContents:
    """Verify `path` and read it.

    Raises:
        CheckpointError: the folder fails verification (missing files, checksum mismatch).
    """
    path = Path(path)
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is broken: {'; '.join(problems)}")
    return CheckpointContents(
        params=load_file(str(path / PARAMS_FILE)),
        training=torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu"),
        rng=torch.load(path / RNG_FILE, weights_only=True, map_location="cpu"),
        state=TrainState.from_dict(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))))


def load_checkpoint(path: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, grad_scaler: Any) -> TrainState:
    """Restore parameters, optimizer, scheduler, scaler and RNG from `path`; return its TrainState.

    Raises:
        CheckpointError: the folder fails verification, its parameters do not match the model's
            trainable parameters (names or shapes), or it was written by an --fsdp run.
    """
    saved = read_checkpoint(path)
    check_fits(saved.params, model, Path(path))
    load_trainable(model, saved.params)
    restore_training(saved.training, optimizer, scheduler, grad_scaler, Path(path))
    restore_rng(saved.rng)
    return saved.state


def with_current_names(saved: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors a checkpoint holds under names lorakit has since changed, under today's: a DoRA
    magnitude was a bare parameter `...lora_magnitude_vector.<adapter>`, now a module's `.weight`."""
    params = dict(trainable_parameters(model))
    out = {}
    for name, tensor in saved.items():
        new = name + ".weight"
        if name not in params and ".lora_magnitude_vector." in name and new in params:
            name, tensor = new, tensor.reshape(params[new].shape)
        out[name] = tensor
    return out


def check_fits(saved: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Raise CheckpointError unless `saved` has exactly the model's trainable names and shapes."""
    params = dict(trainable_parameters(model))
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    wrong = [n for n in params.keys() & saved.keys() if tuple(params[n].shape) != tuple(saved[n].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model's trainable parameters: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape differs {wrong[:5]} "
            "(was it written with other targets, rank or model?)")


def load_trainable(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy `saved` into the model's trainable parameters (names already checked)."""
    with torch.no_grad():
        for name, param in trainable_parameters(model):
            param.copy_(saved[name])


def restore_training(training: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                     grad_scaler: Any, path: Path, optimizer_loaded: bool = False) -> None:
    """Load optimizer (unless `optimizer_loaded`), scheduler and scaler states from optimizer.pt."""
    if not optimizer_loaded:
        if training.get("layout", "plain") != "plain":
            raise CheckpointError(f"checkpoint {path} was written by an --fsdp run; resume it with "
                                  "--fsdp under torchrun")
        optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    grad_scaler.load_state_dict(training["grad_scaler"])


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Delete all but the `keep` newest `step-<N>` folders."""
    for _, path in list_checkpoints(checkpoints)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def set_aside_later_checkpoints(run_dir: Path | str, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` to `superseded-step-<N>` (a resume from an older one
    starts a new timeline; pruning would otherwise keep the stale future ones)."""
    moved = []
    for later, path in list_checkpoints(Path(run_dir) / "checkpoints"):
        if later > step:
            new = path.with_name(f"superseded-{path.name}")
            shutil.rmtree(new, ignore_errors=True)
            path.rename(new)
            moved.append(new)
    return moved


def clean_interrupted_writes(checkpoints: Path) -> None:
    """Temporary folders left by a run killed while writing (see lorakit.atomic).

    A run killed while replacing `step-N` may have left only `.step-N.old` (the complete previous
    copy, moved aside a moment before the rename): that one is put back, not deleted.
    """
    if not checkpoints.is_dir():
        return
    for p in checkpoints.glob(".step-*.old"):
        original = p.with_name(p.name[1:-len(".old")])
        if not original.exists():
            p.rename(original)
    for p in checkpoints.glob(".step-*"):
        shutil.rmtree(p, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
