"""Readers and format detection: every format, its errors (file + line + field), real data."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from lorakit.data import FORMATS, read_records, records_from_dicts
from lorakit.errors import DataError
from tests.test_data_helpers import shared_data, write


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_error(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_records(path, **kwargs)
    return str(info.value)


# --- one file per format --------------------------------------------------------------------

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi?"},
                     {"role": "assistant", "content": "Hello."}]}

FORMAT_CASES = [
    ("alpaca", {"instruction": "Add.", "input": "1+1", "output": "2"},
     {"instruction": "Add.", "input": "1+1", "output": "2"}),
    ("alpaca", {"instruction": "Say hi.", "output": "hi", "text": "ignored"},
     {"instruction": "Say hi.", "input": "", "output": "hi"}),
    ("chat", CHAT, CHAT),
    ("chat", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
    ("prompt_completion", {"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "completion": "4"}),
    ("text", {"text": "Just text."}, {"text": "Just text."}),
    ("classification", {"sentence": "great", "label": 1}, {"text": "great", "label": 1}),
    ("token_classification", {"tokens": ["EU", "rejects"], "ner_tags": [3, 0]},
     {"tokens": ["EU", "rejects"], "tags": [3, 0]}),
    ("squad", {"context": "Paris is in France.", "question": "Where is Paris?",
               "answers": {"text": ["France"], "answer_start": [12]}},
     {"id": "", "title": "", "context": "Paris is in France.", "question": "Where is Paris?",
      "answers": {"text": ["France"], "answer_start": [12]}, "is_impossible": False}),
]


@pytest.mark.parametrize("fmt,row,normalized", FORMAT_CASES)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_each_format_is_detected_and_normalized(tmp_path, fmt, row, normalized, suffix):
    body = jsonl(row, row) if suffix == ".jsonl" else json.dumps([row, row], indent=1)
    data = read_records(write(tmp_path, "d" + suffix, body))
    assert data.format == fmt
    assert data.records == [normalized, normalized]
    assert [s.line for s in data.sources] == ([1, 2] if suffix == ".jsonl" else [2, 2 + len(
        json.dumps(row, indent=1).splitlines())])


def test_format_table_is_ordered_specific_first():
    names = [spec.name for spec in FORMATS]
    assert names.index("classification") < names.index("text")
    assert names.index("alpaca") < names.index("text")


def test_seed_task_instances_expand_to_alpaca(tmp_path):
    row = {"instruction": "Antonym?", "instances": [{"input": "hot", "output": "cold"},
                                                    {"input": "up", "output": "down"}]}
    data = read_records(write(tmp_path, "seed.jsonl", jsonl(row)))
    assert data.format == "alpaca" and len(data) == 2
    assert data.records[1] == {"instruction": "Antonym?", "input": "up", "output": "down"}


def test_string_labels_build_a_sorted_label_list(tmp_path):
    path = write(tmp_path, "c.csv", "text,label\n\"good, very\",pos\nbad,neg\nok,pos\n")
    data = read_records(path)
    assert data.format == "classification" and data.labels == ["neg", "pos"]
    assert [r["label"] for r in data] == [1, 0, 1] and data.records[0]["text"] == "good, very"
    assert data.label2id == {"neg": 0, "pos": 1} and data.id2label == {0: "neg", 1: "pos"}


def test_integer_labels_keep_their_ids_and_given_labels_are_enforced(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl({"text": "a", "label": 2}, {"text": "b", "label": 0}))
    data = read_records(path)
    assert data.labels == ["0", "1", "2"] and [r["label"] for r in data] == [2, 0]
    named = read_records(path, labels=["neg", "neutral", "pos"])
    assert [r["label"] for r in named] == [2, 0] and named.labels == ["neg", "neutral", "pos"]
    message = read_error(path, labels=["neg", "pos"])
    assert "c.jsonl:1:" in message and "not one of the known labels" in message


def test_a_text_label_among_integers_is_pointed_out(tmp_path):
    path = write(tmp_path, "c.tsv", "sentence\tlabel\na\t0\nb\t1\nc\tpositive\nd\t1\n")
    with pytest.warns(UserWarning, match=r"c.tsv:4: label 'positive' in 'label' is text, while 3 other labels "
                                         r"are integers: a typo\? It becomes a class of its own \(labels: 0, 1, positive\)"):
        data = read_records(path)
    assert data.labels == ["0", "1", "positive"]  # still read: mixed label sets can be meant


@pytest.mark.parametrize("label,words", [(0.5, "integer or string"), (-1, "out of range"),
                                         (None, "lacks label"), ([1], "integer or string")])
def test_bad_labels(tmp_path, label, words):
    rows = [{"text": "fine", "label": 1}, {"text": "x", "label": label}]
    message = read_error(write(tmp_path, "c.jsonl", jsonl(*rows)))
    assert "c.jsonl:2:" in message and words in message


def test_tsv_reads_tabs_and_keeps_quotes(tmp_path):
    path = write(tmp_path, "s.tsv", 'sentence\tlabel\nsays "hi" , ok\t1\n\nno\t0\n')
    data = read_records(path)
    assert data.records[0]["text"] == 'says "hi" , ok' and [s.line for s in data.sources] == [2, 4]


def test_csv_multiline_field_reports_the_line_it_starts_on(tmp_path):
    path = write(tmp_path, "a.csv", 'instruction,output\n"two\nlines",x\nthird,\n')
    message = read_error(path)
    assert "a.csv:4:" in message and "'output' is empty" in message


def test_csv_list_cells_hold_json(tmp_path):
    path = write(tmp_path, "t.csv", 'tokens,tags\n"[""EU"", ""rejects""]","[""B-ORG"", ""O""]"\n')
    data = read_records(path)
    assert data.format == "token_classification" and data.records[0]["tokens"] == ["EU", "rejects"]
    assert data.labels == ["O", "B-ORG"] and data.records[0]["tags"] == [1, 0]


def test_conll_columns(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP I-NP B-ORG\nrejects VBZ I-VP O\n\n\nPeter NNP I-NP B-PER\n"
    data = read_records(write(tmp_path, "ner.conll", text))
    assert data.format == "token_classification"
    assert data.records[0]["tokens"] == ["EU", "rejects"] and data.labels == ["O", "B-ORG", "B-PER"]
    assert [s.line for s in data.sources] == [3, 7] and data.records[1]["tags"] == [2]


def test_squad_json_nested(tmp_path):
    doc = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{
        "context": "Rome is in Italy.",
        "qas": [{"id": "q1", "question": "Where is Rome?", "answers": [{"text": "Italy", "answer_start": 11}]},
                {"id": "q2", "question": "Why?", "answers": [], "is_impossible": True}]}]}]}
    data = read_records(write(tmp_path, "sq.json", json.dumps(doc, indent=2)))
    assert data.format == "squad" and [r["is_impossible"] for r in data] == [False, True]
    assert data.records[0]["answers"] == {"text": ["Italy"], "answer_start": [11]}
    assert data.records[0]["title"] == "T" and data.records[1]["answers"]["text"] == []
    lines = json.dumps(doc, indent=2).splitlines()
    assert [lines[s.line - 1].strip().startswith('"question"') for s in data.sources] == [True, True]


@pytest.mark.parametrize("qa,words", [
    ({"question": "Q", "answers": [{"text": "Italy", "answer_start": 3}]}, "not at answer_start 3"),
    ({"question": "Q", "answers": [{"text": "Italy"}]}, "'answer_start' must be an integer"),
    ({"question": "Q", "answers": [{"text": "Italy", "answer_start": 11}], "is_impossible": True},
     "is_impossible"),
    ({"question": "", "answers": []}, "'question' is empty"),
])
def test_squad_errors_name_the_question_line(tmp_path, qa, words):
    doc = {"data": [{"paragraphs": [{"context": "Rome is in Italy.", "qas": [qa]}]}]}
    message = read_error(write(tmp_path, "sq.json", json.dumps(doc, indent=2)))
    assert words in message and "sq.json:" in message


def test_folder_reads_every_file_in_order_and_skips_readme(tmp_path):
    write(tmp_path, "b.jsonl", jsonl({"text": "two"}))
    write(tmp_path, "a/a.jsonl", jsonl({"text": "one"}))
    write(tmp_path, "README.md", "# notes")
    write(tmp_path, "README.txt", "not conll at all")
    write(tmp_path, ".hidden.jsonl", "broken")
    data = read_records(tmp_path)
    assert [r["text"] for r in data] == ["one", "two"] and data.sources[1].path.endswith("b.jsonl")


def test_folder_with_two_formats_is_refused(tmp_path):
    write(tmp_path, "a.jsonl", jsonl({"text": "one"}))
    write(tmp_path, "b.jsonl", jsonl({"prompt": "p", "completion": "c"}))
    message = read_error(tmp_path)
    assert "b.jsonl:1:" in message and "prompt_completion" in message and "a.jsonl:1" in message


def test_json_file_holding_json_lines_and_data_wrapper(tmp_path):
    assert len(read_records(write(tmp_path, "x.json", jsonl({"text": "a"}, {"text": "b"})))) == 2
    wrapped = write(tmp_path, "w.json", json.dumps({"data": [{"text": "a"}, {"nope": 1}]}))
    assert "JSON list index 1" in read_error(wrapped)


def test_in_memory_records():
    data = records_from_dicts([{"prompt": "p", "completion": "c"}], name="mem")
    assert data.format == "prompt_completion"
    with pytest.raises(DataError, match=r"mem: JSON list index 1: .*'completion' must be a string"):
        records_from_dicts([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 3}], "mem")


# --- errors ---------------------------------------------------------------------------------

BAD_JSONL = [
    ([{"text": "a"}, {"instruction": "i", "output": "o"}], 2, "alpaca format but"),
    ([{"instruction": "only"}], 1, "looks like alpaca but lacks output"),
    ([{"instruction": 1, "output": "o"}], 1, "field 'instruction' must be a string, got an integer"),
    ([{"what": 1}], 1, "cannot tell the data format"),
    ([{"messages": "hi"}], 1, "field 'messages' must be a list"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], 1, "'messages'[0].role must be one of"),
    ([{"messages": [{"role": "user", "content": 5}]}], 1, "'messages'[0].content must be a string"),
    ([{"messages": [{"role": "user", "content": "x"}]}], 1, "no assistant message"),
    ([{"messages": ["x"]}], 1, "'messages'[0] must be an object"),
    ([{"tokens": ["a", "b"], "tags": ["O"]}], 1, "'tokens' has 2 items but 'tags' has 1"),
    ([{"tokens": [], "tags": []}], 1, "'tokens' is an empty list"),
    ([{"text": "   "}], 1, "field 'text' is empty"),
    ([{"prompt": "p", "completion": None, "text": 3}], 1, "field 'text' must be a string"),
]


@pytest.mark.parametrize("rows,line,words", BAD_JSONL)
def test_bad_rows_name_file_line_and_field(tmp_path, rows, line, words):
    message = read_error(write(tmp_path, "bad.jsonl", jsonl(*rows)))
    assert f"bad.jsonl:{line}:" in message and words in message


BAD_FILES = [
    ("e.jsonl", "", None, "empty"),
    ("e.jsonl", "\n  \n", None, "empty"),
    ("e.json", "  ", None, "empty"),
    ("e.json", "[]", None, "empty"),
    ("e.csv", "", 1, "empty"),
    ("e.csv", "text,label\n", None, "no rows"),
    ("e.tsv", "", 1, "empty"),
    ("e.txt", "\n\n-DOCSTART- O\n", None, "no sentences"),
    ("j.jsonl", '{"text": "a"}\n\n{"text": "b",}\n', 3, "invalid JSON"),
    ("j.jsonl", '["text"]\n', 1, "expected one JSON object per line"),
    ("j.json", '[{"text": "a"},\n {"text": ]', 2, "invalid JSON"),
    ("j.json", '"text"', None, "expected a JSON list of records"),
    ("j.json", '[{"text": "a"}, 3]', 1, "JSON list index 1: expected a JSON object"),
    ("j.json", "[" * 100000, None, "invalid JSON"),
    ("c.csv", "text,label\na,1\nb,1,extra\n", 3, "3 columns, but the header has 2"),
    ("c.csv", "text,text\na,b\n", 1, "names column 'text' twice"),
    ("c.csv", "text,\na,b\n", 1, "column 2 has no name"),
    ("c.tsv", "sentence\tlabel\nx\n", 2, "1 columns, but the header has 2 (sentence, label): give every column a value"),
    ("c.tsv", "sentence\tlabel\nx\t1\t2\n", 2, "3 columns, but the header has 2 (sentence, label): a field must not"),
    ("c.csv", "text,label\n" + "x" * 200_000 + ",1\n", 2, "cannot parse CSV"),
    ("c.csv", 'text,label\nok,1\n"never closed,1\n', None, "cannot parse CSV"),
    ("n.txt", "EU B-ORG\nrejects\n", 2, "one column"),
    ("n.txt", "EU NNP B-ORG\nrejects O\n", 2, "2 columns, but line 1 has 3"),
    ("u.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', 2, "not UTF-8"),
    ("x.xlsx", "whatever", None, "unsupported file type '.xlsx'"),
]


@pytest.mark.parametrize("name,content,line,words", BAD_FILES)
def test_bad_files(tmp_path, name, content, line, words):
    message = read_error(write(tmp_path, name, content))
    assert words in message and name in message
    if line is not None:
        assert f"{name}:{line}:" in message


def test_missing_path_and_empty_folder(tmp_path):
    assert "no such file or folder" in read_error(tmp_path / "missing.jsonl")
    assert "no data files" in read_error(tmp_path)
    assert "no data given" in read_error("")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    assert "pip install pyarrow" in read_error(write(tmp_path, "d.parquet", b"PAR1"))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_round_trip(tmp_path):  # pragma: no cover - runs where pyarrow is installed
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": "x"}]), tmp_path / "d.parquet")
    data = read_records(tmp_path / "d.parquet")
    assert data.format == "classification" and str(data.sources[0]).endswith("(row 1)")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hub_name_without_datasets_names_the_alternatives():
    message = read_error("someone/some-dataset")
    assert "datasets" in message and ".jsonl" in message and "local" in message


def test_hub_dataset_through_a_stand_in_datasets_module(monkeypatch):
    class Dataset(list):
        features = {"label": types.SimpleNamespace(names=["neg", "pos"])}

    def load_dataset(name, split):
        if name == "offline/name":
            raise ConnectionError("no network")
        return Dataset([{"text": "good", "label": 1}, {"text": "bad", "label": 0}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = read_records("user/sentiment", split="validation")
    assert data.format == "classification" and data.labels == ["neg", "pos"]
    assert str(data.sources[1]) == "user/sentiment[validation] (row 2)"
    message = read_error("offline/name")
    assert "ConnectionError: no network" in message and "local" in message


# --- the real data sets in ../shared/data ---------------------------------------------------

def test_sst2_tsv():
    data = read_records(shared_data("sst2", "dev.tsv"))
    assert data.format == "classification" and len(data) == 872 and data.labels == ["0", "1"]
    assert data.sources[0].line == 2 and set(r["label"] for r in data) == {0, 1}


@pytest.mark.parametrize("name,count", [("alpaca_tiny_torchtune.json", 100),
                                        ("alpaca_small_2k.json", 2000),
                                        ("alpaca_data_1k_bloomlora.json", 1000)])
def test_alpaca_json(name, count):
    data = read_records(shared_data("alpaca", name))
    assert data.format == "alpaca" and len(data) == count
    assert all(r["instruction"] and r["output"] for r in data)


def test_alpaca_folder_with_seed_tasks():
    data = read_records(shared_data("alpaca"))
    assert data.format == "alpaca" and len(data) > 3100


def test_conll2003():
    data = read_records(shared_data("conll2003", "dev.txt"))
    assert data.format == "token_classification" and len(data) == 3250
    assert data.labels[0] == "O" and len(data.labels) == 9 and data.sources[0].line == 3


def test_squad_tiny():
    data = read_records(shared_data("squad_tiny", "squad_v2_dev_normans.json"))
    assert data.format == "squad" and len(data) == 208
    assert sum(r["is_impossible"] for r in data) == 112
    assert data.records[0]["question"] == "In what country is Normandy located?"
