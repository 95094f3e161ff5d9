"""Extractive question answering (`--task qa`): SQuAD-format records in, answer spans out.

    features = encode_qa(records, tokenizer, seq_len=384)         # one or more per question
    batch = collate_qa(features[:8], tokenizer)                   # model(**batch).loss
    scores = evaluate_qa(model, tokenizer, records, 384, 16)      # {"exact_match": 71.2, "f1": 74.9, ...}

Encoding follows the Hugging Face QA recipe: question + context through a fast tokenizer, the
context truncated ("only_second") into overlapping windows (`stride` tokens shared between
neighbours), so a long context yields several features. Each feature's answer is located through
the offset mapping; an unanswerable question, or an answer outside the window, points at the
CLS position (index 0 when the tokenizer has no CLS token).

Scoring is the official SQuAD v2.0 evaluation: answers normalized (lower case, punctuation and the
articles a/an/the removed, whitespace collapsed), exact match and token-overlap F1 taken as the best
over the gold answers, an unanswerable question's only gold answer is "". Scores are percentages
(0-100), as SQuAD reports them.
"""
from __future__ import annotations

import collections
import re
import string
import warnings
from typing import Any, Optional, Sequence

import torch

from lorakit.errors import ConfigError
from lorakit.progress import phase_bar
from lorakit.tasks import TaskRecipe, check_format

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_STRIDE = 128
"""Tokens shared by neighbouring windows of a long context (capped at a quarter of seq_len)."""


# --- encoding -------------------------------------------------------------------------------

