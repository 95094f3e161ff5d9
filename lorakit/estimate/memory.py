"""GPU memory of one training step: weights, gradients, optimizer states, activations, for full / LoRA / QLoRA.

The figures model what lorakit's trainer allocates on CUDA (what `torch.cuda.max_memory_allocated`
reports; the CUDA context, ~0.5 GB, comes on top): weights loaded in bf16, bf16 autocast, LoRA factors in
the base's dtype, `torch.optim.AdamW` (whose states take the parameter's dtype), transformers' SDPA
attention, and lorakit's label-only loss. benchmarks/memory.py measures them against real runs.

Weights: full and LoRA hold every parameter in bf16 (2 bytes); QLoRA holds the decoder layers' linear
weights in NF4 (0.5 byte + an int8 scale per 64 values + a factor per 64·256 values ≈ 0.516 byte) and
the rest (embeddings, output head, norms) in bf16. LoRA adds r·(in + out) parameters per target.

Activations: what autograd keeps for backward, in bytes per token of one decoder layer (a = 2 bytes for
bf16; h hidden, f intermediate, q = heads·head_dim, k = kv_heads·head_dim, n_h heads):
  * RMSNorm: transformers upcasts the input to fp32 and `pow`/`mul` keep it: 4h per norm (+ a·h more
    when the norm weight trains, full fine-tuning only). lorakit's Triton norm (`kernels`: CUDA, the
    Llama family, frozen norm weight) keeps the bf16 input: a·h.
  * the input of each linear layer whose weight trains (full) or that carries LoRA, once per distinct
    tensor: a·h (q/k/v input), a·h (gate/up input), a·f (down input); o_proj's input is SDPA's output,
    already kept. With LoRA dropout p > 0 every target keeps its own dropped copy and its mask instead:
    (a + 1)·width per target (CUDA's fused dropout keeps a bool mask; CPU keeps a bf16 one).
  * LoRA: A's output, a·r per target, kept for B's gradient.
  * SDPA (flash / memory-efficient): q, k, v and the output, a·(2q + 2k), plus an fp32 logsumexp
    per head, 4·n_h. k and v stay at kv_heads when there is no padding mask (transformers then calls
    SDPA with enable_gqa); with a mask they are repeated to all heads, add 2a·(q - k).
  * gated MLP: act(gate) keeps gate, act·up keeps both factors: 3a·f (a non-gated MLP: a·f); lorakit's
    Triton silu·up (`kernels`) keeps gate and up: 2a·f.
With frozen embeddings (LoRA) the first layer's first norm sees an input that needs no gradient and
keeps nothing; after the last layer the final norm keeps 4h (full: + a·h, the head's input).
With gradient checkpointing (transformers' per-layer, non-reentrant) only each layer's input is kept,
a·h per token per layer, and one layer is recomputed during backward: its activations plus the widest
gradients alive in its backward (the MLP's, 2a·f for gate and up) are added.
Loss: the output head runs on the labelled positions only (lorakit.fast). With a trainable head (full
fine-tuning) logits are cast to fp32 and log_softmax keeps its fp32 output; at the start of backward the
two fp32 gradients (of the log-probs and of the logits) are alive beside it: 12·vocab bytes per labelled
token. With a frozen head (LoRA, QLoRA) the chunked cross-entropy keeps only the hidden-state gradient
(a·h per labelled token) and one chunk of fp32 logits and probabilities at a time (8·vocab bytes per row
of a CE_CHUNK-row chunk; with `kernels`, the chunk's bf16 logits overwritten by their gradient: a·vocab).
Every position is counted as labelled (packed pre-training data), the worst case.
Peak = weights + optimizer states + QLoRA's dequantization buffer (lorakit's kernel writes the largest
layer's dense weight, a bytes per value; with `kernels` off, torchao 0.18 materialises about 15 bytes per
value while dequantizing it) + the larger of
  * the start of backward: saved activations + the loss's or one layer's transient buffers + the
    gradients made first (full fine-tuning: the output head's, vocab·h·a);
  * the end of backward: every gradient + AdamW's foreach step temporary (sqrt(v), one state's size).
Gradients and activations are not alive together in full: backward frees each layer's activations as it
makes that layer's gradients (they start from None: the trainer zeroes them with set_to_none). With
gradient accumulation (`grad_accum` > 1) the gradients of the earlier micro-batches are alive through
the later ones' forward and backward, so all of them count at the start too. `overlap_bytes` is what
the sum of the parts overstates the peak by (<= 0): the parts and it add up to the total.
Mixture of experts (fused 3-D expert weights): E copies of each expert weight; a token's MLP activations
count once per expert it visits (num_experts_per_tok); LoRA on the experts keeps each layer's W + ΔW and makes
its gradient in full (see _adapted_expert_bytes). Approximate: not checked against real runs yet.
Not modelled: the attention mask with padding (s² bytes per row), allocator fragmentation, shared experts.
tests/test_estimate.py checks the saved-activation part against the tensors autograd really keeps (a
bf16 Llama on CPU, full and LoRA): within 5%.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

from ..errors import ConfigError
from .shapes import ModelShape

METHODS = ("full", "lora", "qlora")
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
NF4_BYTES_PER_VALUE = 0.5 + 1 / 64 + 2 / (64 * 256)
"""Packed 4-bit value + int8 absmax per block of 64 + a bf16 factor per 256 blocks (double quantization)."""
DEQUANT_BYTES_PER_VALUE = 15
"""torchao 0.18 `NF4Tensor.get_original_weight`: two int64 index tensors (8), two looked-up halves (2),
the scaled halves (2), the stacked result (2) and an expanded scale copy (1), per value."""
LOSS_BYTES_PER_VOCAB = 12
"""fp32 log-probs kept by log_softmax + the two fp32 gradients alive at the start of backward."""
CE_CHUNK = 1024
"""Rows per chunk of lorakit.fast.cross_entropy (its CHUNK_ROWS; kept here so the estimate needs no torch)."""
CHUNK_BYTES_PER_VOCAB = 8
"""One chunk's fp32 logits, turned into probabilities in place, and its exp copy."""
KERNEL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose norms and MLP lorakit's Triton kernels take on CUDA (lorakit.fast.kernels.patch's
FAMILIES; kept here so the estimate needs no torch)."""


@dataclass(frozen=True)
class Optimizer:
    """Per-parameter state of an optimizer: `states` tensors of `bytes_per_value` (None = the parameter's)."""

    states: int
    bytes_per_value: Optional[float] = None
    foreach_copy: bool = True
    """torch's foreach step allocates a temporary the size of one state (AdamW's sqrt(v) + eps)."""


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer(2),                                      # torch.optim.AdamW: m and v in the param dtype
    "adamw-fp32": Optimizer(2, 4),                              # m and v in fp32 (e.g. fp32 master weights)
    "adamw8bit": Optimizer(2, 1 + 4 / 256, foreach_copy=False),  # torchao.optim.AdamW8bit, block 256
    "adamw4bit": Optimizer(2, 0.5 + 4 / 128, foreach_copy=False),  # torchao.optim.AdamW4bit, block 128
    "lion": Optimizer(1),
    "sgd-momentum": Optimizer(1),
    "sgd": Optimizer(0, foreach_copy=False),
}


