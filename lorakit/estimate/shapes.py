"""The shapes the memory estimate needs, for built-in model families, config.json files and hub ids.

The built-in table copies the published config.json values (hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size,
tie_word_embeddings) so `lorakit estimate` works offline.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

GATED_MLP_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
                   "olmo2", "granite", "cohere", "stablelm", "smollm3"}
"""Architectures whose MLP is gate_proj/up_proj/down_proj (SwiGLU or GeGLU): three matrices."""
LAYERNORM_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "bert", "roberta", "stablelm"}
"""Architectures with LayerNorm (saved in the compute dtype) rather than RMSNorm (upcast to fp32)."""
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "t5", "mt5", "bart", "vit"}
"""Architectures the estimate does not model (no causal LM head over the vocabulary)."""
UNTIED_BY_DEFAULT = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "cohere", "gpt_neox", "gptj"}
"""Architectures whose transformers config defaults tie_word_embeddings to False when the file omits it."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a decoder-only transformer."""

    name: str
    """The model's name as shown in tables."""
    model_type: str
    """transformers' model_type (llama, qwen2, gemma2 ...)."""
    hidden: int
    """hidden_size: the residual stream width."""
    intermediate: int
    """intermediate_size: the MLP's inner width."""
    layers: int
    """num_hidden_layers."""
    heads: int
    """num_attention_heads (query heads)."""
    kv_heads: int
    """num_key_value_heads (grouped-query attention); equals heads without GQA."""
    vocab: int
    """vocab_size: rows of the embedding and of the output head."""
    tied: bool
    """tie_word_embeddings: the output head shares the embedding matrix."""
    head_dim: int = 0
    """Per-head width; 0 = hidden // heads (gemma-2 uses 256 with hidden 3584)."""
    gated_mlp: bool = True
    """gate/up/down MLP (three matrices) rather than fc1/fc2 (two)."""
    qkv_bias: bool = False
    """Biases on q, k and v (Qwen2)."""
    norms_per_layer: int = 2
    """Normalisation layers in each decoder layer (gemma-2 has four)."""
    rms_norm: bool = True
    """RMSNorm (transformers upcasts its input to fp32) rather than LayerNorm."""
    experts: int = 0
    """Routed experts per layer of a mixture of experts (intermediate is then each expert's width); 0 = dense."""
    experts_per_token: int = 0
    """num_experts_per_tok: how many experts each token goes through."""
    router_lora: bool = False
    """'all-linear' adapts the router and gives the fused gate_up_proj rank 2r (PEFT's rewrite for Mixtral and
    the Qwen-MoE families; lorakit.lora.targets.PEFT_MOE_RENAMES)."""

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """{projection: (in_features, out_features)} of one decoder layer."""
        h, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_width, self.kv_heads * self.head_width
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.experts:  # per expert; fused as transformers 5 stores them
            shapes.update({"gate_up_proj": (h, 2 * f) if self.gated_mlp else (h, f), "down_proj": (f, h)})
            shapes.update({"router": (h, self.experts)} if self.router_lora else {})
        elif self.gated_mlp:
            shapes.update({"gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)})
        else:
            shapes.update({"up_proj": (h, f), "down_proj": (f, h)})
        return shapes

    def copies(self, name: str) -> int:
        """How many weights of this shape one layer holds: the expert count for a fused expert weight, else 1."""
        return self.experts if self.experts and name in ("gate_up_proj", "down_proj") else 1

    def layer_linear_params(self) -> int:
        router = self.hidden * self.experts if self.experts and not self.router_lora else 0
        return sum(i * o * self.copies(n) for n, (i, o) in self.linear_shapes().items()) + router

    def dense_params(self) -> int:
        """Parameters outside the decoder layers' linear weights: embeddings, head, norms, biases."""
        head = 0 if self.tied else self.vocab * self.hidden
        norms = self.layers * self.norms_per_layer * self.hidden + self.hidden
        kv = self.kv_heads * self.head_width
        biases = self.layers * (self.heads * self.head_width + 2 * kv) if self.qkv_bias else 0
        return self.vocab * self.hidden + head + norms + biases

    def total_params(self) -> int:
        return self.layers * self.layer_linear_params() + self.dense_params()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "head_dim": self.head_width, "total_params": self.total_params()}


def _llama(name, hidden, intermediate, layers, heads, kv, vocab, tied, **kw) -> ModelShape:
    return ModelShape(name, kw.pop("model_type", "llama"), hidden, intermediate, layers, heads, kv, vocab, tied, **kw)


def _qwen(name, hidden, intermediate, layers, heads, kv, tied) -> ModelShape:
    vocab = 151936 if tied else 152064
    return ModelShape(name, "qwen2", hidden, intermediate, layers, heads, kv, vocab, tied, qkv_bias=True)


def _gemma2(name, hidden, intermediate, layers, heads, kv, head_dim) -> ModelShape:
    return ModelShape(name, "gemma2", hidden, intermediate, layers, heads, kv, 256000, True, head_dim=head_dim,
                      norms_per_layer=4)


KNOWN_SHAPES: dict[str, ModelShape] = {s.name: s for s in [
    _llama("smollm2-135m", 576, 1536, 30, 9, 3, 49152, True),
    _llama("smollm2-360m", 960, 2560, 32, 15, 5, 49152, True),
    _llama("smollm2-1.7b", 2048, 8192, 24, 32, 32, 49152, True),
    _llama("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True, head_dim=64),
    _llama("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256, True, head_dim=128),
    _llama("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, False),
    _llama("llama-3.1-70b", 8192, 28672, 80, 64, 8, 128256, False),
    _llama("llama-3.1-405b", 16384, 53248, 126, 128, 8, 128256, False),
    _llama("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, False),
    _llama("llama-2-13b", 5120, 13824, 40, 40, 40, 32000, False),
    _llama("mistral-7b", 4096, 14336, 32, 32, 8, 32000, False, model_type="mistral"),
    _llama("mistral-7b-v0.3", 4096, 14336, 32, 32, 8, 32768, False, model_type="mistral"),
    _qwen("qwen2.5-0.5b", 896, 4864, 24, 14, 2, True),
    _qwen("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, True),
    _qwen("qwen2.5-3b", 2048, 11008, 36, 16, 2, True),
    _qwen("qwen2.5-7b", 3584, 18944, 28, 28, 4, False),
    _qwen("qwen2.5-14b", 5120, 13824, 48, 40, 8, False),
    _qwen("qwen2.5-32b", 5120, 27648, 64, 40, 8, False),
    _qwen("qwen2.5-72b", 8192, 29568, 80, 64, 8, False),
    _gemma2("gemma-2-2b", 2304, 9216, 26, 8, 4, 256),
    _gemma2("gemma-2-9b", 3584, 14336, 42, 16, 8, 256),
    _gemma2("gemma-2-27b", 4608, 36864, 46, 32, 16, 128),
]}

ALIASES = {"llama-3-8b": "llama-3.1-8b", "llama-3.1-8b-instruct": "llama-3.1-8b", "llama-3-70b": "llama-3.1-70b",
           "llama-3.1-70b-instruct": "llama-3.1-70b", "llama-3.2-1b-instruct": "llama-3.2-1b",
           "llama-3.2-3b-instruct": "llama-3.2-3b", "mistral-7b-v0.1": "mistral-7b",
           "mistral-7b-instruct-v0.3": "mistral-7b-v0.3", "gemma-2-9b-it": "gemma-2-9b", "gemma-2-2b-it": "gemma-2-2b",
           "gemma-2-27b-it": "gemma-2-27b", "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


def _known_key(name: str) -> Optional[str]:
    """The KNOWN_SHAPES key for a family name or hub id (`meta-llama/Llama-3.1-8B-Instruct` too)."""
    key = name.strip().lower().rsplit("/", 1)[-1].replace("meta-", "").replace("_", "-")
    key = key.removesuffix("-instruct") if key.removesuffix("-instruct") in KNOWN_SHAPES else key
    key = ALIASES.get(key, key)
    return key if key in KNOWN_SHAPES else None


def shape_from_config(config: dict[str, Any], name: str) -> ModelShape:
    """A ModelShape from a transformers config.json dict (a nested text_config is used when present).

    Raises:
        ConfigError: a field the estimate needs is missing, or the model is a mixture of experts.
    """
    config = config.get("text_config") or config

    def get(*keys: str, default: Any = None) -> Any:
        """The first of `keys` the config sets (architectures name the same field differently)."""
        return next((config[k] for k in keys if config.get(k) is not None), default)

    kind = str(get("model_type", default="llama"))
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    values = {"hidden_size": hidden, "num_hidden_layers": get("num_hidden_layers", "n_layer"),
              "num_attention_heads": heads, "vocab_size": get("vocab_size")}
    missing = [k for k, v in values.items() if not isinstance(v, int)]
    if missing:
        raise ConfigError([f"{name}: config has no usable {', '.join(missing)}; give a decoder model's config.json "
                           f"or a known name ({', '.join(sorted(KNOWN_SHAPES))})"], where="--model")
    if kind in ENCODER_TYPES or config.get("is_encoder_decoder"):
        raise ConfigError([f"{name}: {kind} is an encoder (or encoder-decoder) model; `lorakit estimate` models "
                           "decoder-only causal LMs"], where="--model")
    experts = get("num_local_experts", "num_experts", "n_routed_experts", default=0)
    mixed = [k for k in ("shared_expert_intermediate_size", "n_shared_experts", "first_k_dense_replace",
                         "mlp_only_layers") if config.get(k)] + (["decoder_sparse_step"] if get(
                             "decoder_sparse_step", default=1) != 1 else [])
    if experts and mixed:
        raise ConfigError([f"{name}: mixture-of-experts layers with {', '.join(mixed)} (shared experts or dense "
                           "layers) are not modelled by `lorakit estimate` yet; plain routed experts are"],
                          where="--model")
    tied_default = kind not in UNTIED_BY_DEFAULT
    fields = dict(
        name=name, model_type=kind, hidden=hidden, intermediate=get("intermediate_size", "n_inner", default=4 * hidden),
        layers=values["num_hidden_layers"], heads=heads, kv_heads=get("num_key_value_heads", default=heads),
        vocab=values["vocab_size"], tied=bool(get("tie_word_embeddings", default=tied_default)),
        head_dim=get("head_dim", default=0), gated_mlp=kind in GATED_MLP_TYPES,
        qkv_bias=bool(get("attention_bias", default=kind == "qwen2")),
        norms_per_layer=4 if kind in ("gemma2", "gemma3_text") else 2, rms_norm=kind not in LAYERNORM_TYPES)
    return ModelShape(**{**fields, **(_moe_fields(kind, experts, get) if experts else {})})


def _moe_fields(kind: str, experts: int, get) -> dict[str, Any]:
    """ModelShape's mixture-of-experts fields from a config: each expert's width, routing, PEFT's rewrite."""
    from ..lora.targets import PEFT_MOE_RENAMES, peft_moe_family_of

    return {"experts": experts, "experts_per_token": get("num_experts_per_tok", "top_k", default=2),
            "intermediate": get("moe_intermediate_size", "intermediate_size"), "gated_mlp": True,
            "router_lora": peft_moe_family_of(kind) in PEFT_MOE_RENAMES}


def resolve_shape(model: str) -> ModelShape:
    """The shape of `model`: a built-in family name, an embedded model, a config.json or model folder,
    or a hub id (fetches config.json only, so it needs the network).

    Raises:
        ConfigError: the model is unknown here and its config cannot be read (offline, say).
    """
    key = _known_key(model)
    if key:
        return KNOWN_SHAPES[key]
    path = Path(model).expanduser()
    if not path.exists():
        path = _embedded_folder(model) or path
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        return _shape_from_file(path)
    if path.suffix == ".json" or path.is_dir():
        raise ConfigError([f"{model}: no config.json there"], where="--model")
    if "/" in model:
        return _shape_from_hub(model)
    raise ConfigError([f"unknown model {model!r}; known names: {', '.join(sorted(KNOWN_SHAPES))}; or give a "
                       "config.json, a model folder, or a hub id such as Qwen/Qwen2.5-7B"], where="--model")


def _embedded_folder(name: str) -> Optional[Path]:
    """The folder of an embedded model that ships a transformers folder (not a GGUF file), if installed."""
    from ..models.embedded import embedded_path, find_embedded

    embedded = find_embedded(name)
    if embedded is None:
        return None
    try:
        return embedded_path(embedded)
    except Exception:  # not installed: fall through to the unknown-model message
        return None


def _shape_from_file(path: Path) -> ModelShape:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError([f"{path}: not a readable config.json ({err})"], where="--model") from None
    if not isinstance(config, dict):
        raise ConfigError([f"{path}: expected a JSON object"], where="--model")
    return shape_from_config(config, name=str(config.get("_name_or_path") or path.parent.name or path.stem))


def _shape_from_hub(model_id: str) -> ModelShape:
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(model_id, "config.json")
    except Exception as err:  # offline, gated, or no such repository
        raise ConfigError([f"could not fetch {model_id}/config.json ({type(err).__name__}: {err}); offline, use a "
                           f"known name ({', '.join(sorted(KNOWN_SHAPES))}) or a local config.json"],
                          where="--model") from None
    return replace(_shape_from_file(Path(local)), name=model_id)
