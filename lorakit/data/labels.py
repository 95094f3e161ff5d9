"""Label names and ids for classification and token classification.

Labels may be integers (`0`, `1`, also `"1"` from CSV/TSV) or strings (`"positive"`, `"B-PER"`).
Integer labels keep their meaning: label `k` gets id `k` and the name `"k"`, so a split that lacks
a class still maps like the others. String labels are sorted (`"O"` first, as in CoNLL tag sets).
When the caller passes label names (e.g. the training set's, to read eval data), those are used
and any other label is an error.
"""

from __future__ import annotations

import re
import warnings

from lorakit.data.records import Source, short, type_name

MAX_INT_LABEL = 10_000
"""Integer labels above this are refused: they are ids of something else, not classes."""

_INT_TEXT = re.compile(r"\s*-?\d{1,9}\s*")


def _label_key(value: object, src: Source, field: str) -> int | str:
    """A label as an int (integer or integer text) or a stripped string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        key = value
    elif isinstance(value, str) and value.strip():
        key = int(value) if _INT_TEXT.fullmatch(value) else value.strip()
    else:
        raise src.error(f"'{field}' must hold integer or string labels, got {type_name(value)} "
                        f"({short(value)}) (regression targets are not supported)")
    if isinstance(key, int) and not 0 <= key <= MAX_INT_LABEL:
        raise src.error(f"label {key} in '{field}' is out of range 0..{MAX_INT_LABEL} "
                        "(-1 usually means 'unlabelled', as in GLUE test sets): remove these "
                        "records or use string labels")
    return key


def _default_names(keys: list[int | str]) -> list[str]:
    """Names for the labels seen: 0..max for integers, sorted strings ("O" first) otherwise."""
    if all(isinstance(k, int) for k in keys):
        return [str(i) for i in range(max(keys) + 1)]
    names = sorted({str(k) for k in keys})
    if "O" in names:
        names.remove("O")
        names.insert(0, "O")
    return names


def _label_id(key: int | str, index: dict[str, int], count: int, src: Source, field: str) -> int:
    """The id of one label, given the names' index."""
    if str(key) in index:
        return index[str(key)]
    if isinstance(key, int) and key < count:
        return key
    shown = ", ".join(list(index)[:20])
    raise src.error(f"label {short(key)} in '{field}' is not one of the known labels "
                    f"({shown}): fix the label, or read this data with the same label list")


def _warn_on_mixed_labels(keyed: list, sources: list, field: str, names: list[str]) -> None:
    """Integer and text labels together are most often a typo (a 'positive' among 0s and 1s), which would
    become a class of its own: say where the rarer kind first appears."""
    per_record = [keys if field == "tags" else [keys] for keys in keyed]
    ints = sum(isinstance(k, int) for keys in per_record for k in keys)
    texts = sum(not isinstance(k, int) for keys in per_record for k in keys)
    if not ints or not texts:
        return
    rare_is_text = texts <= ints
    for keys, src in zip(per_record, sources):
        odd = next((k for k in keys if isinstance(k, int) != rare_is_text), None)
        if odd is not None:
            kind, other = ("text", "integers") if rare_is_text else ("an integer", "text")
            count = ints if rare_is_text else texts
            warnings.warn(str(src.error(
                f"label {short(odd)} in '{field}' is {kind}, while {count} other labels are {other}: a typo? "
                f"It becomes a class of its own (labels: {', '.join(names[:20])})")), stacklevel=3)
            return


def assign_label_ids(records: list[dict], sources: list, field: str,
                     names: list[str] | None = None) -> list[str]:
    """Replace each record's `field` (`label`, or the list `tags`) by label ids, in place.

    Args:
        records: normalized records holding raw labels in `field`.
        sources: `sources[i]` is where `records[i]` came from (for errors).
        field: `"label"` (one label per record) or `"tags"` (a list per record).
        names: label names to map onto; None = build them from the labels seen.

    Returns:
        The label names; ids index into this list.

    Raises:
        DataError: a label of the wrong type, out of range, or not in `names`.
    """
    keyed = []
    for record, src in zip(records, sources):
        raw = record[field]
        keys = [_label_key(v, src, field) for v in raw] if field == "tags" else \
            _label_key(raw, src, field)
        keyed.append(keys)
    if names is None:
        flat = [k for keys in keyed for k in (keys if field == "tags" else [keys])]
        names = _default_names(flat)
        _warn_on_mixed_labels(keyed, sources, field, names)
    names = [str(n) for n in names]
    index = {name: i for i, name in enumerate(names)}
    for record, keys, src in zip(records, keyed, sources):
        if field == "tags":
            record[field] = [_label_id(k, index, len(names), src, field) for k in keys]
        else:
            record[field] = _label_id(keys, index, len(names), src, field)
    return names