@dataclass
class EstimateSettings:
    """What is trained and how; the same names as `lorakit train` options."""

    method: str = "lora"
    r: int = 16
    targets: Union[str, Sequence[str]] = "attention+mlp"
    """Projection names, "all-linear" or "attention+mlp" (all seven projections, lorakit train's default)."""
    seq_len: int = 2048
    batch_size: int = 1
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    dropout: float = 0.05
    dtype: str = "bf16"
    grad_accum: int = 1
    """Micro-batches per optimizer step: above 1, gradients stay alive beside the next micro-batch's activations."""
    kernels: bool = True
    """lorakit's Triton kernels (what `lorakit train` uses on CUDA: norms, SwiGLU and cross-entropy for the
    Llama family, NF4 dequantization for any); False: the plain transformers and torchao code (CPU)."""


@dataclass
class MemoryEstimate:
    """The estimate of one method, in bytes (see the module docstring for the model)."""

    method: str
    total_params: int
    trainable_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    workspace_bytes: int
    overlap_bytes: int
    """<= 0: gradients and activations not alive at once (see the module docstring)."""
    total_bytes: int
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def target_names(shape: ModelShape, targets: Union[str, Sequence[str]]) -> list[str]:
    """The decoder-layer projections `targets` names. Raises ConfigError naming the valid ones."""
    known = list(shape.linear_shapes())
    if isinstance(targets, str) and targets in ("all-linear", "attention+mlp"):
        return known
    wanted = [targets] if isinstance(targets, str) else list(targets)
    wanted = [t.rsplit(".", 1)[-1] for t in wanted]
    unknown = [t for t in wanted if t not in known]
    if unknown or not wanted:
        raise ConfigError([f"targets {unknown or wanted} are not projections of {shape.name}; choose from "
                           f"{', '.join(known)}, 'all-linear' or 'attention+mlp'"], where="--targets")
    return [t for t in known if t in wanted]


