"""Readers for `.jsonl` (one object per line) and `.json` (a list of objects, or SQuAD JSON).

Each returns raw rows `(dict, Source)`; the format is detected later (`formats.normalize_rows`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorakit.data.records import RawRow, Source, type_name
from lorakit.data.textfile import read_text
from lorakit.errors import DataError

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRING_AS_KEY = re.compile(r'("(?:[^"\\]|\\.)*")([ \t\n\r]*:)?')


def _parse_json(text: str, path: str, line: int | None = None) -> object:
    """`json.loads`, with every failure turned into a DataError at the right line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = e.lineno if line is None else line
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno}): fix the syntax",
                        path=path, line=at) from None
    except (ValueError, RecursionError) as e:  # huge integers, absurd nesting
        message = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise DataError(f"invalid JSON: {message}", path=path, line=line) from None


def parse_jsonl(text: str, path: str) -> list[RawRow]:
    """Rows of a JSON Lines text: one object per non-blank line."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        obj = _parse_json(line, path, number)
        if not isinstance(obj, dict):
            raise DataError(f"expected one JSON object per line, got {type_name(obj)}",
                            path=path, line=number)
        rows.append((obj, Source(path, number)))
    if not rows:
        raise DataError("file is empty: no JSON objects found", path=path)
    return rows


def read_jsonl(path: Path) -> list[RawRow]:
    """Rows of a `.jsonl` file, each with its 1-based line number."""
    return parse_jsonl(read_text(path), str(path))


def read_json(path: Path) -> list[RawRow]:
    """Rows of a `.json` file: a list of objects, `{"data": [...]}`, or SQuAD JSON.

    A `.json` file that holds JSON Lines (as `datasets.Dataset.to_json` writes) is read as such.
    """
    name, text = str(path), read_text(path)
    if not text.strip():
        raise DataError("file is empty: expected a JSON list of objects", path=name)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return parse_jsonl(text, name)
        doc = _parse_json(text, name)
    except (ValueError, RecursionError):
        doc = _parse_json(text, name)
    if isinstance(doc, list):
        return _list_rows(doc, text, name)
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        if any(isinstance(a, dict) and "paragraphs" in a for a in doc["data"]):
            return _squad_rows(doc["data"], text, name)
        items = doc["data"]
        return _objects(items, [Source(name, index=i) for i in range(len(items))], name)
    keys = ", ".join(sorted(doc)[:8]) if isinstance(doc, dict) else type_name(doc)
    raise DataError(f"expected a JSON list of records or SQuAD JSON "
                    f"({{\"data\": [{{\"paragraphs\": ...}}]}}), got {keys}", path=name)


def _objects(items: list, sources: list[Source], path: str) -> list[RawRow]:
    """Pair items with sources; every item must be an object."""
    if not items:
        raise DataError("the JSON list is empty: no records", path=path)
    for item, src in zip(items, sources):
        if not isinstance(item, dict):
            raise src.error(f"expected a JSON object (a record), got {type_name(item)}")
    return list(zip(items, sources))


def _list_rows(items: list, text: str, path: str) -> list[RawRow]:
    """Rows of a top-level JSON list, each with the line its object starts on."""
    lines = _item_lines(text) if items else []
    sources = [Source(path, line, index=i) for i, line in enumerate(lines)]
    return _objects(items, sources, path)


def _item_lines(text: str) -> list[int]:
    """1-based line where each item of the top-level JSON array starts.

    Only called on text that already parsed as a list, so the scan cannot fail.
    """
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, 0).end() + 1  # just after "["
    lines, line, counted = [], 1, 0
    while True:
        pos = _WHITESPACE.match(text, pos).end()
        if text[pos] == "]":
            return lines
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
        pos = _WHITESPACE.match(text, pos).end()
        if text[pos] == ",":
            pos += 1


def _key_lines(text: str, key: str) -> list[int]:
    """1-based lines of every `"key":` in a JSON text, in document order."""
    wanted, lines, line, counted = json.dumps(key), [], 1, 0
    for match in _STRING_AS_KEY.finditer(text):
        if match.group(2) and match.group(1) == wanted:
            line += text.count("\n", counted, match.start())
            counted = match.start()
            lines.append(line)
    return lines


def _squad_rows(articles: list, text: str, path: str) -> list[RawRow]:
    """Flatten SQuAD JSON (`data[].paragraphs[].qas[]`) to one raw row per question."""
    rows = []
    for a, article in enumerate(articles):
        where = f"data[{a}]"
        article = _expect(article, dict, where, path)
        title = article.get("title")
        for p, paragraph in enumerate(_expect(article.get("paragraphs"), list,
                                              f"{where}.paragraphs", path)):
            at = f"{where}.paragraphs[{p}]"
            paragraph = _expect(paragraph, dict, at, path)
            for q, qa in enumerate(_expect(paragraph.get("qas"), list, f"{at}.qas", path)):
                qa = _expect(qa, dict, f"{at}.qas[{q}]", path)
                rows.append({**qa, "context": paragraph.get("context"), "title": title})
    if not rows:
        raise DataError("SQuAD JSON holds no questions (data[].paragraphs[].qas[] is empty)",
                        path=path)
    lines = _key_lines(text, "question")
    if len(lines) == len(rows):
        sources = [Source(path, line) for line in lines]
    else:  # some qa lacks "question" (or has it twice): count questions instead of lines
        sources = [Source(path, i + 1, "question") for i in range(len(rows))]
    return list(zip(rows, sources))


def _expect(value: object, kind: type, where: str, path: str):
    """`value` if it is a `kind`, else a DataError naming its JSON path."""
    if not isinstance(value, kind):
        wanted = "a list" if kind is list else "an object"
        raise DataError(f"SQuAD JSON: {where} must be {wanted}, got {type_name(value)}",
                        path=path)
    return value
