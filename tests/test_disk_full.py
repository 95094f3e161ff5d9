"""A full disk, for real: `lorakit train` into a small tmpfs ends with one clear error naming the folder and
its free space (no traceback), leaves no temporary file, and a resume on a larger disk finishes the run."""
from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.test_train_fixtures import write_chat_data, write_tiny_model_dir

SIZES = ("600k", "300k", "100k")  # the tiny run needs about 1 MB


@pytest.fixture()
def small_disk(tmp_path):
    """A tmpfs of a given size, mounted under tmp_path (root only; skipped where mounts are not allowed)."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk-{size}-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}): the full-disk case "
                        "needs one")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _train(model: str, data: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lorakit", "train", "--model", model, "--data", data, "--out", str(out),
            "--max-steps", "6", "--batch-size", "4", "--seq-len", "64", "--device", "cpu", "--save-every", "2",
            "--log-every", "1", "--eval-every", "0", "--seed", "2", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"})


def _env() -> dict:
    import os

    return dict(os.environ)


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("size", SIZES)
def test_a_full_disk_is_one_clear_error_and_nothing_is_lost(tmp_path, small_disk, size):
    model = write_tiny_model_dir(tmp_path / "model")
    data = write_chat_data(tmp_path / "train.jsonl", 24)
    out = small_disk(size) / "run"
    done = _train(model, data, out)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    error = [l for l in done.stderr.splitlines() if "error:" in l]
    assert error and ("disk is full" in error[-1]) and str(out.parent) in error[-1], done.stderr[-2000:]
    assert "free" in error[-1] and "--resume" in error[-1]
    print(error[-1])
    assert _temporaries(out.parent) == []
    if not (out / "checkpoints").is_dir():
        return  # the disk was too small for one checkpoint: nothing to resume
    bigger = tmp_path / "bigger" / "run"
    shutil.copytree(out, bigger)
    resumed = _train(model, data, bigger, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (bigger / "adapter" / "adapter_model.safetensors").is_file()


def test_a_full_disk_while_appending_metrics_names_the_free_space(tmp_path, monkeypatch):
    import errno

    from lorakit.errors import DiskFullError
    from lorakit.train import Trainer
    from lorakit.train.metrics import MetricsLog
    from tests.test_train_fixtures import collate, fast_config, random_examples, tiny_lora_model

    def full(self, event):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MetricsLog, "write", full)
    trainer = Trainer(tiny_lora_model(), random_examples(8), collate, fast_config(max_steps=2), tmp_path,
                      progress=False)
    with pytest.raises(DiskFullError) as info:
        trainer.fit()
    message = str(info.value)
    assert "metrics.jsonl: the disk is full" in message and "MB free in" in message and "--resume" in message
