"""Causal-LM examples: records → (prompt, response) messages → token ids and labels.

The prompt is rendered with the tokenizer's chat template when it has one, else with a plain
`### Instruction: / ### Response:` template. Labels equal the input ids on response tokens and
are -100 on prompt tokens (loss on the response only), unless `mask_prompt=False`. The `text`
format has no prompt: every token is trained. Sequences longer than `seq_len` are cut from the
right; `TruncationStats` counts what was cut or dropped, for the trainer to print.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from lorakit.data.packing import IGNORE_INDEX, pack_examples
from lorakit.data.records import RecordSet, Source
from lorakit.data.tables import AS_CONLL
from lorakit.errors import ConfigError, DataError

CAUSAL_FORMATS = ("alpaca", "chat", "prompt_completion", "text")

Segment = tuple[str, bool]
"""A piece of rendered text and whether it is response (trained) text."""


def _alpaca_messages(record: dict) -> list[dict]:
    prompt = record["instruction"]
    if record.get("input", "").strip():
        prompt = f"{prompt}\n\n{record['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def _completion_messages(record: dict) -> list[dict]:
    return [{"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]}]


_TO_MESSAGES = {
    "alpaca": _alpaca_messages,
    "chat": lambda record: record["messages"],
    "prompt_completion": _completion_messages,
}


def to_messages(record: dict, fmt: str) -> list[dict]:
    """A normalized alpaca / chat / prompt_completion record as chat messages."""
    if fmt not in _TO_MESSAGES:
        raise DataError(f"format '{fmt}' has no prompt/response form; causal-LM training "
                        f"takes {', '.join(CAUSAL_FORMATS)}")
    return _TO_MESSAGES[fmt](record)


# --- rendering -----------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def _template_segments(messages: list[dict], tokenizer) -> list[Segment]:
    """Split the chat-template rendering into prompt and assistant-reply segments.

    Each assistant turn's text is what rendering the conversation up to that turn adds after
    the generation prompt (so it includes the template's end-of-turn token). Messages after
    the last assistant turn are not rendered.
    """
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(done):  # the template rewrites earlier turns: keep this one only
            segments, done = [], ""
        cut = max(len(os.path.commonprefix([prompt, full])), len(done))
        segments += [(full[len(done):cut], False), (full[cut:], True)]
        done = full
    return [s for s in segments if s[0]]


def _plain_segments(messages: list[dict], eos: str) -> list[Segment]:
    """The `### Instruction: / ### Response:` template for tokenizers without a chat template."""
    segments: list[Segment] = []
    pending = ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            pending += f"{content}\n\n"
        elif role == "assistant":
            segments += [(f"{pending}### Response:\n", False), (f"{content}{eos}", True)]
            pending = "\n\n"
        else:
            heading = "Instruction" if role == "user" else role.capitalize()
            pending += f"### {heading}:\n{content}\n\n"
    return segments


def render_segments(messages: list[dict], tokenizer) -> list[Segment]:
    """Rendered (text, is_response) pieces of a conversation, in order."""
    if has_chat_template(tokenizer):
        return _template_segments(messages, tokenizer)
    return _plain_segments(messages, tokenizer.eos_token or "")


def format_prompt(messages: list[dict], tokenizer) -> str:
    """The text a model continues to answer `messages` (for generation and evaluation),
    rendered exactly as training rendered prompts."""
    if has_chat_template(tokenizer):
        return _render(tokenizer, messages, generation_prompt=True)
    return "".join(text for text, _ in _plain_segments(
        [*messages, {"role": "assistant", "content": ""}], "")[:-1])


def _prefix_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before text by default (e.g. Llama's BOS)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


# --- tokenization and truncation -----------------------------------------------------------

@dataclass
class TruncationStats:
    """What turning records into token sequences kept, cut and dropped.

    Attributes:
        seq_len: the maximum sequence length.
        examples: records tokenized.
        kept: examples kept (the others had no response token left after truncation).
        truncated: examples longer than `seq_len`, cut from the right.
        tokens_dropped: tokens removed by that truncation.
        dropped_no_response: examples dropped because no response token was left.
        tokens: tokens in the kept examples.
        trained_tokens: tokens the loss is computed on in the kept examples (label not -100,
            position 0 excluded: nothing predicts it).
        rows: sequences produced (kept examples, or packed rows with `packing=True`).
    """

    seq_len: int
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    tokens_dropped: int = 0
    dropped_no_response: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rows: int = 0

    def summary(self) -> str:
        """One line for the training log."""
        text = (f"{self.examples:,} examples -> {self.kept:,} kept; {self.truncated:,} cut to "
                f"seq_len={self.seq_len} ({self.tokens_dropped:,} tokens dropped); "
                f"{self.dropped_no_response:,} dropped (no response token left); "
                f"{self.tokens:,} tokens, {self.trained_tokens:,} trained")
        if self.rows != self.kept:
            text += f"; packed into {self.rows:,} rows"
        return text

    def as_dict(self) -> dict:
        """The figures, for JSON output."""
        return asdict(self)

    __str__ = summary


@dataclass
class CausalExamples:
    """Token sequences ready for `collate_causal`.

    Attributes:
        examples: dicts with `input_ids` and `labels` (lists of ints); packed rows also carry
            `position_ids` restarting at 0 for every example inside the row.
        stats: what truncation and dropping did.
        packed: True when several examples share a row.
        sources: where each example's record was read from (unpacked examples only).
    """

    examples: list[dict]
    stats: TruncationStats
    packed: bool = False
    sources: list[Source] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    def __iter__(self):
        return iter(self.examples)


def _segments_for(record: dict, fmt: str, tokenizer, src: Source) -> list[Segment]:
    """Segments of one record; template failures become DataErrors naming the record."""
    if fmt == "text":
        return [(record["text"], True)]
    try:
        return render_segments(to_messages(record, fmt), tokenizer)
    except DataError:
        raise
    except Exception as e:  # jinja templates raise anything (TemplateError, TypeError ...)
        raise src.error(f"the tokenizer's chat template rejected this record: "
                        f"{type(e).__name__}: {e}") from None


def _assemble(segments: list[Segment], segment_ids: list[list[int]], prefix: list[int],
              suffix: list[int]) -> tuple[list[int], list[bool]]:
    """Concatenate token ids and mark which ones belong to response segments."""
    ids, is_response = list(prefix), [False] * len(prefix)
    for (_, trained), seg in zip(segments, segment_ids):
        ids += seg
        is_response += [trained] * len(seg)
    ids += suffix
    is_response += [True] * len(suffix)
    return ids, is_response


def build_causal_examples(data: RecordSet, tokenizer, seq_len: int = 512,
                          mask_prompt: bool = True, packing: bool = False) -> CausalExamples:
    """Tokenize alpaca / chat / prompt_completion / text records for causal-LM training.

    Args:
        data: records of one causal format (from `read_records` or `records_from_dicts`).
        tokenizer: a Hugging Face tokenizer; its chat template is used when it has one.
        seq_len: maximum tokens per sequence; longer examples are cut from the right.
        mask_prompt: True = labels are -100 on prompt tokens (loss on responses only).
        packing: True = concatenate examples into rows of at most `seq_len` tokens
            (first-fit decreasing), with `position_ids` restarting per example.

    Returns:
        `CausalExamples` (`.examples`, `.stats`, `.packed`).

    Raises:
        DataError: a format without a response, a record the chat template rejects, or
            nothing left to train on after truncation.
        ConfigError: seq_len below 2.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}", where="seq_len")
    if data.format not in CAUSAL_FORMATS:
        conll = str(data.path).endswith((".txt", ".conll")) and data.format == "token_classification"
        raise DataError(f"format '{data.format}' is not for causal-LM training (it takes "
                        f"{', '.join(CAUSAL_FORMATS)}); pick the task that fits the data"
                        + (f" {AS_CONLL}" if conll else ""), path=data.path)
    segments = [_segments_for(r, data.format, tokenizer, s)
                for r, s in zip(data.records, data.sources)]
    flat = [text for segs in segments for text, _ in segs]
    flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    text_format = data.format == "text" or not has_chat_template(tokenizer)
    prefix = _prefix_ids(tokenizer) if text_format else []
    eos = [tokenizer.eos_token_id] if data.format == "text" and \
        tokenizer.eos_token_id is not None else []
    stats = TruncationStats(seq_len=seq_len, examples=len(segments))
    examples, sources = [], []
    for segs, src in zip(segments, data.sources):
        ids, is_response = _assemble(segs, [next(flat_ids) for _ in segs], prefix, eos)
        example = _truncate(ids, is_response, seq_len, mask_prompt, stats)
        if example is not None:
            examples.append(example)
            sources.append(src)
    if not examples:
        raise DataError(f"no example left to train on: all {stats.examples} lost their "
                        f"response to truncation at seq_len={seq_len}; raise seq_len",
                        path=data.path)
    if packing:
        examples = pack_examples(examples, seq_len)
    stats.rows = len(examples)
    return CausalExamples(examples, stats, packing, sources if not packing else [])


def _truncate(ids: list[int], is_response: list[bool], seq_len: int, mask_prompt: bool,
              stats: TruncationStats) -> dict | None:
    """Cut to seq_len, build labels, count; None when no response token is left."""
    if len(ids) > seq_len:
        stats.truncated += 1
        stats.tokens_dropped += len(ids) - seq_len
        ids, is_response = ids[:seq_len], is_response[:seq_len]
    if not any(is_response):
        stats.dropped_no_response += 1
        return None
    labels = [t if (r or not mask_prompt) else IGNORE_INDEX for t, r in zip(ids, is_response)]
    stats.kept += 1
    stats.tokens += len(ids)
    stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
    return {"input_ids": ids, "labels": labels}
