"""`lorakit train`: load the model and data, add LoRA, train, and show what changed.

With no --data it runs the built-in demo: the handbook of a fictional company, whose facts no
pre-trained model knows; held-out paraphrased questions measure what LoRA taught the model, and
general-knowledge questions measure what it kept.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write_json
from ..train.config import TrainConfig
from .train_data import (FLAT_ROW_MULTIPLE, calibration_batches, causal_data, causal_records, label_arguments,
                         read_task_records, task_data)

# The demo's settings, measured on a 2-core CPU (docs/BENCHMARKS.md): short answers need few tokens, and
# three epochs at a higher learning rate teach 38 facts in about four minutes; r=8 keeps the adapter < 10 MB.
DEMO_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "epochs": 3.0, "lr": 2e-3, "batch_size": 8, "seq_len": 128,
                                 "packing": False, "warmup_ratio": 0.05, "eval_every": 0, "save_every": 25}
# Encoder tasks: sentences are short and the data sets large, so bigger batches grouped by length, and
# a learning rate for one epoch over tens of thousands of examples (docs/BENCHMARKS.md, SST-2/CoNLL).
_ENCODER_DEFAULTS: dict[str, Any] = {"r": 4, "alpha": 8, "lr": 2e-3, "batch_size": 32, "seq_len": 128,
                                     "group_by_length": True, "warmup_ratio": 0.06, "lr_schedule": "linear",
                                     "dropout": 0.1, "eval_every": 0, "save_every": 500}
# (no log_every: by default a run logs about 50 points over its length, lorakit.train.metrics.log_interval)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {"seq-cls": {**_ENCODER_DEFAULTS, "lr": 1e-3, "batch_size": 16},
                                            "token-cls": _ENCODER_DEFAULTS,
                                            "qa": {**_ENCODER_DEFAULTS, "seq_len": 384, "batch_size": 4,
                                                   "grad_accum": 4}}
# QA: 16 rows of 384 tokens per optimizer step, in micro-batches of 4 (the same step: lorakit's accumulation
# averages over all 16): at 384 tokens the attention-dropout path keeps every layer's attention probabilities,
# so 16 at once peaked at 5.3 GB RSS on minilm-l6 against 2.1 GB in fours (docs/BENCHMARKS.md)


SCORES_FILE = "scores_{}.json"  # before / after training


def run_defaults(data_given: bool, task: str) -> dict[str, Any]:
    """The defaults a run starts from before the user's options: the demo's without --data, else the task's."""
    return TASK_DEFAULTS.get(task, {}) if data_given else DEMO_DEFAULTS


def run_train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job end to end; returns the summary figures (also written to summary.json)."""
    from ..train import write_summary
    from ..train.trackers import finish_trackers
    from ..train.distributed import is_main_process
    from ..train.storage import new_folders, prepare_run_dir, remove_new_folders

    config = _check_sources_and_join(config)
    created = new_folders(config.run_dir())
    run_dir = prepare_run_dir(config.run_dir())  # a clear error now if --out cannot be written
    try:  # a failed start leaves no folder behind (one that existed keeps what it held)
        records = _start_record(config, run_dir)
        trainer, model, tokenizer, loaded, data, before = _start_training(config, run_dir, records)
    except BaseException:
        if is_main_process():
            remove_new_folders(created)
        raise
    result = trainer.fit()
    if result.interrupted:
        launcher = "torchrun ... -m lorakit train" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "lorakit train"
        print(f"stopped at step {result.steps}; checkpoint {result.last_checkpoint}. "
              f"Continue with: {launcher} --out {run_dir} --resume (it reads the options from {run_dir}/config.yaml)")
        raise SystemExit(130)
    if not is_main_process():  # torchrun: rank 0 scores the trained model and writes adapter + summary
        return result.summary_figures()
    after = _score(model, tokenizer, data, run_dir, "after", config, evaluated=result.final_eval)
    adapter_dir = run_dir / "adapter"
    model.adapter_metadata["default"].update(
        {"base_model": loaded.name, "training": _with_absolute_data_paths(config.to_dict()),
         "data_fingerprint": data["fingerprint"],
         "metrics": {**_figures(before, after), "steps": result.steps},
         **({"labels": data["task"]["labels"]} if data["task"] and data["task"]["labels"] else {})})
    new_rows = model.peft_config["default"].trainable_token_indices
    model.save_pretrained(adapter_dir, save_embedding_layers=False if new_rows else "auto")  # new rows: theirs only
    if new_rows:  # the added tokens: the adapter is used with this tokenizer (PEFT users load it from here)
        tokenizer.save_pretrained(adapter_dir)
    if config.rank_report:
        from .adapters import write_rank_report

        print(f"rank report: {write_rank_report(adapter_dir, run_dir)} (and rank_spectrum.png)")
    figures = {**_summary(model, result, before, after, adapter_dir, data), "dtype": str(loaded.dtype).split(".")[-1]}
    if data["demo"] is not None:
        _print_demo_table(before, after, data["demo"], figures)
    elif data["task"] is not None:
        _print_task_table(figures, config.task)
    write_summary(run_dir, figures)
    finish_trackers(trainer.callbacks, result.steps, after, figures, adapter_dir,
                    [run_dir / "loss.png", run_dir / "rank_spectrum.png", run_dir / "summary.json"])
    print(f"adapter: {adapter_dir} ({figures['adapter_bytes'] / 1e6:.1f} MB); summary: {run_dir / 'summary.json'}")
    return figures


def _check_sources_and_join(config: TrainConfig) -> TrainConfig:
    """Fail at once on a missing --data / --eval-data (before any folder or model); under torchrun join the
    process group, and let only rank 0 print the run's messages (errors still reach stderr from every rank)."""
    from ..data.readers import missing_source
    from ..train.distributed import init_distributed, is_main_process

    for source in (config.data, config.eval_data):
        error = missing_source(source) if source else None
        if error is not None:
            raise error
    config = init_distributed(config)  # under torchrun: join the process group, use this rank's device
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")
    return config


