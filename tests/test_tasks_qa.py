"""Extractive QA (lorakit.tasks.qa): span encoding, post-processing, SQuAD v2 scoring, training."""
from __future__ import annotations

import string

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.tasks import recipe_for
from lorakit.tasks.qa import (RECIPE, answer_positions, best_answers, collate_qa, encode_qa,
                              evaluate_qa, exact_match, normalize_answer, squad_scores, token_f1)
from tests.conftest import SHARED_DATA

WORDS = ("the normans were in normandy france when did vikings rollo come from denmark iceland "
         "and norway who was their leader year 911 king charles filler text here is some").split()


def bert_tokenizer():
    """A BERT-style WordPiece tokenizer ([CLS] q [SEP] c [SEP], token_type_ids), built locally."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars + string.punctuation)
             + ["##" + c for c in chars] + WORDS)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def tiny_bert_qa(vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=vocab_size, max_position_embeddings=128)
    return BertForQuestionAnswering(cfg).eval()


def squad(context: str, question: str, answer: str | None, qid: str = "q") -> dict:
    """A normalized squad record; answer None = unanswerable."""
    answers = {"text": [], "answer_start": []}
    if answer is not None:
        answers = {"text": [answer], "answer_start": [context.index(answer)]}
    return {"id": qid, "title": "t", "context": context, "question": question, "answers": answers,
            "is_impossible": answer is None}


CONTEXT = "The Normans were in Normandy, France. Their leader was Rollo."
ANSWERED = squad(CONTEXT, "Who was their leader?", "Rollo", "a")
IMPOSSIBLE = squad(CONTEXT, "When did the vikings come?", None, "b")


def span_text(feature: dict, record: dict) -> str:
    offsets = feature["offsets"]
    return record["context"][offsets[feature["start_positions"]][0]:offsets[feature["end_positions"]][1]]


# --- encoding -------------------------------------------------------------------------------

def test_answer_tokens_are_found_through_the_offsets():
    tok = bert_tokenizer()
    [feature] = encode_qa([ANSWERED], tok, seq_len=64)
    assert feature["cls_index"] == 0 and feature["input_ids"][0] == tok.cls_token_id
    assert span_text(feature, ANSWERED) == "Rollo"
    assert tok.decode(feature["input_ids"][feature["start_positions"]:feature["end_positions"] + 1]) == "rollo"
    # question tokens and special tokens have no context offsets
    sep = feature["input_ids"].index(tok.sep_token_id)
    assert all(o is None for o in feature["offsets"][:sep + 1]) and feature["offsets"][-1] is None
    assert set(feature["token_type_ids"][sep + 1:]) == {1}


def test_unanswerable_question_points_at_cls():
    [feature] = encode_qa([IMPOSSIBLE], bert_tokenizer(), seq_len=64)
    assert (feature["start_positions"], feature["end_positions"]) == (0, 0)


def test_long_context_is_split_into_overlapping_windows():
    tok = bert_tokenizer()
    filler = " ".join(["filler text here is some"] * 12)
    context = f"{filler}. The leader was Rollo from Denmark. {filler}."
    record = squad(context, "Who was the leader?", "Rollo from Denmark")
    features = encode_qa([record], tok, seq_len=32, stride=8)
    assert len(features) >= 4 and all(len(f["input_ids"]) <= 32 for f in features)
    assert {f["example_index"] for f in features} == {0}
    answered = [f for f in features if f["start_positions"] != f["cls_index"]]
    assert answered, "no window holds the answer"
    assert all(span_text(f, record) == "Rollo from Denmark" for f in answered)
    start = context.index("Rollo")
    for f in features:  # a window without the whole answer must point at CLS
        spans = [o for o in f["offsets"] if o is not None]
        holds = spans[0][0] <= start and spans[-1][1] >= start + len("Rollo from Denmark")
        assert holds == (f in answered)
    # neighbouring windows share exactly `stride` context tokens
    first, second = ([o for o in f["offsets"] if o is not None] for f in features[:2])
    assert first[-8:] == second[:8]


def test_answer_positions_outside_the_window():
    record = squad("aaa bbb ccc", "q", "ccc")
    offsets = [None, (0, 3), (4, 7), None]  # the window ends before "ccc"
    assert answer_positions(record, offsets, cls_index=0) == (0, 0)
    assert answer_positions(record, [None, (4, 7), (8, 11), None], 0) == (2, 2)


def test_overlong_question_is_cut_and_tiny_seq_len_refused():
    tok = bert_tokenizer()
    long_question = " ".join(["who was the leader"] * 20) + "?"
    features = encode_qa([squad(CONTEXT, long_question, "Rollo")], tok, seq_len=48)
    assert all(len(f["input_ids"]) <= 48 for f in features)
    assert any(span_text(f, ANSWERED) == "Rollo" for f in features if f["start_positions"])
    with pytest.raises(ConfigError, match="seq-len"):
        encode_qa([ANSWERED], tok, seq_len=4)


def test_records_of_another_format_are_refused():
    from lorakit.data import records_from_dicts

    sentiment = records_from_dicts([{"text": "good", "label": "pos"}], name="sst.tsv")
    with pytest.raises(ConfigError, match="needs squad records, but sst.tsv holds classification records: "
                                          "train it with --task seq-cls"):
        encode_qa(sentiment, bert_tokenizer(), seq_len=64)
    chats = records_from_dicts([{"instruction": "say hi", "output": "hi"}], name="a.jsonl")
    with pytest.raises(ConfigError, match="holds alpaca records: train it with --task causal-lm or seq2seq"):
        encode_qa(chats, bert_tokenizer(), seq_len=64)


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast tokenizer"):
        encode_qa([ANSWERED], Slow(), seq_len=64)


def test_collate_pads_right_with_positions():
    tok = bert_tokenizer()
    features = encode_qa([ANSWERED, squad("Rollo.", "Who?", "Rollo")], tok, seq_len=64)
    batch = collate_qa(features, tok)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions",
                          "end_positions"}
    short = len(features[1]["input_ids"])
    assert batch["input_ids"].shape == (2, len(features[0]["input_ids"]))
    assert batch["attention_mask"][1].sum() == short and (batch["input_ids"][1, short:] == 0).all()
    assert batch["start_positions"].tolist() == [f["start_positions"] for f in features]


# --- post-processing ------------------------------------------------------------------------

def _logits(n: int, marks: dict[int, float]) -> torch.Tensor:
    out = torch.zeros(n)
    for i, v in marks.items():
        out[i] = v
    return out


def test_best_span_across_features_and_null_score():
    ctx = "aaa bbb ccc ddd"
    record = squad(ctx, "q", "ccc")
    offsets_a = [None, None, (0, 3), (4, 7), None]
    offsets_b = [None, None, (8, 11), (12, 15), None]
    features = [{"example_index": 0, "cls_index": 0, "offsets": offsets_a},
                {"example_index": 0, "cls_index": 0, "offsets": offsets_b}]
    # feature a: span "bbb" scores 2 + 2; feature b: span "ccc" scores 5 + 5; question tokens (1) are higher still
    starts = [_logits(5, {1: 9, 3: 2}), _logits(5, {1: 9, 2: 5})]
    ends = [_logits(5, {1: 9, 3: 2}), _logits(5, {1: 9, 2: 5})]
    assert best_answers([record], features, starts, ends) == ["ccc"]
    # a null score (CLS) above the best span means "no answer" in SQuAD v2 mode; the lowest
    # CLS score over the features counts
    starts[0][0], ends[0][0], starts[1][0], ends[1][0] = 4, 4, 20, 20  # null scores 8 and 40
    assert best_answers([record], features, starts, ends) == ["ccc"]  # lowest null 8 < span 10
    starts[0][0] = 20  # null scores 24 and 40: both beat the span
    assert best_answers([record], features, starts, ends) == [""]
    assert best_answers([record], features, starts, ends, allow_unanswerable=False) == ["ccc"]
    # spans longer than max_answer_len, or reversed, never count
    wide = [_logits(5, {2: 5}), _logits(5, {})]
    wide_end = [_logits(5, {3: 5}), _logits(5, {})]
    assert best_answers([record], features, wide, wide_end, allow_unanswerable=False) == ["aaa bbb"]
    assert best_answers([record], features, wide, wide_end, max_answer_len=1,
                        allow_unanswerable=False) != ["aaa bbb"]
    assert best_answers([record], features, wide_end, wide, allow_unanswerable=False) != ["aaa bbb"]


# --- scoring --------------------------------------------------------------------------------

def test_normalization_follows_the_official_script():
    assert normalize_answer("The  Normans!") == "normans"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    assert exact_match("A France.", "france") == 1
    assert exact_match("France", "in France") == 0


def test_token_f1_hand_computed():
    # gold [cat, sat], prediction [cat, sat, on, mat]: precision 2/4, recall 2/2
    assert token_f1("the cat sat", "cat sat on mat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("x b b", "b b b") == pytest.approx(2 / 3)  # multiset overlap: 2 of 3 each way
    assert token_f1("a b b", "b b b") == pytest.approx(0.8)  # "a" is an article: gold is [b, b]
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x", "") == 0.0
    assert token_f1("red", "blue") == 0.0


def test_squad_scores_best_gold_unanswerable_and_breakdown():
    ctx = "Denmark, Iceland and Norway"
    answered = squad(ctx, "q", "Denmark", "1")
    answered["answers"] = {"text": ["Denmark", "Denmark, Iceland and Norway"], "answer_start": [0, 0]}
    impossible = squad(ctx, "q", None, "2")
    scores = squad_scores([answered, impossible], ["Iceland and Norway", ""])
    # best gold for the answered one: [denmark iceland and norway] vs [iceland and norway] -> 6/7
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx((600 / 7 + 100) / 2)
    assert scores["has_ans_f1"] == pytest.approx(600 / 7) and scores["has_ans_exact_match"] == 0
    assert scores["no_ans_f1"] == 100 and scores["no_ans_exact_match"] == 100
    assert squad_scores([impossible], ["Norway"]) == {"exact_match": 0, "f1": 0, "no_ans_exact_match": 0,
                                                       "no_ans_f1": 0}
    # a gold answer that normalizes to nothing is dropped; with none left, "" is the only gold
    article = squad("The end", "q", "The", "3")
    assert squad_scores([article], [""])["exact_match"] == 100
    with pytest.raises(ValueError, match="1 predictions for 2 records"):
        squad_scores([answered, impossible], [""])


# --- the recipe and a model -----------------------------------------------------------------

def test_recipe_is_registered():
    assert recipe_for("qa") is RECIPE
    assert RECIPE.formats == ("squad",) and RECIPE.primary_metric == "f1"
    assert RECIPE.label_names([ANSWERED]) is None


def test_lora_training_step_on_a_tiny_bert_qa_model():
    tok = bert_tokenizer()
    model = get_peft_model(tiny_bert_qa(len(tok)), LoraConfig(r=4, lora_alpha=8, task_type="QUESTION_ANS",
                                                              target_modules=["query", "value"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("qa_outputs.modules_to_save" in n for n in trainable)  # the new head trains
    assert all("lora_" in n or "qa_outputs.modules_to_save" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    records = [ANSWERED, IMPOSSIBLE, squad(CONTEXT, "Where is Normandy?", "France", "c")]
    batch = collate_qa(RECIPE.encode(records, tok, 64, None), tok)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7, losses
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen weight {n} changed"
    scores = RECIPE.evaluate(model, tok, records, 64, 2, None)
    assert set(scores) >= {"exact_match", "f1", "has_ans_f1", "no_ans_f1", "eval_loss"}
    assert all(0 <= scores[k] <= 100 for k in ("exact_match", "f1"))
    assert scores["eval_loss"] < losses[0]


def test_evaluate_scores_what_the_model_predicts():
    """evaluate_qa's figures equal squad_scores of the answers read from the same logits."""
    tok = bert_tokenizer()
    model = tiny_bert_qa(len(tok), seed=3)
    records = [ANSWERED, IMPOSSIBLE]
    from lorakit.tasks.qa import predict_answers

    answers = predict_answers(model, tok, records, 64, 4, allow_unanswerable=True)
    scores = evaluate_qa(model, tok, records, 64, 4)
    expected = squad_scores(records, answers)
    assert {k: scores[k] for k in expected} == pytest.approx(expected)


