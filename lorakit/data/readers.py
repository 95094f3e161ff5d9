"""`read_records`: a file, a folder of files, or a Hugging Face dataset name → a `RecordSet`.

Reading happens in two steps: a reader per file type turns the file into raw rows, each with
its `Source` (file + line); `formats.normalize_rows` then detects the format from the fields,
checks every field and maps labels. Anything wrong raises a `DataError` naming the file, the
line (or row) and what to do; no other exception escapes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

from lorakit.data.formats import normalize_rows
from lorakit.data.jsonfiles import read_json, read_jsonl
from lorakit.data.records import RawRow, RecordSet, Source
from lorakit.data.tables import read_conll, read_csv, read_parquet, read_tsv
from lorakit.errors import DataError

READERS: dict[str, Callable[[Path], list[RawRow]]] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
    ".txt": read_conll,
    ".conll": read_conll,
}
"""File suffix → reader. `.txt` and `.conll` are CoNLL-style column files."""

SUFFIXES = ", ".join(READERS)

_SKIPPED_IN_FOLDERS = ("readme", "license", "licence")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def read_records(path: str | os.PathLike, labels: list[str] | None = None,
                 split: str = "train") -> RecordSet:
    """Read a data set and normalize it to one format.

    Args:
        path: a `.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`, `.txt`/`.conll` (CoNLL) file, a
            folder of such files (read in sorted order, all of one format), or a Hugging Face
            datasets name (needs the `datasets` package and usually the network).
        labels: label names to map labels onto (pass the training set's `RecordSet.labels`
            when reading eval data, so ids agree); None = built from the labels seen.
        split: the split to load for a Hugging Face dataset name.

    Returns:
        A `RecordSet`: `.format`, `.records` (normalized dicts), `.sources` (file + line of
        each record) and `.labels` for labelled formats.

    Raises:
        DataError: missing path, unsupported file type, unreadable or malformed data.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise DataError("no data given: pass a file, a folder or a Hugging Face datasets name")
    location, kind = _source_kind(text)
    if kind == "folder":
        rows = read_folder(location)
    elif kind == "file":
        rows = read_file(location)
    elif kind == "hub":
        return read_hub_dataset(text, split, labels)
    else:
        raise missing_source(text)
    return normalize_rows(rows, text, labels)


def _source_kind(text: str) -> tuple[Path, Optional[str]]:
    """(the path, "folder" | "file" | "hub" (a datasets name) | None: none of them)."""
    location = Path(text).expanduser()
    if _is_dir(location):
        return location, "folder"
    if _is_file(location):
        return location, "file"
    if _HUB_NAME.fullmatch(text) and location.suffix.lower() not in READERS:
        return location, "hub"
    return location, None


def missing_source(text: str) -> Optional[DataError]:
    """The error for a data source that is neither a file, a folder nor a datasets name (None if it is one)."""
    location, kind = _source_kind(text)
    if kind is not None:
        return None
    where = "" if location.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()})"
    return DataError(f"no such file or folder{where}: give a {SUFFIXES} file, a folder of them, "
                     "or a Hugging Face datasets name", path=text)


def read_file(path: Path) -> list[RawRow]:
    """Raw rows of one file, chosen by its suffix."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported file type '{path.suffix or '(none)'}': use one of "
                        f"{SUFFIXES} (or a folder of them)", path=str(path))
    return reader(path)


def read_folder(folder: Path) -> list[RawRow]:
    """Raw rows of every data file under `folder` (recursively, sorted by path).

    Hidden files and README/LICENSE files are skipped, as are files of other types.
    """
    try:
        files = [p for p in sorted(folder.rglob("*")) if _is_data_file(p, folder)]
    except OSError as e:
        raise DataError(f"cannot list the folder: {e}", path=str(folder)) from None
    if not files:
        raise DataError(f"folder holds no data files ({SUFFIXES})", path=str(folder))
    rows: list[RawRow] = []
    for file in files:
        rows.extend(read_file(file))
    return rows


def _is_data_file(path: Path, folder: Path) -> bool:
    relative = path.relative_to(folder)
    if any(part.startswith(".") for part in relative.parts):
        return False
    if path.stem.lower().startswith(_SKIPPED_IN_FOLDERS):
        return False
    return path.suffix.lower() in READERS and _is_file(path)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def read_hub_dataset(name: str, split: str = "train",
                     labels: list[str] | None = None) -> RecordSet:
    """A Hugging Face dataset (by name) through `datasets.load_dataset`.

    Raises:
        DataError: `datasets` is not installed, or the dataset cannot be loaded (offline,
            unknown name, unknown split); the message names the local alternatives.
    """
    local = f"pass a local {SUFFIXES} file or a folder of them instead"
    try:
        import datasets
    except ImportError:
        raise DataError(f"'{name}' is not a local file or folder, and the Hugging Face "
                        f"`datasets` package is not installed (pip install datasets; needs the "
                        f"network): {local}", path=name) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
        rows = [dict(row) for row in dataset]
    except Exception as e:  # offline, unknown name or split, ... (datasets raises many types)
        raise DataError(f"cannot load Hugging Face dataset '{name}' (split '{split}'): "
                        f"{type(e).__name__}: {e}. Offline? {local}", path=name) from None
    where = f"{name}[{split}]"
    sources = [Source(where, i + 1, "row") for i in range(len(rows))]
    if labels is None:
        labels = _class_label_names(dataset)
    return normalize_rows(list(zip(rows, sources)), where, labels)


def _class_label_names(dataset) -> list[str] | None:
    """Label names from a `ClassLabel` feature (`label`, or a sequence of them in `ner_tags`)."""
    features = getattr(dataset, "features", None) or {}
    for field in ("label", "ner_tags", "tags"):
        feature = features.get(field)
        feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) -> ClassLabel
        names = getattr(feature, "names", None)
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    return None


def records_from_dicts(rows: list[dict], name: str = "<records>",
                       labels: list[str] | None = None) -> RecordSet:
    """A `RecordSet` from in-memory dicts (e.g. the built-in demo data), checked like a file.

    Errors name `name` and the 0-based list index of the bad record.
    """
    if not isinstance(rows, list):
        raise DataError(f"expected a list of records, got {type(rows).__name__}", path=name)
    return normalize_rows([(row, Source(name, index=i)) for i, row in enumerate(rows)],
                          name, labels)