def _start_record(config: TrainConfig, run_dir: Path) -> Optional[tuple[Any, Any]]:
    """Set the run folder up for this run and read the training data, before any model loads: a data error
    costs seconds, not a model load. Returns a causal-LM run's (train, val) records (None for a task run,
    whose records `read_task_records` reads). A fresh run first keeps an earlier one (moved to previous/),
    then records its options in config.yaml at once, so a run killed at any moment can be resumed."""
    from ..train.distributed import is_main_process
    from ..train.report import CONFIG_FILE, SUMMARY_FILE, write_resolved_config
    from ..atomic import remove_stale_temporaries
    from ..train.storage import keep_previous_run

    if is_main_process():
        for folder in (run_dir, run_dir / "adapter"):  # what a write killed mid-way left (checkpoints: the Trainer)
            remove_stale_temporaries(folder)
        if not config.resume:
            kept = keep_previous_run(run_dir, run_products(), results=("adapter", "checkpoints", SUMMARY_FILE))
            if kept is not None:
                print(f"{run_dir} held an earlier run: moved to {kept}/ (one earlier run is kept there; "
                      "--resume continues a run instead of starting over)")
        if not config.resume or not (run_dir / CONFIG_FILE).is_file():  # a resumed run's is rewritten once its
            write_resolved_config(run_dir, config)                       # checkpoint is accepted (the Trainer)
    print(f"lorakit train: model {config.model}, data {config.data or 'built-in demo (Marrowind Labs handbook)'}, "
          f"run folder {run_dir}")
    return None if config.task != "causal-lm" else causal_records(config)


