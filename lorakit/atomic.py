"""Atomic file writes: write to a temporary name in the same folder, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a torn write, even after kill -9 or power loss.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from lorakit.errors import DiskFullError

DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EIO: "an input/output error (a failing disk?)", errno.EFBIG: "the file is too large"}
LOW_SPACE = 1 << 20
"""Free bytes below which a write that failed with a library's own error (safetensors' "os error 28",
torch's "basic_ios::clear") is taken for a full disk."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """The permissions a plain open()/mkdir would give (mkstemp/mkdtemp make 0600/0700 files)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def disk_error(err: BaseException, path: Path, written: int = 0) -> DiskFullError | None:
    """A DiskFullError for `err` if it is a full (or failing) disk under `path`, else None. Call it before
    the partial file is removed: its size is part of what the write needed."""
    folder = path if path.is_dir() else path.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    code = getattr(err, "errno", None)
    reason = DISK_ERRNOS.get(code)
    if reason is None and not isinstance(err, (OSError, KeyboardInterrupt, SystemExit)) and \
            free is not None and free < LOW_SPACE:
        reason = "the disk is full"
    if reason is None:
        return None
    code = code if code in DISK_ERRNOS else errno.ENOSPC  # (a library's own error: taken for a full disk)
    free_text = f"{free / 1e6:.1f} MB free" if free is not None else "free space unknown"
    needed = f"; it needed more than the {written / 1e6:.1f} MB it had written" if written else ""
    return DiskFullError(code, f"could not write {path}: {reason} ({free_text} in {folder}{needed}). "
                                       "Nothing was lost: the file is as it was and the last good checkpoint is "
                                       "kept. Free space (or choose another --out), then continue with --resume")


def _size(path: str | os.PathLike) -> int:
    try:
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() \
            else os.path.getsize(path)
    except OSError:
        return 0


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it to `path` atomically.

    Raises:
        DiskFullError: the file system is full (or over quota, or failing); nothing is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise disk_error(err, path) or err
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = disk_error(err, path, _size(tmp))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            raise full from err
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    An existing `path` is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise disk_error(err, path.parent) or err
    try:
        yield tmp
        _usual_mode(tmp, directory=True)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                _usual_mode(f)  # (safetensors' save_file, like mkstemp, makes 0600 files)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        full = disk_error(err, path.parent, _size(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from err
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders (`.NAME.XXXX.tmp`) that writes in `folder` left when their
    process was killed mid-write; returns what was removed. Only for a folder no other process writes to."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