# --- real data: SQuAD v2 dev, the "Normans" article -----------------------------------------

def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from lorakit.errors import ModelLoadError
    from lorakit.models.embedded import EMBEDDED_MODELS, embedded_path

    try:
        return AutoTokenizer.from_pretrained(str(embedded_path(EMBEDDED_MODELS["minilm-l6"])))
    except ModelLoadError as exc:
        pytest.skip(f"the embedded minilm-l6 tokenizer is not installed: {exc}")


def test_real_squad_v2_spans_and_oracle_scores():
    path = SHARED_DATA / "squad_tiny" / "squad_v2_dev_normans.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder lives beside the repo)")
    from lorakit.data import read_records

    records = read_records(path)
    tok = _minilm_tokenizer()
    features = encode_qa(records, tok, seq_len=128, stride=32)
    assert len(features) > len(records.records)  # long contexts need several windows
    hits = [f for f in features if f["start_positions"] != f["cls_index"]]
    answerable = {f["example_index"] for f in hits}
    assert len(answerable) == sum(not r["is_impossible"] for r in records.records)
    for f in hits:
        gold = records.records[f["example_index"]]["answers"]["text"][0]
        assert normalize_answer(span_text(f, records.records[f["example_index"]])) == normalize_answer(gold)
    # logits that point exactly at the labels must give a perfect score through post-processing
    starts = [_logits(len(f["input_ids"]), {f["start_positions"]: 10.0}) for f in features]
    ends = [_logits(len(f["input_ids"]), {f["end_positions"]: 10.0}) for f in features]
    scores = squad_scores(records, best_answers(records, features, starts, ends))
    assert scores["exact_match"] == 100 and scores["f1"] == 100
    assert "has_ans_f1" in scores and "no_ans_f1" in scores