def _start_training(config: TrainConfig, run_dir: Path, records):
    """Load the model, add LoRA, build the data and score the model before training; the Trainer ready to fit."""
    from .. import LoraConfig, get_peft_model
    from ..fast import label_only_lm_loss, use_fast_kernels, use_packed_attention
    from ..lora.loftq import loftq_before_quantization, start_from_loftq
    from ..lora.parameters import parameter_targets_summary
    from ..lora.targets import expert_parameters
    from ..models import load_model
    from ..train import Trainer, seed_everything
    from ..train.runtime import training_dtype
    from ..train.trackers import open_trackers

    seed_everything(config.seed)
    _threads_for_a_busy_cpu(config)
    task = read_task_records(config)  # None for causal-lm; labels are needed to build the model's head
    precision, why = training_dtype(config.dtype, config.device,  # auto: bf16 on a native-bf16 CPU
                                    cpu_bf16=not (config.quantize or config.fsdp))
    print(f"precision: {why}")
    loaded = load_model(config.model, task=config.task, device=config.device, dtype=precision,
                        **(label_arguments(task) if task else {}))
    model, tokenizer = loaded.model, loaded.tokenizer
    token_rows = _add_tokens(config, model, tokenizer)  # the embedding grows before it is quantized
    lora = LoraConfig(**{**config.lora_kwargs(), "target_modules": _targets(config, model),
                         "trainable_token_indices": token_rows,
                         **({"loftq_config": {"loftq_bits": 4, "loftq_iter": config.loftq_iter}}
                            if config.init_lora_weights == "loftq" else {})})
    loftq = None
    if config.quantize:  # QLoRA: the frozen base weights in 4-bit before LoRA wraps them
        if config.init_lora_weights == "loftq":  # (LoftQ's Q is NF4's nearest levels: no calibrated rounding)
            loftq = loftq_before_quantization(model, lora, config.loftq_iter)
            print(f"LoftQ: {len(loftq)} layers start from the rank-{config.r} fit of what NF4 loses "
                  f"({config.loftq_iter} step(s)); NF4 rounding to the nearest level")
        model = _quantize(config, model, tokenizer, loaded.device, None if loftq is not None else records)
    if lora.target_modules == "all-linear" and lora.lora_dropout and expert_parameters(model):
        print(f"LoRA on the fused experts takes no dropout (as in PEFT): dropout {lora.lora_dropout} -> 0")
        lora = lora.copy(lora_dropout=0.0)
    model = get_peft_model(model, lora.copy(init_lora_weights=True) if loftq is not None else lora)
    if loftq is not None:  # the adapter starts from LoftQ's factors; saved as a LoftQ adapter (PEFT's config)
        start_from_loftq(model, loftq)
        model.peft_config["default"] = lora
    use_fast_kernels(model)  # Triton RMSNorm / SwiGLU / rotary on CUDA tensors; the same code as before elsewhere
    on_cpu = next(model.parameters()).device.type == "cpu"  # (rows padded to FLAT_ROW_MULTIPLE tokens there)
    loss_fn = None if task else label_only_lm_loss(model, row_multiple=FLAT_ROW_MULTIPLE if on_cpu else None)
    # packed examples attend within themselves, and a batch of packed rows is one row with no padding
    padding_free = bool(config.packing and not task and use_packed_attention(model))
    data = task_data(task, config, tokenizer) if task else \
        causal_data(config, tokenizer, loaded.dtype, distill=loss_fn is not None, flatten=padding_free,
                    records=records, cpu=on_cpu)
    model.print_trainable_parameters()
    if described := parameter_targets_summary(model):
        print(described)
    before = _score(model, tokenizer, data, run_dir, "before", config)
    trackers = open_trackers(config, run_dir, before)  # --report-to: rank 0's trackers get every logged step
    trainer = Trainer(model, data["train"], data["collate"], config, run_dir, eval_data=data["val"],
                      loss_fn=loss_fn, callbacks=[trackers], evaluate_fn=_evaluate_fn(model, tokenizer, data, config))
    return trainer, model, tokenizer, loaded, data, before


def _threads_for_a_busy_cpu(config: TrainConfig) -> None:
    """On a CPU other work is using, fewer torch threads (see runtime.cpu_threads_for_load), said at start."""
    import torch

    from ..train.runtime import cpu_threads_for_load

    if config.device not in ("cpu", "auto") or (config.device == "auto" and torch.cuda.is_available()):
        return
    threads, reason = cpu_threads_for_load()
    if reason is not None:
        torch.set_num_threads(threads)
        print(reason)


def _quantize(config: TrainConfig, model, tokenizer, device, records):
    from ..quant import quantize_model

    use = records if config.quantize_calibration > 0 and records is not None else None
    calibration = calibration_batches(config, tokenizer, device, use[0]) if use else None
    started = time.perf_counter()
    model = quantize_model(model, config.quantize, calibration=calibration)
    q = model.lorakit_quantization
    print(f"QLoRA: {len(q['quantized'])} linear layers in NF4 ({q['dense_bytes'] / 1e6:.0f} MB -> "
          f"{q['quantized_bytes'] / 1e6:.0f} MB), compute in {q['compute_dtype']}, rounding: {q['rounding']}, "
          f"{time.perf_counter() - started:.0f} s")
    return model


