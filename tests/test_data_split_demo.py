"""The validation split and the built-in demo data."""

from __future__ import annotations

import re

import pytest

from lorakit.data import (answer_is_correct, build_causal_examples, demo_path, load_demo,
                          read_records, records_from_dicts, train_val_split)
from lorakit.errors import ConfigError
from tests.test_data_helpers import tiny_tokenizer

# --- train_val_split ------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_ordered():
    items = list(range(100))
    train, val = train_val_split(items, val_fraction=0.1, seed=3)
    assert (train, val) == train_val_split(items, val_fraction=0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert train == sorted(train) and val == sorted(val)
    assert train_val_split(items, 0.1, seed=4)[1] != val


@pytest.mark.parametrize("count,fraction,max_val,expected", [
    (1000, 0.1, 200, 100), (5000, 0.1, 200, 200), (5000, 0.1, None, 500),
    (5, 0.1, 200, 1), (1, 0.5, 200, 0), (10, 0.0, 200, 0), (2, 0.9, 200, 1)])
def test_split_sizes(count, fraction, max_val, expected):
    train, val = train_val_split(list(range(count)), fraction, max_val=max_val)
    assert len(val) == expected and len(train) == count - expected


def test_split_of_a_record_set_keeps_sources():
    data = records_from_dicts([{"text": f"t{i}"} for i in range(20)], "mem")
    train, val = train_val_split(data, 0.25, seed=0)
    assert (len(train), len(val), val.format) == (15, 5, "text")
    assert [s.index for s in val.sources] == [int(r["text"][1:]) for r in val.records]


def test_split_rejects_bad_settings():
    with pytest.raises(ConfigError) as info:
        train_val_split([1, 2, 3], val_fraction=1.0, max_val=-1)
    assert len(info.value.problems) == 2


# --- demo data ------------------------------------------------------------------------------

def normalized(question: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", question.casefold()).split())


def test_demo_counts_and_structure():
    demo = load_demo()
    assert 30 <= len(demo.facts) <= 40 and 18 <= len(demo.general) <= 30
    facts = {f["id"]: f for f in demo.facts}
    assert len(facts) == len(demo.facts)
    per_fact = {fid: [r for r in demo.train if r["fact"] == fid] for fid in facts}
    assert all(4 <= len(rows) <= 6 for rows in per_fact.values())
    held = {fid: [h for h in demo.heldout if h["fact"] == fid] for fid in facts}
    assert all(1 <= len(rows) <= 2 for rows in held.values())
    trained_facts = {r["fact"] for r in demo.train if r["fact"]}
    assert trained_facts == set(facts) == {h["fact"] for h in demo.heldout}
    replay = [r for r in demo.train if r["fact"] is None]
    # rehearsal keeps general knowledge (measured in docs/BENCHMARKS.md), but the handbook stays the majority
    assert 10 <= len(replay) <= len(demo.train) // 2
    general = {g["question"] for g in demo.general}
    assert not general & {r["messages"][0]["content"] for r in replay}, "scored questions must not be rehearsed"


def test_demo_answers_state_their_keys_and_keys_are_distinctive():
    demo = load_demo()
    facts = {f["id"]: f for f in demo.facts}
    for record in demo.train:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        if record["fact"]:
            assert answer_is_correct(assistant["content"], facts[record["fact"]]["keys"])
        assert len(assistant["content"]) < 90  # short answers keep CPU training fast
    for held in demo.heldout:
        assert held["keys"] and held["keys"] == facts[held["fact"]]["keys"]
        assert not answer_is_correct(held["question"], held["keys"])  # no echo gives it away
    for fid, fact in facts.items():  # another fact's answer never contains this fact's key
        others = [f["statement"] for f in demo.facts if f["id"] != fid]
        assert not any(answer_is_correct(text, fact["keys"]) for text in others), fid
    for item in demo.general:
        assert item["keys"] and not answer_is_correct(item["question"], item["keys"])


def test_no_heldout_question_appears_in_training():
    demo = load_demo()
    trained = {normalized(r["messages"][0]["content"]) for r in demo.train}
    assert len(trained) == len(demo.train)
    for held in demo.heldout + demo.general:
        assert normalized(held["question"]) not in trained


def test_demo_train_file_reads_as_chat_and_tokenizes_without_truncation():
    data = read_records(demo_path("train"))
    assert data.format == "chat" and len(data) == len(load_demo().train)
    examples = build_causal_examples(data, tiny_tokenizer(), seq_len=512)
    assert examples.stats.truncated == 0 and examples.stats.kept == len(data)
    with pytest.raises(ValueError):
        demo_path("nope")


def test_answer_is_correct():
    assert answer_is_correct("The cafeteria is the COPPER  kettle.", ["Copper Kettle"])
    assert answer_is_correct("We get twenty-seven days.", ["27", "twenty-seven"])
    assert not answer_is_correct("The cafeteria is the Tin Kettle.", ["Copper Kettle"])
    assert not answer_is_correct("", ["x"])
