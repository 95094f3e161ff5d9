"""Data formats, recognised by their fields: one table, checked in order, first match wins.

Normalized records (what `RecordSet.records` holds) per format:

    alpaca               {"instruction": str, "input": str, "output": str}
    chat                 {"messages": [{"role": str, "content": str}, ...]}
    prompt_completion    {"prompt": str, "completion": str}
    text                 {"text": str}
    classification       {"text": str, "label": int}        # index into RecordSet.labels
    token_classification {"tokens": [str], "tags": [int]}   # indices into RecordSet.labels
    squad                {"id": str, "title": str, "context": str, "question": str,
                          "answers": {"text": [str], "answer_start": [int]}, "is_impossible": bool}
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Callable

from lorakit.data.fields import first_present, get_bool, get_list, get_object, get_text
from lorakit.data.labels import assign_label_ids
from lorakit.data.records import RawRow, RecordSet, Source, short, type_name
from lorakit.errors import DataError

Normalizer = Callable[[dict, Source], list[dict]]

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
              # ShareGPT spellings (`conversations` with `from` / `value`)
              "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class FormatSpec:
    """One row of the format table.

    Attributes:
        name: the format's name (what `RecordSet.format` says).
        required: fields that must all be present; a tuple entry lists alternative spellings.
        normalize: turns a raw row into normalized records (usually one), or raises DataError.
        label_field: the normalized field that holds labels (`label` or `tags`), if any.
    """

    name: str
    required: tuple[tuple[str, ...], ...]
    normalize: Normalizer
    label_field: str | None = None

    def matches(self, row: dict) -> bool:
        """True when every required field (or one of its spellings) is present."""
        return all(first_present(row, names) for names in self.required)

    def missing(self, row: dict) -> list[str]:
        """The required fields `row` lacks, each written as `a|b` for alternatives."""
        return ["|".join(names) for names in self.required if not first_present(row, names)]

    def describe(self) -> str:
        """e.g. `alpaca (instruction, output)`."""
        return f"{self.name} ({', '.join('|'.join(names) for names in self.required)})"


# --- normalizers: raw row -> normalized records --------------------------------------------

def _alpaca(row: dict, src: Source) -> list[dict]:
    """instruction + optional input → output."""
    return [{"instruction": get_text(row, "instruction", src),
             "input": get_text(row, "input", src, required=False, allow_empty=True),
             "output": get_text(row, "output", src)}]


def _alpaca_instances(row: dict, src: Source) -> list[dict]:
    """Self-Instruct seed tasks: one instruction, several {input, output} instances."""
    instruction = get_text(row, "instruction", src)
    instances = get_list(row, "instances", src)
    if not instances:
        raise src.error("field 'instances' is an empty list: add {input, output} objects")
    records = []
    for i, item in enumerate(instances):
        obj = get_object(item, f"'instances'[{i}]", src)
        records.append({"instruction": instruction,
                        "input": get_text(obj, "input", src, required=False, allow_empty=True),
                        "output": get_text(obj, "output", src)})
    return records


def _chat(row: dict, src: Source) -> list[dict]:
    """A list of {role, content} messages (or ShareGPT `conversations`)."""
    field = first_present(row, ("messages", "conversations"))
    items = get_list(row, field, src)
    messages = [_chat_message(item, field, i, src) for i, item in enumerate(items)]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise src.error(f"field '{field}' has no assistant message with content: nothing to "
                        "train on (add {\"role\": \"assistant\", \"content\": ...})")
    return [{"messages": messages}]


def _chat_message(item: object, field: str, index: int, src: Source) -> dict:
    """One {role, content} message (or ShareGPT {from, value})."""
    where = f"'{field}'[{index}]"
    msg = get_object(item, where, src)
    role_key, content_key = ("from", "value") if "from" in msg else ("role", "content")
    role = msg.get(role_key)
    if role not in CHAT_ROLES:
        raise src.error(f"{where}.{role_key} must be one of system, user, assistant, tool; "
                        f"got {short(role)}")
    content = msg.get(content_key)
    if not isinstance(content, str):
        raise src.error(f"{where}.{content_key} must be a string, got {type_name(content)} "
                        f"({short(content)})")
    return {"role": CHAT_ROLES[role], "content": content}


def _prompt_completion(row: dict, src: Source) -> list[dict]:
    """A prompt and the completion to train on."""
    return [{"prompt": get_text(row, "prompt", src),
             "completion": get_text(row, "completion", src)}]


def _text(row: dict, src: Source) -> list[dict]:
    """Plain text: every token is trained."""
    return [{"text": get_text(row, "text", src)}]


def _classification(row: dict, src: Source) -> list[dict]:
    """`text` (or `sentence`) and a raw label (mapped to an id later)."""
    field = first_present(row, ("text", "sentence"))
    return [{"text": get_text(row, field, src), "label": row["label"]}]


def _token_classification(row: dict, src: Source) -> list[dict]:
    """Parallel `tokens` and `tags` (or `ner_tags`) lists."""
    tokens = get_list(row, "tokens", src)
    tag_field = first_present(row, ("tags", "ner_tags"))
    tags = get_list(row, tag_field, src)
    if not tokens:
        raise src.error("field 'tokens' is an empty list: remove this record")
    if len(tokens) != len(tags):
        raise src.error(f"'tokens' has {len(tokens)} items but '{tag_field}' has {len(tags)}: "
                        "give exactly one tag per token")
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise src.error(f"'tokens'[{i}] must be a non-empty string, got {short(token)}")
    return [{"tokens": tokens, "tags": tags}]


def _squad(row: dict, src: Source) -> list[dict]:
    """Extractive QA: context, question and answers (empty = unanswerable)."""
    context = get_text(row, "context", src)
    question = get_text(row, "question", src)
    answers = _squad_answers(row["answers"], context, src)
    impossible = get_bool(row, "is_impossible", src)
    if impossible and answers["text"]:
        raise src.error("'is_impossible' is true but 'answers' is not empty: an unanswerable "
                        "question has answers [] (put guesses in 'plausible_answers')")
    qid = row.get("id")
    title = row.get("title")
    return [{"id": "" if qid is None else str(qid),
             "title": title if isinstance(title, str) else "", "context": context,
             "question": question, "answers": answers, "is_impossible": not answers["text"]}]


def _squad_answers(value: object, context: str, src: Source) -> dict:
    """Answers as `{"text": [...], "answer_start": [...]}`, each checked against the context.

    Accepts SQuAD's list of `{text, answer_start}` or the datasets-style dict of lists.
    """
    if src.tabular and isinstance(value, str):
        value = get_list({"answers": value}, "answers", src) if value.strip()[:1] == "[" else \
            get_object(value, "field 'answers'", src)
    if isinstance(value, list):
        pairs = [get_object(item, f"'answers'[{i}]", src) for i, item in enumerate(value)]
        texts = [p.get("text") for p in pairs]
        starts = [p.get("answer_start") for p in pairs]
    elif isinstance(value, dict):
        texts = get_list(value, "text", src)
        starts = get_list(value, "answer_start", src)
        if len(texts) != len(starts):
            raise src.error(f"'answers' has {len(texts)} texts but {len(starts)} answer_start "
                            "values: give one start per text")
    else:
        raise src.error(f"field 'answers' must be a list of {{text, answer_start}} or an object "
                        f"of lists, got {type_name(value)} ({short(value)})")
    for i, (text, start) in enumerate(zip(texts, starts)):
        _check_span(text, start, context, i, src)
    return {"text": list(texts), "answer_start": list(starts)}


def _check_span(text: object, start: object, context: str, index: int, src: Source) -> None:
    """One answer must be a non-empty string found at `answer_start` in the context."""
    if not isinstance(text, str) or not text:
        raise src.error(f"answer {index}: 'text' must be a non-empty string, got {short(text)}")
    if isinstance(start, bool) or not isinstance(start, int):
        raise src.error(f"answer {index}: 'answer_start' must be an integer, got {short(start)}")
    if start < 0 or context[start:start + len(text)] != text:
        found = context[max(start, 0):max(start, 0) + len(text)]
        raise src.error(f"answer {index}: {short(text)} is not at answer_start {start} in the "
                        f"context (found {short(found)}): fix answer_start (a character offset)")


# --- the table ------------------------------------------------------------------------------

FORMATS: tuple[FormatSpec, ...] = (
    FormatSpec("chat", (("messages", "conversations"),), _chat),
    FormatSpec("squad", (("context",), ("question",), ("answers",)), _squad),
    FormatSpec("token_classification", (("tokens",), ("tags", "ner_tags")),
               _token_classification, label_field="tags"),
    FormatSpec("alpaca", (("instruction",), ("output",)), _alpaca),
    FormatSpec("alpaca", (("instruction",), ("instances",)), _alpaca_instances),
    FormatSpec("prompt_completion", (("prompt",), ("completion",)), _prompt_completion),
    FormatSpec("classification", (("text", "sentence"), ("label",)), _classification,
               label_field="label"),
    FormatSpec("text", (("text",),), _text),
)
"""Checked in order: the more specific formats come first (alpaca rows may also carry `text`)."""

FORMAT_NAMES = tuple(dict.fromkeys(spec.name for spec in FORMATS))

OPTIONAL_FIELDS = {"alpaca": ("input",), "squad": ("id", "title", "is_impossible", "plausible_answers"),
                   "classification": ("text", "sentence"), "token_classification": ("tags", "ner_tags")}
"""Fields a format reads besides its required ones (a field close to one of these, or to a required one,
but not it, is a typo the reader warns about)."""


def detect_format(row: dict, src: Source) -> FormatSpec:
    """The first format in `FORMATS` whose required fields `row` has.

    Raises:
        DataError: no format matches; says which one is closest and what it lacks.
    """
    if not isinstance(row, dict):
        raise src.error(f"expected an object (a record), got {type_name(row)} ({short(row)})")
    for spec in FORMATS:
        if spec.matches(row):
            return spec
    fields = ", ".join(sorted(map(str, row))[:12]) or "none"
    closest = max(FORMATS, key=lambda s: len(s.required) - len(s.missing(row)))
    hint = ""
    if len(closest.missing(row)) < len(closest.required):
        hint = f" It looks like {closest.name} but lacks {', '.join(closest.missing(row))}."
    known = "; ".join(spec.describe() for spec in FORMATS)
    raise src.error(f"cannot tell the data format from the fields ({fields}).{hint} "
                    f"Known formats: {known}")


def _mixed_formats(row: dict, src: Source, spec: FormatSpec, first: FormatSpec,
                   first_src: Source) -> DataError:
    """The error for a record whose format differs from the first record's."""
    missing = first.missing(row)
    lacks = f" (it lacks {', '.join(missing)}, or they are null)" if missing else ""
    return src.error(f"this record is {spec.name} format but {first_src} is {first.name}"
                     f"{lacks}: one file (or folder) must hold one format")


