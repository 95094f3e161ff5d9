"""`lorakit eval`: the same data scored by the base model and by base + adapter, side by side."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .args import add_options, build_config
from .commands import ModelOptions, load_with_adapters
from .main import command


def _training_facts(adapter: str) -> dict[str, Any]:
    path = Path(adapter) / "lorakit.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    return meta.get("training") or {}


def _examples(opts: EvalOptions, tokenizer):
    """(examples or None for the demo, description)."""
    from ..data import build_causal_examples, read_records, train_val_split
    from .train import VAL_FRACTION

    facts = _training_facts(opts.adapter[0]) if opts.adapter else {}
    if opts.data:
        records, what = read_records(opts.data), opts.data
    elif facts.get("eval_data"):
        records, what = read_records(facts["eval_data"]), facts["eval_data"]
    elif facts.get("data"):
        _, records = train_val_split(read_records(facts["data"]), val_fraction=VAL_FRACTION, seed=facts.get("seed", 42))
        what = f"validation split of {facts['data']} (as in training)"
    else:
        return None, "built-in demo questions"
    examples = build_causal_examples(records, tokenizer, seq_len=opts.seq_len).examples
    if opts.max_examples:
        examples = examples[:opts.max_examples]
    return examples, what


def _scores(model, tokenizer, examples, opts: EvalOptions) -> dict[str, float]:
    from ..data import answer_is_correct, collate_causal, load_demo
    from ..evaluate import eval_loss, score_demo

    if examples is None:
        s = score_demo(model, tokenizer, load_demo(), answer_is_correct)
        return {"heldout_accuracy": s.heldout_accuracy, "general_accuracy": s.general_accuracy}
    result = eval_loss(model, examples, lambda b: collate_causal(b, pad_token_id=tokenizer.pad_token_id),
                       opts.batch_size)
    return {"eval_loss": result["loss"], "perplexity": result["perplexity"]}


def run_eval(opts: EvalOptions) -> dict[str, dict[str, float]]:
    model, tokenizer = load_with_adapters(opts)
    examples, what = _examples(opts, tokenizer)
    print(f"scoring on {what}" + (f" ({len(examples)} examples)" if examples is not None else ""))
    results = {}
    if opts.adapter:
        with model.disable_adapter():
            results["base"] = _scores(model, tokenizer, examples, opts)
        results["base + adapter"] = _scores(model, tokenizer, examples, opts)
    else:
        results["base"] = _scores(model, tokenizer, examples, opts)
    columns = list(results)
    print(f"{'metric':<20}" + "".join(f"{c:>18}" for c in columns))
    for metric in results[columns[0]]:
        print(f"{metric:<20}" + "".join(f"{results[c][metric]:>18.4f}" for c in columns))
    return results


@dataclass
class EvalOptions(ModelOptions):
    data: Optional[str] = None
    """Data to score. None: the validation split the adapter was trained with (from its lorakit.json),
    or the built-in demo questions."""
    seq_len: int = 512
    """Maximum tokens per example."""
    batch_size: int = 8
    """Examples per forward pass."""
    max_examples: int = 0
    """Score at most this many examples (0 = all)."""


@command("eval", "score base vs base + adapter on a data set (loss, perplexity) or on the demo questions")(
    lambda p: add_options(p, EvalOptions))
def _eval(args: argparse.Namespace) -> None:
    run_eval(build_config(EvalOptions, args))
