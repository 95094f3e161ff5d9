"""Typed access to a raw row's fields: each getter returns the value or raises a `DataError`
that names the row, the field and what to do."""

from __future__ import annotations

import json
from typing import Any

from lorakit.data.records import Source, short, type_name


def first_present(row: dict, names: tuple[str, ...]) -> str | None:
    """The first of `names` that is a key of `row` (and not null), or None."""
    for name in names:
        if row.get(name) is not None:
            return name
    return None


def get_text(row: dict, name: str, src: Source, *, required: bool = True,
             allow_empty: bool = False) -> str:
    """Field `name` as a string.

    Raises:
        DataError: missing (when required), not a string, or empty (unless allow_empty).
    """
    value = row.get(name)
    if value is None:
        if required:
            raise src.error(f"field '{name}' is missing: add it, or remove this record")
        return ""
    if not isinstance(value, str):
        raise src.error(f"field '{name}' must be a string, got {type_name(value)} "
                        f"({short(value)}): fix its type, or remove this record")
    if not allow_empty and not value.strip():
        raise src.error(f"field '{name}' is empty: fill it in, or remove this record "
                        "(empty examples are never trained on silently)")
    return value


def get_list(row: dict, name: str, src: Source) -> list:
    """Field `name` as a list. CSV/TSV cells may hold the list as JSON text.

    Raises:
        DataError: missing or not a list.
    """
    value = row.get(name)
    if value is None:
        raise src.error(f"field '{name}' is missing: add it, or remove this record")
    value = _decode_cell(value, src)
    if not isinstance(value, list):
        hint = " (in CSV/TSV, write it as JSON text, e.g. [\"a\", \"b\"])" if src.tabular else ""
        raise src.error(f"field '{name}' must be a list, got {type_name(value)} "
                        f"({short(value)}){hint}")
    return value


def get_object(value: Any, what: str, src: Source) -> dict:
    """`value` as a dict (an object), or a DataError saying `what` must be one."""
    value = _decode_cell(value, src)
    if not isinstance(value, dict):
        raise src.error(f"{what} must be an object, got {type_name(value)} ({short(value)})")
    return value


def get_bool(row: dict, name: str, src: Source) -> bool | None:
    """Optional boolean field (CSV/TSV: `true`/`false`/`1`/`0`); None when absent."""
    value = row.get(name)
    if value is None:
        return None
    if src.tabular and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", ""):
            return False
    if not isinstance(value, bool):
        raise src.error(f"field '{name}' must be true or false, got {type_name(value)} "
                        f"({short(value)})")
    return value


def _decode_cell(value: Any, src: Source) -> Any:
    """In CSV/TSV rows, a cell holding JSON list/object text becomes that list/object."""
    if src.tabular and isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value