def normalize_rows(rows: list[RawRow], path: str, labels: list[str] | None = None) -> RecordSet:
    """Detect the format of every row (all must agree), normalize fields, map labels to ids.

    Args:
        rows: raw rows with their sources, as the readers return them.
        path: what was read, for messages and `RecordSet.path`.
        labels: label names to use (e.g. the training set's, when reading eval data).

    Raises:
        DataError: no rows, a row of unknown or different format, a bad field or label.
    """
    if not rows:
        raise DataError("no records found: the data is empty", path=path)
    first_spec = detect_format(*rows[0])
    records, sources, misspelled = [], [], {}
    for row, src in rows:
        spec = detect_format(row, src)
        if spec.name != first_spec.name:
            raise _mixed_formats(row, src, spec, first_spec, rows[0][1])
        for record in spec.normalize(row, src):
            _check_characters(record, src)
            records.append(record)
            sources.append(src)
        _find_misspelled(row, src, spec, misspelled)
    for field, (meant, src) in misspelled.items():
        warnings.warn(f"{src}: field {field!r} is ignored ({first_spec.name} reads "
                      f"{', '.join(_known_fields(first_spec))}): did you mean {meant!r}? Rename it, or drop it")
    names = None
    if first_spec.label_field:
        names = assign_label_ids(records, sources, first_spec.label_field, labels)
    return RecordSet(first_spec.name, records, sources, names, path)


