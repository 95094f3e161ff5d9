"""The run folder: clear errors when it cannot be written (disk full, read-only, no permission), and an
earlier run in it kept aside rather than overwritten."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from lorakit.atomic import DISK_ERRNOS
from lorakit.errors import LorakitError

_REASONS = {**DISK_ERRNOS, errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file, not a folder"}


class RunFolderError(LorakitError):
    """The run folder (--out) cannot be written."""


def describe(err: OSError) -> str:
    """A short reason for a failed write: 'the disk is full (ENOSPC)'."""
    code = errno.errorcode.get(err.errno, "") if err.errno else ""
    reason = _REASONS.get(err.errno, err.strerror or str(err))
    return f"{reason} ({code})" if code else reason


def prepare_run_dir(run_dir: Path | str) -> Path:
    """Create the run folder and prove it is writable (a probe file is written and removed).

    Raises:
        RunFolderError: the folder cannot be created or written; says why and what to do.
    """
    run_dir = Path(run_dir)
    probe = run_dir / f".lorakit-write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"cannot write to the run folder {run_dir}: {describe(err)}. "
                             "Choose another --out, or free space / fix permissions there") from err
    return run_dir


def new_folders(run_dir: Path | str) -> list[Path]:
    """The folders that creating `run_dir` would make (it and its missing parents), innermost first."""
    missing = []
    for folder in (Path(run_dir).absolute(), *Path(run_dir).absolute().parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_new_folders(folders: list[Path]) -> None:
    """Undo `prepare_run_dir` for a run that failed to start: remove the folders `new_folders` listed before
    it (this process made them, so all they hold is this run's), innermost first; a parent only if empty."""
    for i, folder in enumerate(folders):
        if i == 0:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            try:
                folder.rmdir()
            except OSError:  # something else was put there meanwhile: leave it
                return


PREVIOUS = "previous"


def keep_previous_run(run_dir: Path | str, products: tuple[str, ...], results: tuple[str, ...]) -> Path | None:
    """Move what an earlier run left in `run_dir` (the entries named in `products`) into `run_dir/previous/`,
    replacing the one kept before; returns that folder, or None when there was nothing to keep. A fresh run
    into a used --out then loses nothing of the last run, and `lorakit train` run twice keeps one step back.
    Only a run that got as far as one of its `results` (an adapter, a checkpoint) counts: a run that failed
    at start-up leaves just its options, which are overwritten, not kept in place of the real earlier run.
    Other files (the user's data, say) stay where they are."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).exists() for name in results):
        return None
    entries = [run_dir / name for name in products if (run_dir / name).exists()]
    previous = run_dir / PREVIOUS
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for entry in entries:
        entry.rename(previous / entry.name)
    return previous
