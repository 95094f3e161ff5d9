"""`lorakit eval`: the same data scored by the base model and by base + adapter, side by side."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import ConfigError
from .args import add_options, build_config
from .commands import ModelOptions, load_with_adapters, recorded_task
from .main import command


def _records(opts: "EvalOptions", facts: dict[str, Any], labels: Optional[list[str]]):
    """(records or None for the demo, description): --data, else the data the adapter was evaluated on."""
    from ..data import read_records, train_val_split
    from .train_data import VAL_FRACTION

    if opts.data:
        return read_records(opts.data, labels=labels), opts.data
    if facts.get("eval_data"):
        return read_records(facts["eval_data"], labels=labels), facts["eval_data"]
    if facts.get("data"):
        _, records = train_val_split(read_records(facts["data"], labels=labels), val_fraction=VAL_FRACTION,
                                     seed=facts.get("seed", 42))
        return records, f"validation split of {facts['data']} (as in training)"
    return None, "built-in demo questions"


def _causal_scorer(records, tokenizer, opts: "EvalOptions") -> Callable[[Any], dict[str, float]]:
    from ..data import answer_is_correct, build_causal_examples, collate_causal, load_demo
    from ..evaluate import eval_loss, score_demo

    if records is None:
        def demo(model) -> dict[str, float]:
            s = score_demo(model, tokenizer, load_demo(), answer_is_correct)
            return {"heldout_accuracy": s.heldout_accuracy, "general_accuracy": s.general_accuracy}
        return demo
    examples = build_causal_examples(records, tokenizer, seq_len=opts.seq_len).examples

    def loss(model) -> dict[str, float]:
        result = eval_loss(model, examples, lambda b: collate_causal(b, pad_token_id=tokenizer.pad_token_id),
                           opts.batch_size)
        return {"eval_loss": result["loss"], "perplexity": result["perplexity"]}
    return loss


def run_eval(opts: "EvalOptions") -> dict[str, dict[str, float]]:
    """Score base and base + adapter with the task's metrics; print them side by side."""
    from ..lora.files import read_meta
    from ..progress import phase
    from ..train import seed_everything

    meta = read_meta(opts.adapter[0]) if opts.adapter else {}
    facts = meta.get("training") or {}
    task = opts.task or (recorded_task(opts.adapter[0]) if opts.adapter else None) or "causal-lm"
    labels = meta.get("labels")
    if opts.seq_len is None:
        opts = dataclasses.replace(opts, seq_len=facts.get("seq_len") or 512)
    seed_everything(facts.get("seed", 42))  # a new task head (the base column) starts the same every time
    model, tokenizer = load_with_adapters(opts, task=task, where="eval")
    records, what = _records(opts, facts, labels)
    if records is not None and opts.max_examples:
        records = records.subset(list(range(min(opts.max_examples, len(records)))))
    if task == "causal-lm":
        score = _causal_scorer(records, tokenizer, opts)
    else:
        from ..tasks import recipe_for

        if records is None:
            raise ConfigError([f"--task {task}: give --data (nothing to score on)"], where="eval")
        recipe = recipe_for(task)
        score = lambda m: recipe.evaluate(m, tokenizer, records, opts.seq_len, opts.batch_size,  # noqa: E731
                                          labels or recipe.label_names(records))
    print(f"scoring {task} on {what}" + (f" ({len(records):,} records)" if records is not None else ""))
    results = {}
    if opts.adapter:
        with model.disable_adapter(), phase("scoring the base model"):
            results["base"] = score(model)
    with phase("scoring base + adapter" if opts.adapter else "scoring the base model"):
        results["base + adapter" if opts.adapter else "base"] = score(model)
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
    seq_len: Optional[int] = None
    """Maximum tokens per example. None = the adapter's training --seq-len (from its lorakit.json), else 512."""
    batch_size: int = 8
    """Examples per forward pass."""
    max_examples: int = 0
    """Score at most this many examples (0 = all)."""
    task: Optional[str] = None
    """causal-lm, seq-cls, token-cls, qa or seq2seq. None = the task the adapter was trained for."""


@command("eval", "score base vs base + adapter with the task's metrics (loss, accuracy/F1, EM) or on the demo questions")(
    lambda p: add_options(p, EvalOptions))
def _eval(args: argparse.Namespace) -> None:
    run_eval(build_config(EvalOptions, args))
