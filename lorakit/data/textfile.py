"""Reading a data file as text, with the failure modes turned into `DataError`s."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import DataError


def read_bytes(path: Path) -> bytes:
    """The file's bytes.

    Raises:
        DataError: the file cannot be read (permissions, vanished, a folder ...).
    """
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e}", path=str(path)) from None


def read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        DataError: unreadable, or not UTF-8 (names the line of the first bad byte).
    """
    data = read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}): "
                        "save the file as UTF-8", path=str(path), line=line) from None
