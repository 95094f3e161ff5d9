"""Where a record came from, and the set of normalized records a reader returns."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from lorakit.errors import DataError

_short_repr = reprlib.Repr()
_short_repr.maxstring = 60
_short_repr.maxother = 60
_short_repr.maxlist = 5
_short_repr.maxdict = 5


def short(value: Any) -> str:
    """A repr of `value` short enough to quote in an error message."""
    try:
        return _short_repr.repr(value)
    except Exception:  # a repr that fails must not hide the real error
        return f"<{type(value).__name__}>"


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for error messages ("a list", "null")."""
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
             str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


@dataclass(frozen=True)
class Source:
    """The place one record was read from.

    Attributes:
        path: the file (or `name[split]` for a Hugging Face dataset).
        line: 1-based position of the record in that file, counted in `unit`s.
        unit: `"line"` (text files), `"row"` (parquet, datasets) or `"question"` (SQuAD JSON
            whose questions cannot be matched to lines).
        tabular: True for CSV/TSV, whose cells are strings (list fields may hold JSON text).
        index: 0-based index in a JSON list, when the file is one (lines alone do not tell
            items apart in a one-line JSON file).
    """

    path: str
    line: int | None = None
    unit: str = "line"
    tabular: bool = False
    index: int | None = None

    def error(self, message: str) -> DataError:
        """A `DataError` pointing at this record: `path:line: message` (`path: row N: ...`)."""
        if self.index is not None:
            message = f"JSON list index {self.index}: {message}"
        if self.line is None:
            return DataError(message, path=self.path)
        if self.unit == "line":
            return DataError(message, path=self.path, line=self.line)
        return DataError(f"{self.unit} {self.line}: {message}", path=self.path)

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}" if self.unit == "line" else f" ({self.unit} {self.line})"
        if self.index is not None:
            where += f" (JSON list index {self.index})"
        return where


RawRow = tuple[dict, Source]
"""A row as read from disk, before its format is detected and its fields normalized."""


@dataclass
class RecordSet:
    """Normalized records of one format, each with the place it was read from.

    Attributes:
        format: the detected format (`alpaca`, `chat`, `prompt_completion`, `text`,
            `classification`, `token_classification` or `squad`).
        records: one dict of normalized fields per example (see `lorakit.data.formats`).
        sources: `sources[i]` is where `records[i]` was read from.
        labels: label names for `classification` / `token_classification` (the record's
            `label` / `tags` hold indices into it); None for other formats.
        path: what was read (file, folder or dataset name).
    """

    format: str
    records: list[dict]
    sources: list[Source]
    labels: list[str] | None = None
    path: str = ""
    _label2id: dict[str, int] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    @property
    def label2id(self) -> dict[str, int] | None:
        """`{label name: index}` for labelled formats, else None."""
        if self.labels is None:
            return None
        if self._label2id is None:
            self._label2id = {name: i for i, name in enumerate(self.labels)}
        return self._label2id

    @property
    def id2label(self) -> dict[int, str] | None:
        """`{index: label name}` for labelled formats, else None."""
        return None if self.labels is None else dict(enumerate(self.labels))

    def subset(self, indices: list[int]) -> "RecordSet":
        """A new RecordSet with the records at `indices` (same format, labels and path)."""
        return RecordSet(self.format, [self.records[i] for i in indices],
                         [self.sources[i] for i in indices], self.labels, self.path)
