"""Encoder-decoder tasks (lorakit.tasks.seq2seq) on the tiny random T5: encoding, training, generation."""
from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, DataError
from lorakit.tasks import recipe_for
from lorakit.tasks.seq2seq import (IGNORE_INDEX, RECIPE, collate_seq2seq, encode_seq2seq,
                                   evaluate_seq2seq, generate_seq2seq, generation_scores, rouge_l,
                                   source_and_target)
from tests.conftest import tiny_t5
from tests.test_data_helpers import tiny_tokenizer

RECORDS = [
    {"prompt": "The quick brown fox", "completion": "jumps"},
    {"prompt": "Say hello.", "completion": "Hello there!"},
    {"instruction": "Eat well", "input": "", "output": "sleep enough"},
    {"prompt": "What is the name of our company?", "completion": "Marrowind Labs"},
]


def t5_for(tok, seed: int = 0):
    """conftest's tiny T5, its vocabulary resized to the test tokenizer's, stopping at its eos."""
    model = tiny_t5(seed)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    return model


def sources(records) -> list[str]:
    return [source_and_target(r)[0] for r in records]


def train(model, batch: dict, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# --- records, encoding, batches -------------------------------------------------------------

def test_source_and_target_of_each_format():
    assert source_and_target({"prompt": "p", "completion": "c"}) == ("p", "c")
    assert source_and_target({"instruction": "Translate", "input": "hallo", "output": "hello"}) == \
        ("Translate\n\nhallo", "hello")
    assert source_and_target({"instruction": "Say hi", "input": " ", "output": "hi"}) == ("Say hi", "hi")
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "Goodbye"}]}
    assert source_and_target(chat) == ("system: Be brief.\nuser: Hi\nassistant: Hello\nuser: Bye", "Goodbye")


def test_unreadable_records_are_refused():
    with pytest.raises(DataError, match="before the last assistant reply"):
        source_and_target({"messages": [{"role": "assistant", "content": "Hello"}]})
    with pytest.raises(DataError, match="prompt_completion, alpaca, chat"):
        source_and_target({"text": "x", "label": 0})
    from lorakit.data import records_from_dicts

    sentiment = records_from_dicts([{"text": "good", "label": "pos"}], name="sst.tsv")
    with pytest.raises(ConfigError, match="needs prompt_completion or alpaca or chat records"):
        encode_seq2seq(sentiment, tiny_tokenizer(), seq_len=8)


def test_targets_end_with_eos_and_are_truncated():
    tok = tiny_tokenizer()
    examples = encode_seq2seq(RECORDS, tok, seq_len=32)
    assert all(e["labels"][-1] == tok.eos_token_id for e in examples)  # this tokenizer adds none itself
    assert examples[1]["labels"][:-1] == tok("Hello there!")["input_ids"]
    assert examples[1]["input_ids"] == tok("Say hello.")["input_ids"]
    short = encode_seq2seq(RECORDS, tok, seq_len=3, target_len=2)
    assert all(len(e["input_ids"]) <= 3 and len(e["labels"]) == 2 for e in short)
    assert all(e["labels"][-1] == tok.eos_token_id for e in short)


def test_collate_pads_inputs_and_ignores_padded_labels():
    tok = tiny_tokenizer()
    examples = encode_seq2seq(RECORDS[:2], tok, seq_len=32)
    batch = collate_seq2seq(examples, tok)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][1, lengths[1]:].eq(tok.pad_token_id).all()
    n_labels = [len(e["labels"]) for e in examples]
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == n_labels
    assert batch["labels"][0, :n_labels[0]].tolist() == examples[0]["labels"]


# --- scores ---------------------------------------------------------------------------------

