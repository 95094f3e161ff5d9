"""`TrainConfig`: the single definition of every `lorakit train` option.

The CLI exposes these fields through jsonargparse (`attribute_docstrings`: the string under each
field is its `--help` text) and YAML configs use the same names. Nothing here imports torch.
"""
from __future__ import annotations

import copy
import importlib.util
import dataclasses
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from lorakit.errors import ConfigError
from lorakit.train.trackers import tracker_problems

TASKS = ("causal-lm", "seq-cls", "token-cls", "qa", "seq2seq")
# PEFT's TaskType value for each --task
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS",
              "qa": "QUESTION_ANS", "seq2seq": "SEQ_2_SEQ_LM"}
LR_SCHEDULES = ("cosine", "linear", "constant")
NAN_POLICIES = ("stop", "skip")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "adamw8bit")
INIT_LORA_WEIGHTS = (True, False, "gaussian", "pissa", "olora", "loftq")


@dataclass
class TrainConfig:
    """Options of `lorakit train`: model, data, LoRA shape, optimisation, checkpoints, logging."""

    # --- what to train on -------------------------------------------------------------------
    model: str = "smollm2-135m"
    """Base model: an embedded name (smollm2-135m, minilm-l6), a local transformers folder,
    a .gguf file or a hub id."""
    data: Optional[str] = None
    """Training data: a .jsonl/.json/.csv/.tsv/.parquet file, a folder of them, or a datasets
    name. None = the built-in demo data."""
    eval_data: Optional[str] = None
    """Held-out data, scored every --eval-every steps and at the end (same formats as --data)."""
    task: Literal["causal-lm", "seq-cls", "token-cls", "qa", "seq2seq"] = "causal-lm"
    """What the model learns: causal-lm, seq-cls, token-cls, qa or seq2seq."""
    out: Optional[str] = None
    """Run folder. None = runs/<name>, or runs/<timestamp> when no --name is given."""
    name: Optional[str] = None
    """Run name, used for the run folder runs/<name> when --out is not given."""

    # --- how long ---------------------------------------------------------------------------
    epochs: float = 1.0
    """Passes over the training data (fractions allowed). Ignored when --max-steps is set."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = derive from --epochs."""
    batch_size: int = 4
    """Examples per micro-batch (one forward/backward)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; the effective batch is batch_size x grad_accum."""
    seq_len: int = 512
    """Maximum tokens per example (longer ones are truncated)."""
    packing: bool = False
    """Concatenate short examples into full seq_len rows (causal-lm only)."""
    group_by_length: bool = False
    """Put examples of similar length in the same micro-batch (less padding, same data per epoch);
    on by default for seq-cls and token-cls."""

    # --- LoRA shape -------------------------------------------------------------------------
    r: int = 16
    """LoRA rank: the inner dimension of the A (r x in) and B (out x r) matrices."""
    alpha: float = 32
    """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --use-rslora)."""
    targets: Union[str, list[str], None] = None
    """Layers that get LoRA: None = the architecture's attention and MLP projections; a list of
    names (exact or .suffix), a full-match regex, or "all-linear"."""
    dropout: float = 0.05
    """Dropout applied to the LoRA branch input during training."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    init_lora_weights: Union[bool, Literal["gaussian", "pissa", "olora", "loftq"]] = True
    """LoRA init: true = Kaiming-uniform A and zero B; gaussian; pissa; olora; loftq (with --quantize nf4: the
    adapter starts as the rank-r fit of what NF4 loses of each weight, LoftQ); false = random B, so the adapter is
    not a no-op at start (for tests)."""
    loftq_iter: int = 1
    """With init_lora_weights=loftq: LoftQ's alternating steps (quantize W - BA, refit BA to W - Q)."""
    add_tokens: Union[str, list[str], None] = None
    """Tokens to add to the tokenizer (comma-separated, e.g. "<tool_call>,</tool_call>"): the embedding
    grows, and only the new tokens' rows train and are saved with the adapter (with the tokenizer).
    Markers the chat template writes that the tokenizer lacks are added the same way."""

    # --- optimisation -----------------------------------------------------------------------
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup: cosine, linear (both to zero at the end) or constant."""
    warmup_ratio: float = 0.03
    """Fraction of all optimizer steps spent ramping the learning rate up linearly."""
    warmup_steps: Optional[int] = None
    """Warmup length in steps; overrides --warmup-ratio when set."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases, norms or DoRA magnitude vectors)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value; None or 0 = no clipping."""
    lora_plus_ratio: Optional[float] = None
    """LoRA+: the learning rate of the lora_B matrices is lr x this ratio (the paper suggests
    16). None = off."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw: torch's AdamW. adamw8bit: torchao's AdamW8bit, moments in 8 bits per value in blocks of 256
    (tensors under 4,096 values keep fp32 moments); its step is compiled with torch.compile the first
    time each shape is seen (seconds on CPU). Needs torchao; not with --fsdp."""
    seed: int = 42
    """Seed for initialisation, dropout and the data order of every epoch."""

    # --- hardware ---------------------------------------------------------------------------
    device: str = "auto"
    """Where to train: auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype: auto = bf16 autocast on CUDA; on a CPU with native bf16 that measures faster, bf16 weights
    with fp32 LoRA factors under bf16 autocast (printed at start); fp32 elsewhere. float16 uses a gradient scaler."""
    quantize: Optional[Literal["nf4"]] = None
    """QLoRA: store the frozen base linear weights in 4-bit NF4 with double-quantized scales (torchao,
    pip install 'lorakit[qlora]'; CPU or CUDA; the output head and embeddings stay dense). None = off."""
    quantize_calibration: int = 128
    """QLoRA on causal-LM data: choose each weight's NF4 level against this many training examples
    (GPTQ's rounding; the same NF4 format, a smaller error on real inputs). 0 = round to the nearest level."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    fsdp: bool = False
    """Under torchrun: shard every weight over the processes with FSDP2 (fully_shard), for models
    that do not fit one device. Off: each process holds the whole model and only the LoRA
    gradients are summed across processes (docs/DISTRIBUTED.md)."""

    # --- run bookkeeping --------------------------------------------------------------------
    resume: Union[bool, str] = False
    """Continue from a checkpoint: true = the latest good one in the run folder; or a checkpoint
    or run folder path."""
    log_every: Optional[int] = None
    """Write the training loss to metrics.jsonl every N optimizer steps; None = about 50 points over the run
    (every 1 to 25 steps), so that a short run still draws a curve."""
    eval_every: int = 100
    """Score --eval-data every N optimizer steps (and always at the end); 0 = only at the end."""
    save_every: int = 100
    """Write a resumable checkpoint every N optimizer steps (and always at the end);
    0 = only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss: stop (keep the last good checkpoint, raise an error) or skip that
    batch and count it."""
    rank_report: bool = False
    """At the end, write the adapter's singular-value spectra (rank_spectrum.png, rank_report.json) and
    the rank that keeps 99% of the update's energy into the run folder (see `lorakit rank`)."""
    report_to: Union[str, list[str], None] = None
    """Experiment trackers that get every logged step (the step numbers of metrics.jsonl), the options and,
    at the end, the adapter: any of tensorboard, wandb, mlflow, trackio, comma-separated; none = only the run
    folder. Each is an extra (pip install 'lorakit[wandb]' ...); W&B runs offline unless WANDB_MODE is set,
    MLflow writes <run>/mlruns unless MLFLOW_TRACKING_URI is set."""
    run_name: Optional[str] = None
    """The run's name in the trackers; None = --name, else the run folder's name."""
    project: Optional[str] = None
    """The W&B / trackio project and the MLflow experiment (also --experiment); None = lorakit."""

    def validate(self) -> "TrainConfig":
        """Check every field; raise one `ConfigError` listing all problems. Returns self."""
        problems = _choice_problems(self) + _number_problems(self) + _target_problems(self.targets)
        problems += _combination_problems(self)
        if self.add_tokens is not None and not all(isinstance(t, str) and t for t in self.new_tokens() or [""]):
            problems.append(f"add_tokens must name tokens (comma-separated, none empty); got {self.add_tokens!r}")
        problems += tracker_problems(self.report_to)
        if problems:
            raise ConfigError(problems, where="train config")
        return self

    def new_tokens(self) -> list[str]:
        """--add-tokens as a list (a string is split at commas)."""
        tokens = self.add_tokens.split(",") if isinstance(self.add_tokens, str) else list(self.add_tokens or [])
        return [t.strip() if isinstance(t, str) else t for t in tokens]

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the fields as plain data (YAML/JSON ready)."""
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping (e.g. a YAML file); unknown keys are reported, all at once."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError([f"unknown option {k!r}" for k in unknown], where="train config")
        return cls(**copy.deepcopy(dict(values)))

    def lora_kwargs(self) -> dict[str, Any]:
        """The `LoraConfig(...)` keyword arguments these options stand for (PEFT names)."""
        targets = copy.deepcopy(self.targets)
        return {"r": self.r, "lora_alpha": self.alpha, "target_modules": targets,
                "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
                "init_lora_weights": self.init_lora_weights, "task_type": TASK_TYPES.get(self.task)}

    def run_dir(self, now: Optional[datetime] = None) -> Path:
        """The run folder: --out, else runs/<name>, else runs/<YYYYmmdd-HHMMSS>."""
        return self.named_run_dir(self.out, self.name) or Path("runs") / (now or datetime.now()).strftime("%Y%m%d-%H%M%S")

    @staticmethod
    def named_run_dir(out: Optional[str], name: Optional[str]) -> Optional[Path]:
        """The run folder --out or --name names, if either is given."""
        return Path(out) if out else Path("runs") / name if name else None


def _choice_problems(c: TrainConfig) -> list[str]:
    choices = [("task", c.task, TASKS), ("lr_schedule", c.lr_schedule, LR_SCHEDULES),
               ("nan_policy", c.nan_policy, NAN_POLICIES), ("dtype", c.dtype, DTYPES),
               ("quantize", c.quantize, (None, "nf4")), ("optimizer", c.optimizer, OPTIMIZERS)]
    problems = [f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}"
                for name, value, allowed in choices if value not in allowed]
    if not any(c.init_lora_weights is v or c.init_lora_weights == v and isinstance(v, str)
               for v in INIT_LORA_WEIGHTS):
        problems.append("init_lora_weights must be true, false, gaussian, pissa, olora or loftq; "
                        f"got {c.init_lora_weights!r}")
    if c.init_lora_weights == "loftq" and c.quantize != "nf4":
        problems.append("init_lora_weights=loftq fits the adapter to what 4-bit quantization loses: use it with "
                        "quantize=nf4 (--quantize nf4)")
    if not isinstance(c.loftq_iter, int) or c.loftq_iter < 1:
        problems.append(f"loftq_iter must be a positive integer; got {c.loftq_iter!r}")
    if not isinstance(c.resume, (bool, str)):
        problems.append(f"resume must be true, false or a path; got {c.resume!r}")
    if not isinstance(c.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", c.device):
        problems.append(f"device must be auto, cpu, mps, cuda or cuda:N; got {c.device!r}")
    if not c.model:
        problems.append("model must name a model (an embedded name, a folder, a .gguf file or a hub id)")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_problems(c: TrainConfig) -> list[str]:
    # (field, value, test, what the value must be)
    rules = [
        ("epochs", c.epochs, lambda v: v > 0, "> 0"),
        ("max_steps", c.max_steps, lambda v: v == -1 or v > 0, "-1 or > 0"),
        ("batch_size", c.batch_size, lambda v: v >= 1, ">= 1"),
        ("grad_accum", c.grad_accum, lambda v: v >= 1, ">= 1"),
        ("seq_len", c.seq_len, lambda v: v >= 2, ">= 2"),
        ("r", c.r, lambda v: v >= 1, ">= 1"),
        ("alpha", c.alpha, lambda v: v > 0, "> 0"),
        ("dropout", c.dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("lr", c.lr, lambda v: v > 0, "> 0"),
        ("warmup_ratio", c.warmup_ratio, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("weight_decay", c.weight_decay, lambda v: v >= 0, ">= 0"),
        ("eval_every", c.eval_every, lambda v: v >= 0, ">= 0"),
        ("save_every", c.save_every, lambda v: v >= 0, ">= 0"),
        ("keep_checkpoints", c.keep_checkpoints, lambda v: v >= 1, ">= 1"),
        ("quantize_calibration", c.quantize_calibration, lambda v: v >= 0, ">= 0"),
    ]
    optional = [("warmup_steps", c.warmup_steps, lambda v: v >= 0, ">= 0 or None"),
                ("max_grad_norm", c.max_grad_norm, lambda v: v >= 0, ">= 0 or None"),
                ("lora_plus_ratio", c.lora_plus_ratio, lambda v: v > 0, "> 0 or None"),
                ("log_every", c.log_every, lambda v: v >= 1, ">= 1 or None")]
    rules += [rule for rule in optional if rule[1] is not None]
    integers = {"max_steps", "batch_size", "grad_accum", "seq_len", "r", "log_every", "eval_every",
                "save_every", "keep_checkpoints", "warmup_steps", "seed"}
    problems = []
    for name, value, ok, must in rules:
        if not _is_number(value) or (name in integers and not isinstance(value, int)):
            kind = "an integer" if name in integers else "a number"
            problems.append(f"{name} must be {kind} {must}; got {value!r}")
        elif not ok(value):
            problems.append(f"{name} must be {must}; got {value!r}")
    if not isinstance(c.seed, int) or isinstance(c.seed, bool) or c.seed < 0:
        problems.append(f"seed must be an integer >= 0; got {c.seed!r}")
    return problems


def _target_problems(targets: Any) -> list[str]:
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            return [f"targets {targets!r} is not a valid regular expression: {err}"]
        return []
    if isinstance(targets, (list, tuple)):
        if not targets:
            return ["targets is an empty list; give layer names, a regex, 'all-linear' or None"]
        bad = [t for t in targets if not isinstance(t, str) or not t]
        return [f"targets must be non-empty names; got {bad!r}"] if bad else []
    return [f"targets must be None, a list of names, a regex or 'all-linear'; got {targets!r}"]


def _combination_problems(c: TrainConfig) -> list[str]:
    problems = []
    if c.quantize == "nf4" and importlib.util.find_spec("torchao") is None:
        problems.append("quantize=nf4 needs torchao: pip install 'lorakit[qlora]'")
    if c.packing and c.task != "causal-lm":
        problems.append(f"packing works only with task causal-lm; task is {c.task!r}")
    if c.optimizer == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        problems.append("optimizer=adamw8bit needs torchao: pip install 'lorakit[qlora]'")
    if c.fsdp and c.optimizer != "adamw":
        problems.append(f"fsdp saves plain AdamW states only; optimizer {c.optimizer!r} is not supported with it")
    if c.fsdp and c.quantize:
        problems.append("fsdp cannot shard quantized (quantize=nf4) weights; use one of the two")
    if c.fsdp and c.dtype == "float16":
        problems.append("fsdp with dtype float16 (loss scaling) is not supported; use bfloat16")
    if c.dtype == "float16" and c.device == "cpu":
        problems.append("dtype float16 is not supported for training on CPU; use float32 or bfloat16")
    return problems
