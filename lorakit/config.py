"""LoraConfig and TaskType: PEFT's names and meanings, validated in one place.

`adapter_config.json` is this dataclass as JSON (plus `peft_type`), so PEFT reads lorakit's
adapters and lorakit reads PEFT's.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ConfigError


class TaskType(str, enum.Enum):
    """What the wrapped model does; decides which task head stays trainable and is saved."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    IMAGE_CLASSIFICATION = "IMAGE_CLASSIFICATION"
    SPEECH_SEQ_2_SEQ = "SPEECH_SEQ_2_SEQ"
    TRANSLATION = "TRANSLATION"
    OTHER = "OTHER"

    def __str__(self) -> str:
        return self.value


class PeftType(str, enum.Enum):
    """The adapter method, as PEFT's enum of that name (lorakit computes LoRA only); equal to its string."""

    LORA = "LORA"

    def __str__(self) -> str:
        return self.value


# Task heads that are new (randomly initialised) for a task, so they must train and be saved (as PEFT does).
TASK_HEADS: dict[TaskType, list[str]] = {
    TaskType.SEQ_CLS: ["classifier", "score"],
    TaskType.TOKEN_CLS: ["classifier", "score"],
    TaskType.QUESTION_ANS: ["qa_outputs"],
    TaskType.IMAGE_CLASSIFICATION: ["classifier", "fc"],
}

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "orthogonal", "loftq", "corda", "eva")
RESIDUAL_INITS = ("pissa", "olora", "corda")
"""Inits that move the adapter's starting product out of the base weight (W becomes a residual): save converts them
to plain LoRA for the original W."""


