"""Data a tokenizer or a trainer cannot take is a DataError at its file and line, before any model loads;
a near-miss field name is named in a warning rather than silently ignored."""
from __future__ import annotations

import warnings

import pytest

from lorakit.data import read_records
from lorakit.errors import DataError


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, text, where, field", [
    ("alpaca.jsonl", '{"instruction": "a", "output": "ok"}\n{"instruction": "b", "output": "\\ud800"}\n',
     "alpaca.jsonl:2", "'output'"),
    ("chat.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y \\udc00"}]}\n',
     "chat.jsonl:1", "'messages'[1].content"),
    ("text.json", '[{"text": "fine"}, {"text": "fine"}, {"text": "x \\ud83d"}]', "JSON list index 2", "'text'"),
])
def test_a_lone_surrogate_is_an_error_at_its_line(tmp_path, name, text, where, field):
    with pytest.raises(DataError) as info:
        read_records(_write(tmp_path, name, text))
    message = str(info.value)
    assert where in message and field in message and "lone surrogate" in message


def test_a_lone_surrogate_would_crash_the_tokenizer(tmp_path):
    """Why it is checked at reading: the tokenizer's own failure is a TypeError with no file or line."""
    from tests.test_data_helpers import tiny_tokenizer

    with pytest.raises((TypeError, UnicodeEncodeError)):
        tiny_tokenizer()(["x \ud800"])


def test_a_nul_byte_in_a_csv_field_is_an_error_at_its_line(tmp_path):
    path = _write(tmp_path, "cls.csv", 'text,label\nfine,pos\n"a\x00b",neg\n')
    with pytest.raises(DataError, match=r"cls\.csv:3: field 'text' holds a NUL character"):
        read_records(path)


def test_a_misspelled_field_is_named_with_what_was_meant(tmp_path):
    path = _write(tmp_path, "a.jsonl", '{"instruction": "a", "output": "b"}\n'
                                       '{"instruction": "c", "output": "d", "outptu": "e"}\n'
                                       '{"instruction": "c", "output": "d", "outptu": "f", "source": "web"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_records(path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1  # once per field, at its first line; an unrelated extra field ('source') is fine
    assert "a.jsonl:2" in messages[0] and "'outptu' is ignored" in messages[0] and "did you mean 'output'" in messages[0]
    assert [r["output"] for r in records.records] == ["b", "d", "d"]


def test_a_classifier_with_one_class_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import lorakit.models
    from lorakit.cli.main import main

    monkeypatch.setattr(lorakit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = _write(tmp_path, "one.jsonl", "".join(f'{{"text": "t{i}", "label": "pos"}}\n' for i in range(8)))
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "seq-cls", "--data", data, "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "one.jsonl" in err and "every record has the label 'pos'" in err
    assert not (tmp_path / "run").exists()
