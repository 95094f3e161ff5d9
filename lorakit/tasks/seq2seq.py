"""Encoder-decoder models (`--task seq2seq`: T5, BART ...): a source text in, a target text out.

    examples = encode_seq2seq(records, tokenizer, seq_len=512)     # input_ids + labels
    batch = collate_seq2seq(examples[:8], tokenizer)               # model(**batch).loss
    texts = generate_seq2seq(model, tokenizer, ["translate: hello"], max_new_tokens=32)
    scores = evaluate_seq2seq(model, tokenizer, records, 512, 8)   # eval_loss, exact_match, f1, rouge_l

Records (see lorakit.data.formats) become (source, target) pairs:

    prompt_completion  prompt → completion
    alpaca             instruction, then a blank line and the input when there is one → output
    chat               the turns before the last assistant reply, one "role: content" line each
                       → that reply

The source feeds the encoder; the target becomes `labels` (padding = -100), from which the model
builds its own decoder inputs (shifted right). Targets always end with the eos token, so the model
learns where to stop even when the tokenizer does not append one.

The primary metric is `eval_loss` (lower is better): the mean cross-entropy per target token is
defined for every target and moves smoothly as training goes, whereas the generation scores
(`exact_match`, token `f1` and `rouge_l`, all 0-100) are strict for free-form targets and often
stay at 0 for small models for a long while. The generation scores are reported beside it.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from lorakit.errors import DataError
from lorakit.tasks import TaskRecipe, check_format
from lorakit.progress import phase_bar
from lorakit.tasks.qa import exact_match, normalize_answer, token_f1

IGNORE_INDEX = -100
FORMATS = ("prompt_completion", "alpaca", "chat")


# --- records → (source, target) -------------------------------------------------------------

def source_and_target(record: dict) -> tuple[str, str]:
    """The encoder text and the target text of one normalized record.

    Raises:
        DataError: the record is of a format seq2seq cannot read, or a chat has no turn before
            its last assistant reply.
    """
    if "prompt" in record and "completion" in record:
        return record["prompt"], record["completion"]
    if "instruction" in record and "output" in record:
        extra = record.get("input") or ""
        source = f"{record['instruction']}\n\n{extra}" if extra.strip() else record["instruction"]
        return source, record["output"]
    if "messages" in record:
        return _chat_pair(record["messages"])
    raise DataError(f"--task seq2seq reads {', '.join(FORMATS)} records; got one with fields "
                    f"{', '.join(sorted(record))}")


def _chat_pair(messages: list[dict]) -> tuple[str, str]:
    """(the turns before the last assistant reply as "role: content" lines, that reply)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise DataError("a chat record for seq2seq needs at least one message before the last "
                        "assistant reply (the source text); add the user turn")
    source = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last])
    return source, messages[last]["content"]


# --- encoding and batching ------------------------------------------------------------------

def encode_seq2seq(records: Any, tokenizer, seq_len: int, labels: Optional[list[str]] = None, *,
                   target_len: Optional[int] = None) -> list[dict]:
    """Tokenize sources (truncated to `seq_len`) and targets (to `target_len`, default seq_len).

    Args:
        records: a RecordSet or list of prompt_completion / alpaca / chat records.
        tokenizer: the model's tokenizer.
        seq_len: the longest encoder input, special tokens included.
        labels: unused (seq2seq has no label set); present for the TaskRecipe interface.
        target_len: the longest target; a cut target keeps its final eos token.

    Returns:
        One dict per record: `input_ids` (the source) and `labels` (the target token ids,
        ending with eos when the tokenizer has one).

    Raises:
        ConfigError: a RecordSet of another format (e.g. classification).
        DataError: a record seq2seq cannot read (see `source_and_target`).
    """
    check_format(RECIPE, records)
    target_len = seq_len if target_len is None else target_len
    if seq_len < 1 or target_len < 1:
        raise ValueError(f"seq_len and target_len must be >= 1, got {seq_len} and {target_len}")
    pairs = [source_and_target(r) for r in _rows(records)]
    if not pairs:
        return []
    sources = tokenizer([s for s, _ in pairs], truncation=True, max_length=seq_len)["input_ids"]
    targets = tokenizer(text_target=[t for _, t in pairs], truncation=True,
                        max_length=target_len)["input_ids"]
    eos = tokenizer.eos_token_id
    examples = []
    for source, target in zip(sources, targets):
        target = list(target)
        if eos is not None and (not target or target[-1] != eos):
            target = target[:target_len - 1] + [eos]
        examples.append({"input_ids": list(source), "labels": target})
    return examples