@dataclass
class CordaConfig:
    """PEFT's CorDA settings (LoraConfig(init_lora_weights='corda', corda_config=CordaConfig(...))), read by
    preprocess_corda: context-oriented decomposition, the SVD of W C where C is the covariance of each layer's
    inputs over sample data."""

    cache_file: Optional[str] = None
    """File holding each layer's cropped decomposition (written by preprocess_corda, reused when present); much
    smaller than the residual model, so the residual can be rebuilt from the original weights and this file."""
    covariance_file: Optional[str] = None
    """File holding each layer's input covariance (written when absent, reused when present), so ranks can change
    without running the sample data again. About as large as the model."""
    corda_method: str = "ipm"
    """'ipm' (instruction-previewed: the adapter starts from the r largest components, fastest to fine-tune) or
    'kpm' (knowledge-preserved: the r smallest, so the base keeps what the sample data exercises)."""
    verbose: bool = False
    """Print progress of the decomposition, one line a layer."""
    use_float16_for_covariance: bool = False
    """Accumulate the covariance in the inputs' half precision (half the memory, less stable)."""
    prune_temporary_fields: bool = True
    """Delete the covariance, sample count, method and rank that preprocessing leaves on each layer."""
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter (field names and meanings as in PEFT)."""

    r: int = 8
    """Rank of the update: A is (r x in), B is (out x r)."""
    lora_alpha: float = 8
    """Scaling numerator: the update is multiplied by lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA)."""
    target_modules: Optional[Union[list[str], str]] = None
    """Modules to adapt: names matched exactly or as a '.suffix', a full-match regex string,
    'all-linear' (every linear layer but the output head), or None for the architecture's default."""
    exclude_modules: Optional[Union[list[str], str]] = None
    """Modules never to adapt, in the same syntax as target_modules."""
    target_parameters: Optional[list[str]] = None
    """Parameters to adapt directly (PEFT's field), e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']:
    fused 3-D expert weights get one low-rank update per expert, a 2-D weight one update. Names match a
    parameter's full name exactly or as a '.suffix'."""
    lora_dropout: float = 0.0
    """Dropout probability applied to the input of the LoRA branch."""
    bias: str = "none"
    """Which biases train: 'none', 'all', or 'lora_only' (biases of adapted layers)."""
    modules_to_save: Optional[list[str]] = None
    """Modules (besides LoRA) trained in full and saved with the adapter, e.g. a new classifier head."""
    init_lora_weights: Union[bool, str] = True
    """True: Kaiming-uniform A and zero B (the update starts at 0); 'gaussian'; 'pissa' (or
    'pissa_niter_K'); 'olora'; 'orthogonal' (A, B random with B A = 0; even r); 'loftq' (the base weight becomes
    its quantized values Q and B A a rank-r fit of W - Q; needs loftq_config); 'corda' (A, B from the
    decomposition preprocess_corda left on each layer; W keeps the residual); 'eva' (accepted in a config, refused
    by get_peft_model: EVA's data pass is PEFT's); False: random A and B (for tests only)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA: a learned per-output magnitude times the direction of W + scaling * B A."""
    ensure_weight_tying: bool = False
    """Keep adapters on a tied input embedding and output head tied (PEFT's field): with the embedding (or a tied
    module) in modules_to_save, one trained copy serves all of them; in target_modules, the tied modules' LoRA
    factors are the embedding's, transposed. The config is saved resolved, as PEFT saves it."""
    lora_bias: bool = False
    """B gets a trainable bias of its own (PEFT's lora_bias), saved with the adapter; merging adds it (times scaling)
    to the base layer's bias. Not for embeddings or DoRA, and only with init_lora_weights True or False."""
    corda_config: Optional[CordaConfig] = None
    """With init_lora_weights='corda': CordaConfig(...) (PEFT's, or a dict), read by preprocess_corda; defaults to
    CordaConfig() (with PEFT's warning). Kept, with PEFT's warning, under any other init."""
    loftq_config: dict[str, int] = field(default_factory=dict)
    """With init_lora_weights='loftq': LoftQConfig(loftq_bits=4 or 8, loftq_iter=N) (or its dict), as PEFT's. Ignored
    (emptied, with PEFT's warning) for any other init."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex or name suffix: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex or name suffix: lora_alpha}."""
    layers_to_transform: Optional[Union[list[int], int]] = None
    """Only adapt these layer indices (found through layers_pattern)."""
    layers_pattern: Optional[Union[list[str], str]] = None
    """Name of the ModuleList holding the layers ('layers', 'h', 'blocks' ...); guessed when None."""
    task_type: Optional[Union[TaskType, str]] = None
    """CAUSAL_LM, SEQ_CLS, TOKEN_CLS, SEQ_2_SEQ_LM, QUESTION_ANS, FEATURE_EXTRACTION, ..."""
    fan_in_fan_out: bool = False
    """True when the base stores weights as (in, out), as GPT-2's Conv1D; set automatically."""
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    """Embedding rows to train (and save) instead of the whole embedding, e.g. of newly added tokens: a list
    of token ids (rows of the input embedding; a tied output head follows it), or {layer name: [ids]}."""
    inference_mode: bool = False
    """Set when an adapter is loaded for inference only."""
    base_model_name_or_path: Optional[str] = None
    """Where the base model came from (informational)."""
    revision: Optional[str] = None
    """Base model revision (informational)."""
    peft_type: PeftType = PeftType.LORA
    """Always PeftType.LORA (== "LORA"); present so PEFT recognises the file."""

    def __post_init__(self) -> None:
        if isinstance(self.task_type, str) and self.task_type in TaskType.__members__:
            self.task_type = TaskType(self.task_type)
        if self.peft_type in PeftType.__members__:
            self.peft_type = PeftType(self.peft_type)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() in ("olora", "gaussian"):
            self.init_lora_weights = self.init_lora_weights.lower()  # PEFT reads these two case-insensitively
        if isinstance(self.trainable_token_indices, tuple):
            self.trainable_token_indices = list(self.trainable_token_indices)
        if dataclasses.is_dataclass(self.loftq_config):
            self.loftq_config = dataclasses.asdict(self.loftq_config)  # PEFT stores it as a dict
        if self.init_lora_weights != "loftq" and self.loftq_config:
            self.loftq_config = {}  # (PEFT's warning was given in __init__)
        self.corda_config = _as_corda_config(self.corda_config)
        if self.init_lora_weights == "corda" and self.corda_config is None:
            warnings.warn("`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA "
                          "config.")
            self.corda_config = CordaConfig()
        elif self.init_lora_weights != "corda" and self.corda_config is not None:
            warnings.warn("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.")
        if self.bias not in BIAS_CHOICES:  # (refused by get_peft_model, where PEFT refuses it: said here already)
            warnings.warn(f"bias={self.bias!r} is not one of {BIAS_CHOICES}: get_peft_model will refuse this config")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and \
                str(self.init_lora_weights).startswith(RESIDUAL_INITS):
            warnings.warn(RSLORA_PATTERN_WARNING)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        init = self.init_lora_weights
        if not (init in INIT_CHOICES or (isinstance(init, str) and init.startswith("pissa_niter_"))):
            problems.append(f"init_lora_weights must be one of {INIT_CHOICES} or 'pissa_niter_K', got {init!r}")
        problems += _loftq_problems(init, self.loftq_config)
        if self.task_type is not None and not isinstance(self.task_type, TaskType):
            problems.append(f"task_type must be one of {[t.value for t in TaskType]}, got {self.task_type!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            bad = {k: v for k, v in (pattern or {}).items() if not isinstance(v, (int, float)) or v <= 0}
            if bad:
                problems.append(f"{name} values must be positive numbers, got {bad}")
        problems += _token_index_problems(self.trainable_token_indices, self.modules_to_save)
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append(f"layers_pattern={self.layers_pattern!r} only says where the layers given by "
                            "layers_to_transform are; set layers_to_transform too (or drop layers_pattern)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            import re

            try:
                re.compile(self.target_modules)
            except re.error as e:
                problems.append(f"target_modules regex {self.target_modules!r} does not compile: {e}")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            problems.append("The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                            f"init_lora_weights={self.init_lora_weights} instead.")
        if self.lora_bias and self.use_dora:
            problems.append("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        problems += _corda_problems(self.corda_config)
        tp = self.target_parameters
        if isinstance(tp, str):  # (PEFT's TypeError: a string is an easy slip, as target_modules takes one)
            raise ConfigTypeError(problems + [f"`target_parameters` must be a list of strings or None. Got the string "
                                              f"{tp!r}: write [{tp!r}]"], where="LoraConfig")
        if tp is not None and (not isinstance(tp, list) or not all(isinstance(t, str) and t for t in tp)):
            problems.append(f"target_parameters must be a list of parameter names, got {tp!r}")
        if problems:
            raise ConfigError(problems, where="LoraConfig")

    # ------------------------------------------------------------------ PEFT's config API
    is_prompt_learning = False
    """PEFT's flag (True for prompt tuning and its kin); a LoRA config is never one."""
    is_adaption_prompt = False

    def _register_custom_module(self, mapping: dict) -> None:
        """PEFT's dynamic dispatch (its own LoRA layer classes for custom module types) is refused with this error:
        lorakit's layers are its own, and PEFT's layer classes need PEFT's model around them."""
        names = ", ".join(getattr(k, "__name__", str(k)) for k in mapping)
        raise ConfigError([f"custom LoRA layer classes (PEFT's dynamic dispatch, for {names}) are not supported: "
                           "lorakit adapts nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention and "
                           "GPT-2's Conv1D, and parameters through target_parameters; use PEFT for other layer "
                           "types"], where="LoraConfig")

    # ------------------------------------------------------------------ derived values
    def rank_for(self, module_name: str) -> int:
        return int(_match_pattern(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return _match_pattern(self.alpha_pattern, module_name, self.lora_alpha)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["task_type"] = self.task_type.value if isinstance(self.task_type, TaskType) else self.task_type
        d["peft_type"] = str(self.peft_type)
        if d["corda_config"]:  # (file names given as Path objects are written as the strings PEFT's json holds)
            d["corda_config"] = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                                 for k, v in d["corda_config"].items()}
        if isinstance(d["target_modules"], (set, tuple)):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from .atomic import atomic_write_json

        atomic_write_json(os.path.join(directory, "adapter_config.json"), self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        """Build from a PEFT/lorakit config dict. Fields PEFT has and lorakit does not are dropped where they
        are unset (or only say how the factors were initialised); an adapter that uses one of PEFT's features
        lorakit does not compute is refused, since its outputs here would be wrong."""
        peft_type = d.get("peft_type", "LORA")
        if peft_type not in ("LORA", None):
            raise ConfigError([f"peft_type {peft_type!r} is not LoRA; lorakit loads LoRA adapters only"],
                              where="adapter_config.json")
        _refuse_peft_only_features(d, where="adapter_config.json", what="this adapter",
                                   remedy="load it with PEFT, or train the adapter again with lorakit")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("init_lora_weights") in INIT_ONLY_METHODS:  # the file's factors are plain LoRA factors
            kwargs["init_lora_weights"] = True
        if kwargs.get("layers_to_transform") is None:  # (a pattern alone selects nothing; older files hold one)
            kwargs.pop("layers_pattern", None)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        from .errors import AdapterError

        path = os.path.join(directory, "adapter_config.json")
        if not os.path.isfile(path):
            raise AdapterError(f"{path} not found: an adapter folder holds adapter_config.json and "
                               "adapter_model.safetensors (save one with model.save_pretrained(folder))")
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise AdapterError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def copy(self, **changes: Any) -> "LoraConfig":
        """A new config with `changes`; the warnings this config gave when it was made are not given again."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dataclasses.replace(self, **changes)


PEFT_ONLY_FEATURES = {
    "layer_replication": "layers repeated in the model",
    "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA", "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA", "megatron_config": "Megatron parallel layers",
}
"""PEFT LoraConfig fields (0.21) that change what an adapter computes, which lorakit does not implement."""
PEFT_ONLY_INIT_METHODS = ("mica",)
"""PEFT init methods lorakit refuses to load: MiCA is a variant."""
INIT_ONLY_METHODS = ("eva", "orthogonal")
"""PEFT init methods that only choose the starting factors (the base model is left as it is): a saved adapter
made with one loads as plain LoRA."""


PEFT_INFORMATIONAL_FIELDS = ("auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
                             "eva_config", "lora_ga_config", "runtime_config")
"""PEFT LoraConfig fields (0.21) that change nothing lorakit computes unless a refused feature or init method is
used beside them."""


def _refuse_peft_only_features(d: dict[str, Any], where: str, what: str, remedy: str) -> None:
    used = [f"{k}={d[k]!r} ({meaning})" for k, meaning in PEFT_ONLY_FEATURES.items()
            if d.get(k) not in (None, False, [], {})]
    init = d.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in PEFT_ONLY_INIT_METHODS:
        used.append(f"init_lora_weights={init!r} (a variant, or factors trained against a changed base model)")
    if used:
        raise ConfigError([f"{what} uses PEFT features lorakit does not compute: {', '.join(used)}; {remedy}"],
                          where=where)


def _init_taking_peft_fields(generated_init):
    """LoraConfig(...) takes PEFT's other field names too, so a config copied from PEFT or TRL code runs: a
    feature lorakit does not compute is refused by name, an unset or informational field is dropped, and a name
    neither knows is still a TypeError."""
    @functools.wraps(generated_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        peft_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in PEFT_ONLY_FEATURES
                       or k in PEFT_INFORMATIONAL_FIELDS}
        if kwargs.get("use_dora") and peft_fields.get("megatron_config"):
            raise ConfigError(["DoRA does not support megatron_core, please set `use_dora=False`. (lorakit computes "
                               "no megatron_config either: leave it unset, or use PEFT for this adapter)"],
                              where="LoraConfig")
        _refuse_peft_only_features(peft_fields, where="LoraConfig", what="this config",
                                   remedy="leave it unset, or use PEFT for this adapter")
        if kwargs.get("init_lora_weights") == "eva" and peft_fields.get("eva_config") is None:
            warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.")
        settings_given = {"eva": peft_fields.get("eva_config") is not None, "loftq": bool(kwargs.get("loftq_config"))}
        for method, given in settings_given.items():  # PEFT's warnings for an init method's settings without it
            if given and kwargs.get("init_lora_weights") != method:
                warnings.warn(f"`{method}_config` specified but will be ignored when `init_lora_weights` is not "
                              f"'{method}'.")
        generated_init(self, *args, **kwargs)
    return __init__


LoraConfig.__init__ = _init_taking_peft_fields(LoraConfig.__init__)


RSLORA_PATTERN_WARNING = (
    "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified base weights "
    "PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass `path_initial_model_for_weight_conversion` to "
    "`save_pretrained` to restore the initial values of the base weights; if you intend to do this, please ensure not "
    "to use rslora or rank_pattern/alpha_pattern. (lorakit's own conversion, save_pretrained(convert_to_lora=True), "
    "keeps each layer's scaling and works with them.)")
"""PEFT's warning, word for word, then what lorakit does instead."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type where PEFT raises TypeError (a ConfigError too, so one except catches all)."""


class UnsupportedBiasError(ConfigError, NotImplementedError):
    """`bias` is none of 'none', 'all', 'lora_only'; raised when the adapter is made, as PEFT raises it."""

    def __init__(self, bias: Any):
        super().__init__([f"Requested bias: {bias}, is not implemented. Use one of {BIAS_CHOICES}"],
                         where="LoraConfig.bias")


def _as_corda_config(value: Any) -> Optional[CordaConfig]:
    """lorakit's CordaConfig from None, a dict (adapter_config.json) or a CordaConfig-like object (PEFT's), copied,
    so the caller's object is never changed. Anything else is returned as it is, for validate to name."""
    if value is None or isinstance(value, CordaConfig):
        return dataclasses.replace(value) if value is not None else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict) and set(value) <= {f.name for f in dataclasses.fields(CordaConfig)}:
        return CordaConfig(**value)
    return value


def _corda_problems(corda: Any) -> list[str]:
    if corda is None:
        return []
    if not isinstance(corda, CordaConfig):
        known = [f.name for f in dataclasses.fields(CordaConfig)]
        return [f"corda_config must be a CordaConfig or a dict with keys among {known}, got {corda!r}"]
    if corda.corda_method not in ("ipm", "kpm"):
        return [f"corda_config.corda_method must be 'ipm' or 'kpm', got {corda.corda_method!r}"]
    return []


@dataclass
class LoftQConfig:
    """PEFT's LoftQ settings (LoraConfig(init_lora_weights='loftq', loftq_config=LoftQConfig(...)))."""

    loftq_bits: int = 4
    """Bits of the quantized base: 4 (NF4) or 8 (int8, one absmax per row)."""
    loftq_iter: int = 1
    """Alternating steps: quantize W minus the adapter, then fit the adapter to what quantizing lost."""


def _loftq_problems(init: Any, loftq: Any) -> list[str]:
    if init != "loftq":
        return []
    if not loftq:
        return ["`loftq_config` must be specified when `init_lora_weights` is 'loftq'."]
    if not isinstance(loftq, dict):
        return [f"loftq_config must be a LoftQConfig or a dict, got {loftq!r}"]
    problems = [f"loftq_config has unknown keys {sorted(set(loftq) - {'loftq_bits', 'loftq_iter'})}; "
                "use loftq_bits and loftq_iter"] if set(loftq) - {"loftq_bits", "loftq_iter"} else []
    if loftq.get("loftq_bits", 4) not in (4, 8):
        problems.append(f"loftq_bits must be 4 (NF4) or 8 (int8), got {loftq.get('loftq_bits')!r}")
    steps = loftq.get("loftq_iter", 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(f"loftq_iter must be a positive integer, got {steps!r}")
    return problems


def _token_index_problems(spec: Any, modules_to_save: Optional[list[str]]) -> list[str]:
    """What is wrong with a trainable_token_indices value: a list of token ids, or {layer name: [ids]}."""
    if spec is None:
        return []
    groups = spec if isinstance(spec, dict) else {"": spec}
    if not isinstance(spec, (list, dict)) or not groups:
        return [f"trainable_token_indices must be a list of token ids or {{layer name: [ids]}}, got {spec!r}"]
    problems = []
    for name, ids in groups.items():
        where = f"trainable_token_indices[{name!r}]" if name else "trainable_token_indices"
        if not isinstance(ids, list) or not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                       for i in ids):
            problems.append(f"{where} must be a non-empty list of token ids (integers >= 0), got {ids!r}")
        if name and name in (modules_to_save or []):
            problems.append(f"{name!r} is in modules_to_save (trained in full) and in trainable_token_indices "
                            "(some rows trained): choose one")
    return problems


def _match_pattern(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key that, as a regex, matches the end of the
    name at a '.' boundary (so a plain name or a dotted suffix matches too)."""
    import re

    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module_name):
                return value
        except re.error:  # not a valid regex: the name itself or a '.suffix'
            if module_name == key or module_name.endswith("." + key):
                return value
    return default