def check_settings(s: EstimateSettings) -> None:
    """Every problem with the settings at once."""
    problems = []
    if s.method not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)}, got {s.method!r}")
    if s.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {s.optimizer!r}")
    if s.dtype not in DTYPE_BYTES:
        problems.append(f"dtype must be one of bf16, fp16, fp32, got {s.dtype!r}")
    for name in ("r", "seq_len", "batch_size", "grad_accum"):
        if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
            problems.append(f"{name} must be a positive integer, got {getattr(s, name)!r}")
    if not 0 <= s.dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {s.dropout}")
    if problems:
        raise ConfigError(problems, where="estimate options")


def layer_activation_bytes(shape: ModelShape, s: EstimateSettings, targets: list[str]) -> int:
    """Bytes autograd keeps per token in one decoder layer (no checkpointing); see the module docstring."""
    a = DTYPE_BYTES[s.dtype]
    routed = max(1, shape.experts_per_token) if shape.experts else 1  # a token's copies, one per expert it visits
    h, f = shape.hidden, shape.intermediate * routed
    q, k = shape.heads * shape.head_width, shape.kv_heads * shape.head_width
    full = s.method == "full"
    if full:  # the norm weight trains: what the plain norm keeps, and its normalized input for the weight's gradient
        norm = (4 * h if shape.rms_norm else a * h) + a * h
    else:
        norm = _norm_input_bytes(shape, s)
    total = shape.norms_per_layer * norm
    widths = {name: i * (routed if shape.copies(name) > 1 else 1) for name, (i, _) in shape.linear_shapes().items()}
    groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("gate_up_proj",), ("down_proj",)]
    for group in groups:
        members = [m for m in group if m in widths]
        if not members:
            continue
        width = widths[members[0]]
        adapted = members if full else [m for m in members if m in targets]
        if not adapted:
            continue
        if full or s.dropout == 0:
            # one saved input, shared by the layers that read it; o_proj's is SDPA's output itself (flash
            # and CPU kernels write it (batch, seq, heads, dim), so transformers' .contiguous() copies nothing)
            total += 0 if group == ("o_proj",) else a * width
        else:
            total += len(adapted) * (a + 1) * width  # each target's own dropout output and bool mask
    if not full:
        total += a * s.r * len(targets)  # A's outputs
    total += a * (2 * q + 2 * k) + 4 * shape.heads  # SDPA: q, k, v, output, fp32 logsumexp
    total += (2 if _kernels(shape, s) else 3) * a * f if shape.gated_mlp else a * f
    return total


def _rank_factor(shape: ModelShape, s: EstimateSettings, target: str) -> int:
    """2 for the fused gate_up_proj where 'all-linear' gets PEFT's rewrite (w1 + w3 at rank r each), else 1."""
    whole = isinstance(s.targets, str) and s.targets in ("all-linear", "attention+mlp")
    return 2 if target == "gate_up_proj" and shape.router_lora and whole else 1


def _adapted_expert_bytes(shape: ModelShape, s: EstimateSettings, targets: list[str]) -> int:
    """LoRA on fused experts (lorakit.lora.parameters, as PEFT): each adapted layer's W + ΔW is a new tensor the
    experts' matmuls keep for backward, and its gradient is made in full once per layer (gradient
    checkpointing: one layer's W + ΔW at a time)."""
    if s.method == "full" or not shape.experts:
        return 0
    a, linears = DTYPE_BYTES[s.dtype], shape.linear_shapes()
    per_layer = a * sum(linears[t][0] * linears[t][1] * shape.copies(t) for t in targets if shape.copies(t) > 1)
    return (1 if s.gradient_checkpointing else shape.layers) * per_layer + per_layer


def _kernels(shape: ModelShape, s: EstimateSettings) -> bool:
    return s.kernels and shape.model_type in KERNEL_FAMILIES