def test_rouge_l_and_generation_scores_hand_computed():
    # [cat, sat, on, mat] vs [cat, on, mat, sat]: longest common subsequence cat-on-mat = 3 of 4 each way
    assert rouge_l("the cat sat on the mat", "cat on mat sat") == pytest.approx(0.75)
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 2)  # "a" is an article: [b, c] vs [c, b]
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0
    scores = generation_scores(["Hello there!", "sleep enough"], ["hello there", "sleep"])
    assert scores["exact_match"] == 50.0
    assert scores["f1"] == pytest.approx((100 + 100 * 2 * 1 * 0.5 / 1.5) / 2)
    with pytest.raises(ValueError):
        generation_scores(["a"], [])


def test_recipe_is_registered():
    assert recipe_for("seq2seq") is RECIPE
    assert RECIPE.primary_metric == "eval_loss" and "alpaca" in RECIPE.formats
    assert RECIPE.label_names(RECORDS) is None


# --- models ---------------------------------------------------------------------------------

def test_full_fine_tuning_memorizes_and_evaluate_says_so():
    """The generation path end to end: a T5 that learned the pairs scores 100 on them."""
    tok = tiny_tokenizer()
    model = t5_for(tok)
    before = evaluate_seq2seq(model, tok, RECORDS, 32, 4)
    assert before["exact_match"] == 0
    torch.manual_seed(0)
    train(model, collate_seq2seq(encode_seq2seq(RECORDS, tok, 32), tok), steps=60, lr=1e-2)
    after = evaluate_seq2seq(model, tok, RECORDS, 32, 4)
    assert after["eval_loss"] < 0.3 < before["eval_loss"]
    assert after["exact_match"] == after["f1"] == after["rouge_l"] == 100.0
    assert generate_seq2seq(model, tok, sources(RECORDS), 8, batch_size=3) == \
        [source_and_target(r)[1] for r in RECORDS]


def test_lora_on_q_v_trains_generates_and_round_trips(tmp_path):
    tok = tiny_tokenizer()
    base_texts = generate_seq2seq(t5_for(tok), tok, sources(RECORDS), 6)
    model = get_peft_model(t5_for(tok), LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"],
                                                   task_type="SEQ_2_SEQ_LM"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".q." in n or ".v." in n) for n in trainable)
    assert generate_seq2seq(model, tok, sources(RECORDS), 6) == base_texts  # B = 0: no change yet
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = evaluate_seq2seq(model, tok, RECORDS, 32, 4, generate=False)["eval_loss"]
    torch.manual_seed(0)
    train(model, collate_seq2seq(RECIPE.encode(RECORDS, tok, 32, None), tok), steps=40, lr=3e-2)
    scores = RECIPE.evaluate(model, tok, RECORDS, 32, 4, None)
    assert scores["eval_loss"] < 0.85 * before
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    texts = generate_seq2seq(model, tok, sources(RECORDS), max(len(e["labels"]) for e in
                                                               encode_seq2seq(RECORDS, tok, 32)))
    references = [source_and_target(r)[1] for r in RECORDS]
    assert {k: scores[k] for k in ("exact_match", "f1", "rouge_l")} == generation_scores(references, texts)
    # PeftModel.generate takes the encoder inputs directly; the adapter can be switched off
    enc = tok(sources(RECORDS)[:1], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] <= 7
    with model.disable_adapter():
        assert generate_seq2seq(model, tok, sources(RECORDS), 6) == base_texts
    # save, then load on a fresh base: the same outputs
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(t5_for(tok), tmp_path / "adapter")
    assert generate_seq2seq(loaded, tok, sources(RECORDS), 6) == generate_seq2seq(model, tok, sources(RECORDS), 6)


def test_a_saved_encoder_decoder_folder_loads_as_seq2seq_without_naming_the_task(tmp_path):
    """`lorakit inspect FOLDER` (task None) on a T5 folder: the task comes from its config.json."""
    from lorakit.models import load_model

    tok = tiny_tokenizer()
    t5_for(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), task=None)
    assert loaded.task == "seq2seq" and type(loaded.model).__name__ == "T5ForConditionalGeneration"
