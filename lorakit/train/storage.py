"""Clear errors when the run folder cannot be written: disk full, read-only, no permission."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from lorakit.errors import LorakitError

_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
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