def _add_tokens(config: TrainConfig, model, tokenizer) -> Any:
    """Add --add-tokens and the chat template's missing markers to the tokenizer and grow the embedding; returns
    the trainable_token_indices that train (and save) only the new rows, None when nothing was added. An output
    head of its own (not tied to the input embedding) trains the new rows too: its new rows are random."""
    from ..data.new_tokens import tokens_to_add
    from ..lora.tokens import input_embedding_name, tied_head_name

    new = tokens_to_add(tokenizer, config.new_tokens())
    if not new:
        return None
    tokenizer.add_tokens(new, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(new)
    print(f"added {len(new)} token(s) to the tokenizer: {', '.join(new)}; only their embedding rows train")
    embedding = input_embedding_name(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or tied_head_name(model, model.get_submodule(embedding)) is not None:
        return list(ids)
    return {embedding: list(ids), next(n for n, m in model.named_modules() if m is head): list(ids)}


def _with_absolute_data_paths(options: dict[str, Any]) -> dict[str, Any]:
    """The training options with --data / --eval-data as absolute paths where they are local files, so
    `lorakit eval --adapter` finds them from any folder."""
    return {**options, **{key: str(Path(options[key]).resolve()) for key in ("data", "eval_data")
                          if options.get(key) and Path(options[key]).exists()}}


def run_products() -> tuple[str, ...]:
    """The names `lorakit train` writes into a run folder (a fresh run moves an earlier run's to previous/)."""
    from ..train.loop import METRICS_FILE
    from ..train.report import CONFIG_FILE, PLOT_FILE, SUMMARY_FILE
    from ..train.trackers import TRACKER_PRODUCTS
    from .adapters import PLOT_NAME, REPORT_NAME

    return ("adapter", "checkpoints", CONFIG_FILE, SUMMARY_FILE, METRICS_FILE, PLOT_FILE, SCORES_FILE.format("before"),
            SCORES_FILE.format("after"), REPORT_NAME, PLOT_NAME, *TRACKER_PRODUCTS)


def _targets(config: TrainConfig, model) -> Any:
    """--targets, else attention + MLP projections of the architecture, else PEFT's default.

    A sequence classifier on a BERT-style encoder reads the [CLS] vector through a pooler layer that
    pre-training (here: sentence embedding by mean pooling) never tuned for the task: it gets LoRA too.
    """
    from ..errors import ConfigError
    from ..lora.targets import (ATTENTION_MLP_TARGETS, closest_names, expert_parameters, model_type,
                                unmatched_targets)

    if config.targets is not None:
        unknown = unmatched_targets(model, config.targets)
        if unknown:  # (the library, like PEFT, skips them silently: a typed name that matches nothing is a typo)
            raise ConfigError([f"--targets {t!r} names no module of {type(model).__name__}; closest: "
                               f"{closest_names(model, [t])} (`lorakit inspect {config.model}` lists them)"
                               for t in unknown], where="--targets")
        return config.targets
    if expert_parameters(model):  # MoE: attention, fused experts (and the router where PEFT's all-linear has it)
        return "all-linear"
    targets = ATTENTION_MLP_TARGETS.get(model_type(model))
    has_pooler = any(name.endswith("pooler.dense") for name, _ in model.named_modules())
    if targets is not None and config.task == "seq-cls" and has_pooler:
        targets = list(targets) + ["pooler.dense"]
    return targets


def _task_scores(model, tokenizer, data: dict, config: TrainConfig) -> dict[str, float]:
    """A task run's metrics on its evaluation records, eval_loss among them (the recipe's one pass)."""
    task = data["task"]
    metrics = task["recipe"].evaluate(model, tokenizer, task["eval"], config.seq_len, config.batch_size * 4,
                                      task["labels"])
    return {name if name.startswith("eval_") else f"eval_{name}": value for name, value in metrics.items()}


def _evaluate_fn(model, tokenizer, data: dict, config: TrainConfig):
    """What the Trainer's evaluations compute: a task's own metrics (so the curve, the trackers and the final
    scores share one pass), else None (the Trainer's mean loss). One process only: the recipes are not sharded."""
    from ..train.distributed import world_size

    if data["task"] is None or not len(data["task"]["eval"]) or world_size() > 1:
        return None
    return lambda: _task_scores(model, tokenizer, data, config)


def _score(model, tokenizer, data: dict, run_dir: Path, when: str, config: TrainConfig,
           evaluated: Optional[dict] = None) -> dict[str, Any]:
    """Scores before or after training; 'before' is cached in the run folder so a resumed run reuses it.
    `evaluated`: the figures the Trainer's final evaluation already computed on the same data (not redone)."""
    from ..data import answer_is_correct
    from ..evaluate import eval_loss, score_demo
    from ..progress import phase
    from ..train.batching import loss_unit_counter

    cache = run_dir / SCORES_FILE.format(when)
    if when == "before" and config.resume and cache.is_file():
        return json.loads(cache.read_text())
    start = time.perf_counter()
    scores: dict[str, Any] = {k: v for k, v in (evaluated or {}).items()
                              if k.startswith("eval_") and k not in ("eval_perplexity", "eval_tokens")}
    if data["task"] is not None and len(data["task"]["eval"]) and not scores:
        with phase(f"scoring {when} training"):  # the recipes report eval_loss from that pass
            scores.update(_task_scores(model, tokenizer, data, config))
    if data["val"] and "eval_loss" not in scores:
        scores["eval_loss"] = eval_loss(model, data["val"], data["collate"], config.batch_size,
                                        count_units=loss_unit_counter(config.task),
                                        progress=f"evaluating {when} training")["loss"]
    if data["demo"] is not None:
        demo = score_demo(model, tokenizer, data["demo"], answer_is_correct, progress=f"scoring {when} training")
        scores.update(asdict(demo))
    print(f"scored the model {when} training in {time.perf_counter() - start:.0f}s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)))
    atomic_write_json(cache, scores)
    return scores


def _figures(before: dict, after: dict) -> dict[str, Any]:
    from ..evaluate.scores import DemoScores, retention

    out: dict[str, Any] = {}
    for key, value in before.items():  # every score measured both times: eval_loss, eval_accuracy, heldout_...
        if isinstance(value, float) and isinstance(after.get(key), float):
            out[f"{key}_before"], out[f"{key}_after"] = value, after[key]
    if "general_correct" in before:
        b, a = DemoScores(**before), DemoScores(**after)
        out["retention"] = retention(b, a)
    return out


def _summary(model, result, before: dict, after: dict, adapter_dir: Path, data: dict) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file())
    return {**result.summary_figures(), **_figures(before, after), "trainable_params": trainable,
            "total_params": total, "adapter_bytes": adapter_bytes, "train_examples": len(data["train"]),
            **({"truncation": data["stats"].as_dict()} if data["stats"] else {})}


def _print_demo_table(before: dict, after: dict, demo, figures: dict) -> None:
    rows = [("held-out handbook accuracy", f"{figures['heldout_accuracy_before']:.2f}",
             f"{figures['heldout_accuracy_after']:.2f}"),
            ("general-knowledge accuracy", f"{figures['general_accuracy_before']:.2f}",
             f"{figures['general_accuracy_after']:.2f}")]
    print("\n" + "=" * 78)
    print(f"{'what LoRA changed':<34}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        print(f"{name:<34}{b:>10}{a:>10}")
    print(f"{'retention (general still right)':<34}{'':>10}{figures['retention'] or 0:>10.2f}")
    print(f"trained {figures['steps']} steps in {figures['train_seconds']:.0f}s "
          f"({figures['tokens_per_second']:.0f} tokens/s, {figures['dtype']}), {figures['trainable_params']:,} "
          f"trainable parameters")
    print("-" * 78)
    for i in (0, len(demo.heldout) // 2, len(demo.heldout) - 1):
        print(f"Q: {demo.heldout[i]['question']}")
        print(f"   before: {_clip(before['heldout_answers'][i])}")
        print(f"   after:  {_clip(after['heldout_answers'][i])}")
    print("=" * 78)


def _print_task_table(figures: dict, task: str) -> None:
    names = [k[:-len("_before")] for k in figures if k.endswith("_before")]
    print("\n" + "=" * 60)
    print(f"{task + ' on the evaluation data':<34}{'before':>12}{'after':>12}")
    for name in names:
        print(f"{name:<34}{figures[name + '_before']:>12.4f}{figures[name + '_after']:>12.4f}")
    print(f"trained {figures['steps']} steps in {figures['train_seconds']:.0f}s "
          f"({figures['tokens_per_second']:.0f} tokens/s, {figures['dtype']}), {figures['trainable_params']:,} "
          f"trainable parameters")
    print("=" * 60)


def _clip(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."

