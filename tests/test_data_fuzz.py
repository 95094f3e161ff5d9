"""Fuzzing the readers: whatever bytes, text or JSON a data file holds, reading it either
succeeds or raises `DataError` naming the file. Nothing else may escape."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.data import RecordSet, read_records, records_from_dicts
from lorakit.errors import DataError

SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".conll"]
FIELDS = ["instruction", "input", "output", "instances", "messages", "conversations", "role",
          "content", "from", "value", "prompt", "completion", "text", "sentence", "label",
          "tokens", "tags", "ner_tags", "context", "question", "answers", "answer_start",
          "is_impossible", "id", "title", "data", "paragraphs", "qas"]

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=True) | \
    st.text(max_size=12) | st.sampled_from(["user", "assistant", "O", "B-PER", "0", "1"])
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=5),
    max_leaves=20)
records = st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=5)


def check_file(suffix: str, content: bytes | str) -> None:
    """Write `content` to a file with `suffix`; reading must succeed or raise DataError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogatepass")
        path.write_bytes(content)
        try:
            result = read_records(path)
        except DataError as e:
            assert str(path) in str(e)
        else:
            assert isinstance(result, RecordSet) and len(result) > 0


@FUZZ
@given(st.sampled_from(SUFFIXES), st.binary(max_size=300))
def test_random_bytes(suffix, content):
    check_file(suffix, content)


@FUZZ
@given(st.sampled_from(SUFFIXES), st.text(alphabet=st.characters(blacklist_categories=["Cs"]),
                                          max_size=300))
def test_random_text(suffix, content):
    check_file(suffix, content)


@FUZZ
@given(st.lists(records, min_size=1, max_size=4), st.booleans())
def test_random_records_as_json_list_or_jsonl(rows, as_list):
    if as_list:
        check_file(".json", json.dumps(rows, indent=1))
    else:
        check_file(".jsonl", "".join(json.dumps(r) + "\n" for r in rows))


@FUZZ
@given(json_values)
def test_random_json_documents(doc):
    check_file(".json", json.dumps(doc))
    check_file(".json", json.dumps({"data": [{"paragraphs": [doc]}]}))


@FUZZ
@given(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True),
       st.lists(st.lists(st.text(alphabet=string.printable, max_size=8), min_size=1, max_size=5),
                max_size=4),
       st.sampled_from([",", "\t"]))
def test_random_tables(header, rows, delimiter):
    lines = [delimiter.join(header)] + [delimiter.join(row) for row in rows]
    check_file(".csv" if delimiter == "," else ".tsv", "\n".join(lines) + "\n")


@FUZZ
@given(st.lists(st.lists(st.text(alphabet=string.ascii_letters + "-_.", min_size=1, max_size=5),
                         max_size=4), max_size=8))
def test_random_conll(lines):
    check_file(".txt", "\n".join(" ".join(cells) for cells in lines))


@FUZZ
@given(st.lists(records, min_size=1, max_size=3))
def test_random_in_memory_records(rows):
    try:
        records_from_dicts(rows, "mem")
    except DataError as e:
        assert str(e).startswith("mem")