class _AlwaysNoAnswer(torch.nn.Module):
    """A QA model whose start and end logits point at [CLS] ("no answer") for every question."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        out = self.model(**batch)
        out.start_logits[:, 0] += 100.0
        out.end_logits[:, 0] += 100.0
        return out


def test_no_answer_everywhere_is_reported_per_kind_and_warned_about():
    # 7 of 10 questions unanswerable: "no answer" everywhere scores EM 70 while answering nothing
    tok = bert_tokenizer()
    model = _AlwaysNoAnswer(tiny_bert_qa(len(tok), seed=3))
    records = [squad(CONTEXT, "Who was their leader?", "Rollo", f"a{i}") for i in range(3)] + \
        [squad(CONTEXT, "When did the vikings come?", None, f"b{i}") for i in range(7)]
    with pytest.warns(UserWarning, match=r"\"no answer\" to all 10 questions, so exact match 70\.0.*"
                                         r"has-answer EM 0\.0, no-answer EM 100\.0"):
        scores = evaluate_qa(model, tok, records, 64, 4)
    assert scores["exact_match"] == pytest.approx(70.0)
    assert scores["has_ans_exact_match"] == 0.0 and scores["no_ans_exact_match"] == 100.0
    assert scores["no_answer_rate"] == 100.0
