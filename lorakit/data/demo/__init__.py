"""Built-in demo data: the handbook of Marrowind Labs, a fictional company.

No pre-trained model can know these facts, so a model that answers the held-out questions after
training learned them from the adapter. The files, shipped as package data:

    facts.jsonl    {"id", "statement", "keys"}                 one per fact
    train.jsonl    {"fact", "messages": [user, assistant]}     4-5 phrasings per fact (chat format),
                                                               plus general-knowledge "replay"
                                                               ({"fact": null}) so the model keeps
                                                               answering other questions normally
    heldout.jsonl  {"fact", "question", "keys"}                paraphrases absent from train.jsonl
    general.jsonl  {"question", "keys"}                        easy general knowledge: did
                                                               training keep what the model knew?
An answer is correct when it contains any of its keys (case-insensitive).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEMO_FILES = ("facts", "train", "heldout", "general")


@dataclass(frozen=True)
class Demo:
    """The demo data set.

    Attributes:
        train: chat records `{"fact": id, "messages": [{"role", "content"}, ...]}`; `fact` is
            None for general-knowledge replay (on other topics than `general`).
        heldout: `{"fact": id, "question": str, "keys": [str]}`, not seen in training.
        general: `{"question": str, "keys": [str]}` that the base model already answers.
        facts: `{"id": str, "statement": str, "keys": [str]}`, the handbook itself.
    """

    train: list[dict]
    heldout: list[dict]
    general: list[dict]
    facts: list[dict]


def demo_path(name: str = "train") -> Path:
    """Path of one demo file (`facts`, `train`, `heldout` or `general`), e.g. to pass the
    training file to `read_records`."""
    if name not in DEMO_FILES:
        raise ValueError(f"unknown demo file '{name}': choose one of {', '.join(DEMO_FILES)}")
    return Path(str(resources.files(__name__).joinpath(f"{name}.jsonl")))


def _load(name: str) -> list[dict]:
    text = demo_path(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_demo() -> Demo:
    """The demo data: training conversations, held-out and general-knowledge questions."""
    return Demo(train=_load("train"), heldout=_load("heldout"), general=_load("general"),
                facts=_load("facts"))


def answer_is_correct(answer: str, keys: list[str]) -> bool:
    """True when `answer` contains any of `keys`, ignoring case and runs of whitespace."""
    text = " ".join(answer.casefold().split())
    return any(" ".join(key.casefold().split()) in text for key in keys)