def collate_seq2seq(examples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples: `input_ids`, `attention_mask` (batch, src) and `labels`
    (batch, tgt) padded with -100, which the loss skips."""
    if not examples:
        raise ValueError("collate_seq2seq needs at least one example")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sources = [e["input_ids"] for e in examples]
    targets = [e["labels"] for e in examples]
    src_len, tgt_len = max(map(len, sources)), max(map(len, targets))
    input_ids = torch.full((len(examples), src_len), pad_id, dtype=torch.long)  # (batch, src)
    attention_mask = torch.zeros((len(examples), src_len), dtype=torch.long)  # (batch, src)
    labels = torch.full((len(examples), tgt_len), IGNORE_INDEX, dtype=torch.long)  # (batch, tgt)
    for i, (source, target) in enumerate(zip(sources, targets)):
        input_ids[i, :len(source)] = torch.tensor(source, dtype=torch.long)
        attention_mask[i, :len(source)] = 1
        labels[i, :len(target)] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- generation and scoring -----------------------------------------------------------------

@torch.no_grad()
def generate_seq2seq(model, tokenizer, sources: Sequence[str], max_new_tokens: int = 64,
                     batch_size: int = 16, max_source_len: Optional[int] = None) -> list[str]:
    """Greedy outputs of an encoder-decoder model (or a LoRA-wrapped one) for each source text.

    Args:
        sources: encoder texts (e.g. `source_and_target(record)[0]`).
        max_new_tokens: the longest output, in tokens.
        max_source_len: truncate sources to this many tokens (None = the tokenizer's limit).

    Returns:
        The decoded outputs, special tokens removed and whitespace stripped.
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "right"  # encoder inputs: absolute positions (BART) start at 0
    device = next(model.parameters()).device
    outputs: list[str] = []
    bar = phase_bar(len(sources))
    try:
        for first in range(0, len(sources), batch_size):
            chunk = list(sources[first:first + batch_size])
            bar.update(len(chunk))
            enc = tokenizer(chunk, padding=True, truncation=max_source_len is not None,
                            max_length=max_source_len, return_tensors="pt").to(device)
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            outputs.extend(t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure (0-1) on SQuAD-normalized tokens: the longest common subsequence's
    length over the prediction (precision) and the reference (recall). No stemming, so it can
    differ slightly from the `rouge-score` package's rougeL."""
    ref, pred = normalize_answer(reference).split(), normalize_answer(prediction).split()
    if not ref or not pred:
        return float(ref == pred)
    previous = [0] * (len(pred) + 1)  # LCS lengths of ref[:i] against every prefix of pred
    for word in ref:
        current = [0]
        for j, other in enumerate(pred):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_scores(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """`exact_match`, token `f1` (SQuAD definitions) and `rouge_l`, as percentages (0-100)."""
    if len(references) != len(predictions) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    pairs = list(zip(references, predictions))
    return {"exact_match": 100.0 * sum(exact_match(r, p) for r, p in pairs) / n,
            "f1": 100.0 * sum(token_f1(r, p) for r, p in pairs) / n,
            "rouge_l": 100.0 * sum(rouge_l(r, p) for r, p in pairs) / n}


@torch.no_grad()
def target_loss(model, tokenizer, examples: list[dict], batch_size: int) -> float:
    """Mean cross-entropy per target token over `examples` (NaN when there are none)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    bar = phase_bar(len(examples))
    try:
        for first in range(0, len(examples), batch_size):
            bar.update(len(examples[first:first + batch_size]))
            batch = {k: v.to(device) for k, v in collate_seq2seq(examples[first:first + batch_size],
                                                                 tokenizer).items()}
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    finally:
        bar.close()
        model.train(was_training)
    return total / tokens if tokens else float("nan")


def evaluate_seq2seq(model, tokenizer, records: Any, seq_len: int, batch_size: int = 8,
                     labels: Optional[list[str]] = None, *, target_len: Optional[int] = None,
                     max_new_tokens: Optional[int] = None, generate: bool = True) -> dict[str, float]:
    """Score a seq2seq model on records: loss per target token and greedy-generation scores.

    Args:
        records: prompt_completion / alpaca / chat records (the targets are the references).
        seq_len, target_len: as in `encode_seq2seq`.
        labels: unused (TaskRecipe interface).
        max_new_tokens: generation length; None = the longest encoded target.
        generate: False skips generation (loss only, much faster).

    Returns:
        `eval_loss`, `eval_perplexity`, and with `generate`: `exact_match`, `f1`, `rouge_l` (0-100).
    """
    check_format(RECIPE, records)
    rows = _rows(records)
    examples = encode_seq2seq(rows, tokenizer, seq_len, target_len=target_len)
    if not examples:
        raise ValueError("no records to evaluate")
    loss = target_loss(model, tokenizer, examples, batch_size)
    perplexity = math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan")
    scores = {"eval_loss": loss, "eval_perplexity": perplexity}
    if generate:
        pairs = [source_and_target(r) for r in rows]
        new_tokens = max_new_tokens or max(len(e["labels"]) for e in examples)
        predictions = generate_seq2seq(model, tokenizer, [s for s, _ in pairs], new_tokens,
                                       batch_size, max_source_len=seq_len)
        scores.update(generation_scores([t for _, t in pairs], predictions))
    return scores


def _rows(records: Any) -> list[dict]:
    """The record dicts of a RecordSet (or the list itself)."""
    return list(getattr(records, "records", records))


def _no_labels(records: Any) -> None:
    """seq2seq has no label set."""
    return None


RECIPE = TaskRecipe(name="seq2seq", formats=FORMATS, label_names=_no_labels, encode=encode_seq2seq,
                    collate=collate_seq2seq, evaluate=evaluate_seq2seq, primary_metric="eval_loss")
