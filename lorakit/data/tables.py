"""Readers for column data: `.csv` / `.tsv` (header row), `.parquet` (pyarrow, optional) and
CoNLL-style `.txt` / `.conll` (whitespace-separated columns, last column = tag)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lorakit.data.records import RawRow, Source
from lorakit.data.textfile import read_text
from lorakit.errors import DataError


def read_csv(path: Path) -> list[RawRow]:
    """Rows of a comma-separated file with a header row (quoted fields allowed)."""
    return _read_delimited(path, ",", csv.QUOTE_MINIMAL)


def read_tsv(path: Path) -> list[RawRow]:
    """Rows of a tab-separated file with a header row. Quotes are plain characters (as in GLUE)."""
    return _read_delimited(path, "\t", csv.QUOTE_NONE)


def _read_delimited(path: Path, delimiter: str, quoting: int) -> list[RawRow]:
    name, text = str(path), read_text(path)
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                        strict=True)  # an unclosed quote is an error, not a giant field
    rows: list[RawRow] = []
    end = 0  # last line of the last complete row
    try:
        header = _header(next(reader, None), kind, name)
        end = reader.line_num
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells or cells == [""]:
                continue
            if len(cells) != len(header):
                raise DataError(f"{len(cells)} columns, but the header has {len(header)} "
                                f"({', '.join(header)}): {_column_hint(kind, fewer=len(cells) < len(header))}",
                                path=name, line=start)
            rows.append((dict(zip(header, cells)), Source(name, start, tabular=True)))
    except csv.Error as e:  # reported at the line where the unreadable record starts
        raise DataError(f"cannot parse {kind} (the record starting on this line): {e}",
                        path=name, line=end + 1) from None
    if not rows:
        raise DataError(f"{kind} file has a header but no rows", path=name)
    return rows


def _header(cells: list[str] | None, kind: str, path: str) -> list[str]:
    """Column names from the first row: present, non-empty and distinct."""
    example = "sentence<TAB>label" if kind == "TSV" else "instruction,input,output"
    if not cells or cells == [""]:
        raise DataError(f"{kind} file is empty: the first line must name the columns "
                        f"(e.g. {example})", path=path, line=1)
    names = [c.strip() for c in cells]
    for i, column in enumerate(names):
        if not column:
            raise DataError(f"header column {i + 1} has no name: the first line must name "
                            f"every column (e.g. {example})", path=path, line=1)
        if column in names[:i]:
            raise DataError(f"header names column '{column}' twice: rename one", path=path,
                            line=1)
    return names


def _column_hint(kind: str, fewer: bool) -> str:
    if fewer:
        return f"give every column a value (an empty one still needs its {'tab' if kind == 'TSV' else 'comma'})"
    if kind == "TSV":
        return "a field must not contain a tab (TSV has no quoting)"
    return "quote fields that contain commas or line breaks"


def read_parquet(path: Path) -> list[RawRow]:
    """Rows of a `.parquet` file (needs the optional `pyarrow` package)."""
    name = str(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet files needs pyarrow: pip install pyarrow "
                        "(or pip install 'lorakit[parquet]'), or convert the file to .jsonl",
                        path=name) from None
    try:
        table = pq.read_table(name)
        records = table.to_pylist()
    except Exception as e:  # pyarrow raises many types (ArrowInvalid, OSError ...)
        raise DataError(f"cannot read parquet: {type(e).__name__}: {e}", path=name) from None
    if not records:
        raise DataError("parquet file has no rows", path=name)
    return [(row, Source(name, i + 1, "row")) for i, row in enumerate(records)]


AS_CONLL = ("(.txt/.conll files are read as CoNLL: a token and its tag a line, a blank line between sentences; "
            "for plain text to train on, write .jsonl lines {\"text\": ...})")


def read_conll(path: Path) -> list[RawRow]:
    """Sentences of a CoNLL-style file: one token a line, columns split on whitespace, the first
    column the token, the last the tag; a blank line ends a sentence; `-DOCSTART-` lines are
    skipped. Each sentence becomes `{"tokens": [...], "tags": [...]}` at its first line."""
    name = str(path)
    rows: list[RawRow] = []
    tokens: list[str] = []
    tags: list[str] = []
    start, columns, columns_line = 0, 0, 0
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        cells = line.split()
        if not cells or cells[0] == "-DOCSTART-":
            if tokens:
                rows.append(({"tokens": tokens, "tags": tags}, Source(name, start)))
                tokens, tags = [], []
            continue
        if len(cells) < 2:
            raise DataError(f"one column, but CoNLL lines need a token and a tag separated by whitespace {AS_CONLL}",
                            path=name, line=number)
        if not columns:
            columns, columns_line = len(cells), number
        elif len(cells) != columns:
            raise DataError(f"{len(cells)} columns, but line {columns_line} has {columns}: every line needs the "
                            f"same columns (token ... tag) {AS_CONLL}", path=name, line=number)
        if not tokens:
            start = number
        tokens.append(cells[0])
        tags.append(cells[-1])
    if tokens:
        rows.append(({"tokens": tokens, "tags": tags}, Source(name, start)))
    if not rows:
        raise DataError("no sentences found (CoNLL: one 'token ... tag' line per token, a blank "
                        "line between sentences)", path=name)
    return rows