def _known_fields(spec: FormatSpec) -> list[str]:
    return list(dict.fromkeys([n for names in spec.required for n in names] + list(OPTIONAL_FIELDS.get(spec.name, ()))))


def _find_misspelled(row: dict, src: Source, spec: FormatSpec, found: dict) -> None:
    """Record (first place only) each field of `row` the format ignores that is a near-spelling of one it reads."""
    known = _known_fields(spec)
    for field in row:
        if isinstance(field, str) and field not in known and field not in found:
            close = difflib.get_close_matches(field, known, n=1, cutoff=0.75)
            if close:
                found[field] = (close[0], src)


def _check_characters(value: object, src: Source, where: str = "") -> None:
    """Text the tokenizer cannot take is a data error at its record: a lone UTF-16 surrogate (a broken
    `\\ud800` escape; it has no UTF-8 form) or a NUL character (a binary or truncated export)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise src.error(f"field {where or 'text'} holds a NUL character (at character {value.index(chr(0))}): "
                            "the file looks binary or cut; remove the character or the record")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise src.error(f"field {where or 'text'} holds a lone surrogate {value[err.start]!a} at character "
                            f"{err.start} (a broken \\uXXXX escape, half of a UTF-16 pair): fix or remove it") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_characters(item, src, f"{where}.{key}" if where else repr(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_characters(item, src, f"{where}[{i}]")