def _norm_input_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """Per token, what a frozen norm keeps: its bf16 input (Triton norm, LayerNorm) or an fp32 copy."""
    return DTYPE_BYTES[s.dtype] * shape.hidden if _kernels(shape, s) or not shape.rms_norm else 4 * shape.hidden


def estimate(shape: ModelShape, settings: EstimateSettings) -> MemoryEstimate:
    """The memory of one training step of `shape` with `settings` (see the module docstring)."""
    check_settings(settings)
    s, a = settings, DTYPE_BYTES[settings.dtype]
    targets = target_names(shape, s.targets)
    linears = shape.linear_shapes()
    linear_params = shape.layers * shape.layer_linear_params()
    lora_params = 0 if s.method == "full" else shape.layers * sum(
        s.r * _rank_factor(shape, s, t) * (linears[t][0] + linears[t][1]) * shape.copies(t) for t in targets)
    total_params = shape.total_params() + lora_params
    if s.method == "qlora":
        weights = linear_params * NF4_BYTES_PER_VALUE + (shape.dense_params() + lora_params) * a
    else:
        weights = total_params * a
    trainable = total_params if s.method == "full" else lora_params
    opt = OPTIMIZERS[s.optimizer]
    optimizer = trainable * opt.states * (opt.bytes_per_value or a)
    tokens = s.batch_size * s.seq_len
    per_layer = layer_activation_bytes(shape, s, targets)
    # the final norm's fp32 input; full: the head's gathered input too. LoRA without checkpointing: the
    # first norm sees frozen embeddings' output, which needs no gradient, so it keeps nothing
    full = s.method == "full"
    final = 4 * shape.hidden + a * shape.hidden if full else _norm_input_bytes(shape, s)
    first_norm = 0 if full else _norm_input_bytes(shape, s)
    if full:
        loss, loss_chunk = LOSS_BYTES_PER_VOCAB * shape.vocab, 0
    else:  # frozen head: chunked cross-entropy
        per_vocab = a if _kernels(shape, s) else CHUNK_BYTES_PER_VOCAB
        loss, loss_chunk = a * shape.hidden, per_vocab * shape.vocab * min(CE_CHUNK, tokens)
    if s.gradient_checkpointing:
        saved = shape.layers * a * shape.hidden + final
        transient = max(loss, per_layer + (2 if shape.gated_mlp else 1) * a * shape.intermediate)
    else:
        saved = shape.layers * per_layer + final - first_norm
        transient = max(loss, per_layer)
    activations = tokens * (saved + transient) + loss_chunk + _adapted_expert_bytes(shape, s, targets)
    step_copy = trainable * (opt.bytes_per_value or a) if opt.foreach_copy and opt.states else 0
    per_value = a if s.kernels else DEQUANT_BYTES_PER_VALUE
    dequant = per_value * max(i * o for i, o in linears.values()) if s.method == "qlora" else 0
    workspace = max(0, step_copy - activations) + dequant
    gradients = trainable * a
    first_gradients = gradients if s.grad_accum > 1 else (shape.vocab * shape.hidden * a if full else 0)
    peak = int(weights) + int(optimizer) + dequant + max(activations + first_gradients, gradients + step_copy)
    parts = int(weights) + gradients + int(optimizer) + activations + workspace
    detail = {"per_layer_activation_bytes_per_token": per_layer, "saved_bytes_per_token": saved,
              "transient_bytes_per_token": transient, "targets": targets, "tokens": tokens,
              "dequant_buffer_bytes": dequant, "optimizer_step_copy_bytes": int(step_copy),
              "gradients_alive_at_backward_start_bytes": first_gradients}
    return MemoryEstimate(s.method, total_params, trainable, int(weights), gradients, int(optimizer),
                          activations, workspace, int(peak - parts), int(peak), detail)


def largest_fitting(shape: ModelShape, settings: EstimateSettings, budget_bytes: float,
                    vary: str, step: int = 1, limit: int = 1 << 20) -> int:
    """The largest batch_size (vary="batch_size") or seq_len (a multiple of `step`) whose estimate fits
    `budget_bytes`; 0 when even the smallest does not. Memory grows with both, so bisection works."""
    def fits(n: int) -> bool:
        trial = EstimateSettings(**{**asdict(settings), vary: n * step})
        return estimate(shape, trial).total_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi * step <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step
