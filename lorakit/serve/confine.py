"""Reading an adapter folder from inside the adapters folder, and nothing outside it, whatever changes on disk
while it is read.

Checking a path and then opening it by name leaves a window in which a symlink can be swapped, so nothing
here is opened by a name that was checked: the adapters folder is opened once, and each component of a path
is opened with O_NOFOLLOW relative to the folder opened before it. A symlink met on the way is read and its
target walked the same way, from the folders already held open (so `..` cannot climb above the adapters
folder); whatever it points to outside is refused. The files are read through the descriptors that were
opened, into a private folder, and the adapter is loaded from that copy.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat

from .protocol import ApiError

MAX_LINKS = 40  # symlinks followed on one path (Linux's own limit); more is a loop
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
_OPEN = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _outside(path: str) -> ApiError:
    return ApiError(403, f"{shown_path(path)} is outside the adapters folder; only folders inside it can be loaded",
                    "path", "path_outside_adapters_dir")


def shown_path(path: str) -> str:
    """A client's string for an error message: quoted, and cut short."""
    text = repr(path)
    return text if len(text) <= 120 else text[:100] + "...'"


class AdaptersFolder:
    """The folder POST /v1/adapters may load from, held open for the server's life."""

    def __init__(self, path: str):
        self.real = os.path.realpath(path)
        self.given = os.path.abspath(path)
        self.fd = os.open(self.real, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))

    def copy_adapter(self, path: str, files: tuple[str, ...], required: tuple[str, ...], into: str) -> str:
        """Copy `files` of the adapter folder `path` (relative to the adapters folder, or absolute inside it)
        into the folder `into`; returns `path` as a clean relative path. Raises ApiError: 400 for a path that
        cannot name a folder, 403 outside, 404 missing."""
        folder = [os.dup(self.fd)]  # the folders from the adapters folder down to the adapter's, held open
        try:
            self._walk(folder, self._parts(path), path, directory=True)
            for name in files:
                walk = [os.dup(fd) for fd in folder]
                try:
                    self._walk(walk, [name], path, directory=False)
                    with open(os.dup(walk[-1]), "rb") as src, open(os.path.join(into, name), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except ApiError as e:
                    if e.status != 404:
                        raise
                    if name in required:
                        raise ApiError(400, f"{shown_path(path)} is not an adapter folder: it holds no {name}", "path",
                                       "adapter_load_failed") from None
                finally:
                    _close(walk)
        finally:
            _close(folder)
        return self._relative(path)

    # ------------------------------------------------------------------ the walk
    def _parts(self, path: str) -> list[str]:
        """The components of `path` below the adapters folder (before any symlink is read)."""
        if "\x00" in path:
            raise ApiError(400, "path must not contain NUL characters", "path")
        if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise ApiError(400, f"path is longer than {MAX_PATH_BYTES} bytes", "path")
        if os.path.isabs(path):
            return self._below_root(path, path)
        return path.split("/")

    def _below_root(self, target: str, path: str) -> list[str]:
        """An absolute path's components below the adapters folder (as resolved or as the server was given it)."""
        target = os.path.normpath(target)
        for root in (self.real, self.given):
            if target == root or target.startswith(root.rstrip("/") + "/"):
                return target[len(root):].split("/")
        raise _outside(path)

    def _relative(self, path: str) -> str:
        parts = [p for p in self._parts(path) if p not in ("", ".")]
        return os.path.normpath("/".join(parts)) if parts else "."

    def _walk(self, held: list[int], parts: list[str], path: str, directory: bool) -> None:
        """Open what `parts` names below `held[-1]`, appending each folder (and the file) to `held`, whose first
        entry is the adapters folder: `..` pops an entry and may never pop that one, an absolute symlink starts
        again from it. Raises ApiError when the walk would leave the adapters folder or finds nothing."""
        pending, links, last_is_file = list(parts), 0, False
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if last_is_file:  # "file/more": a file where a folder was wanted
                raise ApiError(404, f"no adapter folder {shown_path(path)} in the adapters folder", "path",
                               "adapter_not_found")
            if part == "..":
                if len(held) == 1:
                    raise _outside(path)
                os.close(held.pop())
                continue
            if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                raise ApiError(400, f"a component of path is longer than {MAX_NAME_BYTES} bytes", "path")
            want_dir = directory or bool(pending)
            try:
                fd = os.open(part, _OPEN | (os.O_DIRECTORY if want_dir else 0), dir_fd=held[-1])
            except OSError as e:
                target = _link_target(part, held[-1]) if e.errno in (errno.ELOOP, errno.ENOTDIR) else None
                if target is None:
                    raise _refusal(e, path) from None
                links += 1
                if links > MAX_LINKS:
                    raise ApiError(400, f"{shown_path(path)}: too many symlinks (a loop?)", "path",
                                   "symlink_loop") from None
                if os.path.isabs(target):
                    _close(held[1:])
                    del held[1:]
                    pending = self._below_root(target, path) + pending
                else:
                    pending = target.split("/") + pending
                continue
            held.append(fd)
            mode = os.fstat(fd).st_mode
            if not want_dir and not stat.S_ISREG(mode):
                raise ApiError(400, f"{shown_path(path)}: {part} is not a regular file", "path")
            last_is_file = not want_dir
        if not directory and not last_is_file:  # a file's symlink led to a folder
            raise ApiError(400, f"{shown_path(path)} is not an adapter folder", "path")


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _link_target(name: str, folder: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=folder)
    except OSError:  # not a symlink (a file where a folder was wanted), or gone meanwhile
        return None


def _refusal(e: OSError, path: str) -> ApiError:
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return ApiError(404, f"no adapter folder {shown_path(path)} in the adapters folder", "path", "adapter_not_found")
    if e.errno == errno.ENAMETOOLONG:
        return ApiError(400, f"{shown_path(path)} is too long a path", "path")
    if e.errno in (errno.EACCES, errno.EPERM):
        return ApiError(403, f"{shown_path(path)} cannot be read by the server", "path", "permission_denied")
    return ApiError(400, f"{shown_path(path)} cannot be opened ({errno.errorcode.get(e.errno, e.errno)})", "path")