def encode_qa(records: Any, tokenizer, seq_len: int, labels: Optional[list[str]] = None, *,
              stride: Optional[int] = None) -> list[dict]:
    """Turn SQuAD records into model features (several per record when the context is long).

    Args:
        records: a squad `RecordSet` or a list of squad record dicts (see lorakit.data.formats).
        tokenizer: a *fast* tokenizer (offset mappings are needed).
        seq_len: tokens per feature, question and special tokens included.
        labels: unused (QA has no label set); present for the TaskRecipe interface.
        stride: tokens of overlap between windows; default min(128, seq_len // 4).

    Returns:
        Feature dicts: `input_ids`, `attention_mask` (and `token_type_ids` when the tokenizer
        makes them), `start_positions`, `end_positions` (the CLS index when there is no answer
        in the window), and for post-processing `example_index` (into records), `offsets`
        ((start, end) characters of context tokens, None elsewhere) and `cls_index`.

    Raises:
        ConfigError: records of another format, a slow tokenizer, or a seq_len too short to
            hold any context.
    """
    check_format(RECIPE, records)
    _check_fast(tokenizer)
    stride = min(DEFAULT_STRIDE, seq_len // 4) if stride is None else stride
    if stride < 0:
        raise ConfigError(f"stride must be >= 0, got {stride}", where="qa encoding")
    features: list[dict] = []
    for index, record in enumerate(_rows(records)):
        features.extend(_encode_record(record, index, tokenizer, seq_len, stride))
    return features


def _encode_record(record: dict, index: int, tokenizer, seq_len: int, stride: int) -> list[dict]:
    """The features of one question: one per window of its context."""
    question, question_len = _fit_question(record["question"].lstrip(), tokenizer, seq_len // 2)
    room = seq_len - question_len - tokenizer.num_special_tokens_to_add(pair=True)
    if room < 2:
        raise ConfigError(f"seq_len {seq_len} leaves {room} tokens for the context of question "
                          f"{record.get('id') or index!r}: raise --seq-len (384 is usual for QA)",
                          where="qa encoding")
    enc = tokenizer(question, record["context"], truncation="only_second", max_length=seq_len,
                    stride=min(stride, room // 2), return_overflowing_tokens=True,
                    return_offsets_mapping=True)
    cls_id = tokenizer.cls_token_id
    features = []
    for i, ids in enumerate(enc["input_ids"]):
        offsets = [tuple(o) if s == 1 else None
                   for o, s in zip(enc["offset_mapping"][i], enc.sequence_ids(i))]
        cls_index = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
        start, end = answer_positions(record, offsets, cls_index)
        feature = {key: list(enc[key][i]) for key in MODEL_INPUTS if key in enc}
        feature.update(start_positions=start, end_positions=end, example_index=index,
                       offsets=offsets, cls_index=cls_index)
        features.append(feature)
    return features


def _fit_question(question: str, tokenizer, max_tokens: int) -> tuple[str, int]:
    """(the question cut to at most `max_tokens` tokens, its token count): an overlong question
    would leave no room for the context."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return question, len(enc["input_ids"])
    if max_tokens < 1:
        return "", 0
    return question[:enc["offset_mapping"][max_tokens - 1][1]], max_tokens


def answer_positions(record: dict, offsets: Sequence[Optional[tuple[int, int]]],
                     cls_index: int) -> tuple[int, int]:
    """(start, end) token indices of the record's first answer inside one window.

    Args:
        record: a squad record; its first answer is the training target.
        offsets: per token, the (start, end) characters in the context, None outside it.
        cls_index: where "no answer" points.

    Returns:
        Inclusive token indices; (cls_index, cls_index) when the question is unanswerable or
        the answer does not lie wholly inside this window.
    """
    texts = record["answers"]["text"]
    if record.get("is_impossible") or not texts:
        return cls_index, cls_index
    start_char = record["answers"]["answer_start"][0]
    end_char = start_char + len(texts[0])
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return cls_index, cls_index
    start = max(i for i in context if offsets[i][0] <= start_char)
    end = min(i for i in context if i >= start and offsets[i][1] >= end_char)
    return start, end


def collate_qa(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Right-pad features into a batch; `model(**batch)` returns the span loss when the features
    carry start/end positions.

    Returns:
        `input_ids`, `attention_mask` (and `token_type_ids`) of shape (batch, seq), and
        `start_positions`, `end_positions` of shape (batch,) when present.
    """
    if not features:
        raise ValueError("collate_qa needs at least one feature")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in MODEL_INPUTS:
        if key in features[0]:
            batch[key] = _padded([f[key] for f in features], length, pad_id if key == "input_ids" else 0)
    for key in ("start_positions", "end_positions"):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)  # (batch,)
    return batch


def _padded(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    """(batch, length) long tensor, each row right-padded with `value`."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# --- running the model and reading answers --------------------------------------------------

@torch.no_grad()
def span_logits(model, tokenizer, features: list[dict], batch_size: int
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Start and end logits of every feature (trimmed to its length), and the mean span loss.

    Returns:
        (start logits, end logits, loss): two lists of 1-D float tensors, one per feature, and
        the loss averaged over features (NaN when the model returns none).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    starts, ends, loss_sum = [], [], 0.0
    bar = phase_bar(len(features), unit="window")
    try:
        for first in range(0, len(features), batch_size):
            chunk = features[first:first + batch_size]
            bar.update(len(chunk))
            batch = {k: v.to(device) for k, v in collate_qa(chunk, tokenizer).items()}
            out = model(**batch)
            loss_sum += float(out.loss) * len(chunk) if out.loss is not None else float("nan")
            for row, feature in enumerate(chunk):
                n = len(feature["input_ids"])
                starts.append(out.start_logits[row, :n].float().cpu())  # (n,)
                ends.append(out.end_logits[row, :n].float().cpu())  # (n,)
    finally:
        bar.close()
        model.train(was_training)
    return starts, ends, loss_sum / max(len(features), 1)


def best_answers(records: Any, features: list[dict], start_logits: Sequence[torch.Tensor],
                 end_logits: Sequence[torch.Tensor], *, n_best: int = 20, max_answer_len: int = 30,
                 allow_unanswerable: bool = True, null_threshold: float = 0.0) -> list[str]:
    """The answer text of every record, from the logits of its features.

    Per feature, the `n_best` highest start and end logits are paired; a pair counts when both
    tokens lie in the context, end >= start and the span has at most `max_answer_len` tokens.
    Its score is start + end logit; the best span over all features of a record wins. With
    `allow_unanswerable` (SQuAD v2), the answer is "" when the null score (the CLS start + end
    logits, lowest over the record's features) beats the best span by more than `null_threshold`.

    Returns:
        One answer string per record ("" = no answer), in record order.
    """
    rows = _rows(records)
    by_record: dict[int, list[int]] = collections.defaultdict(list)
    for i, feature in enumerate(features):
        by_record[feature["example_index"]].append(i)
    answers = []
    for index, record in enumerate(rows):
        best_score, best_span, null_score = float("-inf"), None, float("inf")
        for i in by_record.get(index, []):
            feature, s_log, e_log = features[i], start_logits[i], end_logits[i]
            cls = feature["cls_index"]
            null_score = min(null_score, float(s_log[cls] + e_log[cls]))
            score, span = _best_span(feature["offsets"], s_log, e_log, n_best, max_answer_len)
            if span is not None and score > best_score:
                best_score, best_span = score, span
        if best_span is None or (allow_unanswerable and null_score - best_score > null_threshold):
            answers.append("")
        else:
            answers.append(record["context"][best_span[0]:best_span[1]])
    return answers


def _best_span(offsets: Sequence[Optional[tuple[int, int]]], start_logits: torch.Tensor,
               end_logits: torch.Tensor, n_best: int, max_answer_len: int
               ) -> tuple[float, Optional[tuple[int, int]]]:
    """(score, (start char, end char)) of the best valid span of one feature, or (-inf, None)."""
    k = min(n_best, len(offsets))
    top_starts = torch.topk(start_logits, k).indices.tolist()
    top_ends = torch.topk(end_logits, k).indices.tolist()
    best_score, best_span = float("-inf"), None
    for s in top_starts:
        for e in top_ends:
            if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                continue
            score = float(start_logits[s] + end_logits[e])
            if score > best_score:
                best_score, best_span = score, (offsets[s][0], offsets[e][1])
    return best_score, best_span


def predict_answers(model, tokenizer, records: Any, seq_len: int, batch_size: int = 16, *,
                    stride: Optional[int] = None, **postprocess: Any) -> list[str]:
    """The model's answer to every record ("" = unanswerable); options as in `best_answers`."""
    features = encode_qa(records, tokenizer, seq_len, stride=stride)
    starts, ends, _ = span_logits(model, tokenizer, features, batch_size)
    return best_answers(records, features, starts, ends, **postprocess)


# --- scoring (the official SQuAD v2.0 definitions) ------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(gold: str, prediction: str) -> int:
    """1 when the normalized strings are equal, else 0."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def token_f1(gold: str, prediction: str) -> float:
    """F1 of the normalized tokens' overlap (a multiset); when either side is empty, 1 if both
    are, else 0."""
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(records: Any, predictions: Sequence[str]) -> dict[str, float]:
    """Exact match and F1 (percentages) of `predictions` against the records' gold answers.

    Each question scores the best over its gold answers (those that normalize to something);
    an unanswerable question's only gold answer is "". Returns `exact_match`, `f1`, and the
    same two over answerable (`has_ans_*`) and unanswerable (`no_ans_*`) questions when the
    records hold any of that kind.
    """
    rows = _rows(records)
    if len(rows) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} records")
    if not rows:
        raise ValueError("no records to score")
    em, f1, has_answer = [], [], []
    for record, prediction in zip(rows, predictions):
        golds = [t for t in record["answers"]["text"] if normalize_answer(t)] or [""]
        em.append(max(exact_match(g, prediction) for g in golds))
        f1.append(max(token_f1(g, prediction) for g in golds))
        has_answer.append(bool(record["answers"]["text"]))
    scores = {"exact_match": _percent(em), "f1": _percent(f1)}
    for prefix, wanted in (("has_ans", True), ("no_ans", False)):
        picked = [i for i, h in enumerate(has_answer) if h == wanted]
        if picked:
            scores[f"{prefix}_exact_match"] = _percent([em[i] for i in picked])
            scores[f"{prefix}_f1"] = _percent([f1[i] for i in picked])
    return scores


def _percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def evaluate_qa(model, tokenizer, records: Any, seq_len: int, batch_size: int = 16,
                labels: Optional[list[str]] = None, *, stride: Optional[int] = None,
                n_best: int = 20, max_answer_len: int = 30,
                allow_unanswerable: Optional[bool] = None) -> dict[str, float]:
    """Score a QA model on SQuAD records: SQuAD v2 exact match and F1 (0-100), plus eval_loss.

    Args:
        model: a question-answering model (start/end logits), e.g. a LoRA-wrapped one.
        records: squad records (raw: the answers are needed, not just the features).
        seq_len, stride: as in `encode_qa`; batch_size: features per forward pass.
        labels: unused (TaskRecipe interface).
        n_best, max_answer_len: as in `best_answers`.
        allow_unanswerable: may the model answer "no answer"? None = yes when the records hold
            unanswerable questions (SQuAD v2), no otherwise (SQuAD v1.1).

    Returns:
        `exact_match`, `f1`, `has_ans_*` / `no_ans_*` breakdowns, `no_answer_rate` (the percentage
        of questions answered "no answer", when that answer is allowed) and `eval_loss` (the span
        loss averaged over features). Warns when every answer is "no answer".
    """
    check_format(RECIPE, records)
    rows = _rows(records)
    if allow_unanswerable is None:
        allow_unanswerable = any(not r["answers"]["text"] for r in rows)
    features = encode_qa(rows, tokenizer, seq_len, stride=stride)
    starts, ends, loss = span_logits(model, tokenizer, features, batch_size)
    predictions = best_answers(rows, features, starts, ends, n_best=n_best,
                               max_answer_len=max_answer_len, allow_unanswerable=allow_unanswerable)
    scores = squad_scores(rows, predictions)
    if allow_unanswerable:
        scores["no_answer_rate"] = _percent([not p for p in predictions])
    warn_if_no_answer_everywhere(predictions, {**scores, "eval_loss": loss})
    return {**scores, "eval_loss": loss}


def warn_if_no_answer_everywhere(predictions: Sequence[str], scores: dict[str, float]) -> None:
    """Warn when the model answers "no answer" to every question: exact match and F1 then only count the
    unanswerable questions (70 when 7 of 10 are), which reads like skill and is none."""
    if len(predictions) < 2 or any(predictions):
        return
    parts = [f"{name} {scores[key]:.1f}" for name, key in (("has-answer EM", "has_ans_exact_match"),
                                                          ("no-answer EM", "no_ans_exact_match")) if key in scores]
    warnings.warn(f"qa: the model answers \"no answer\" to all {len(predictions):,} questions, so exact match "
                  f"{scores['exact_match']:.1f} and F1 {scores['f1']:.1f} only count the unanswerable ones "
                  f"({', '.join(parts)}; eval loss {scores.get('eval_loss', float('nan')):.4f}). "
                  "Expected of an untrained head; after training, train longer "
                  "(--epochs, --max-steps) or with a higher --lr, and check --seq-len keeps the answers "
                  "(384 is usual)", stacklevel=3)


# --- helpers and the recipe -----------------------------------------------------------------

def _rows(records: Any) -> list[dict]:
    """The record dicts of a RecordSet (or the list itself)."""
    return list(getattr(records, "records", records))


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"--task qa needs a fast tokenizer (offset mappings), but "
                          f"{type(tokenizer).__name__} is a slow one: load the model's tokenizer "
                          "with use_fast=True (it needs a tokenizer.json or the `tokenizers` "
                          "package)", where="qa encoding")


def _no_labels(records: Any) -> None:
    """QA has no label set."""
    return None


RECIPE = TaskRecipe(name="qa", formats=("squad",), label_names=_no_labels, encode=encode_qa,
                    collate=collate_qa, evaluate=evaluate_qa, primary_metric="f1")
