"""Peak GPU memory of lorakit training steps, measured, against `lorakit estimate`'s figure for the same run.

Random-init Llama configs (no download): a 1B (hidden 2048, 16 layers, 32/8 heads, intermediate 8192,
vocab 128256, tied) for full / LoRA / QLoRA, and an 8B (Llama-3.1-8B's shape) for LoRA / QLoRA. Each
case builds the model in bf16 on the GPU (QLoRA: then quantizes it with lorakit.quant), adds LoRA
(r=16, alpha 32, dropout 0.05, the seven projections) and lorakit's Triton kernels (what `lorakit train`
does), resets the peak counter, and runs a few steps the way lorakit's trainer does: bf16 autocast, lorakit's label-only
loss, torch AdamW over the trainable parameters, gradient clipping at 1.0. Rows are random token ids,
every position labelled, no padding: the case the estimate models.

Printed per case: estimate, measured `torch.cuda.max_memory_allocated`, measured / estimate (the
acceptance: within 1 +- 0.15), and for the 8B the QLoRA / LoRA peak ratio (acceptance: <= 0.40).

    python benchmarks/memory.py                 # every case (about 5-8 minutes on an H100)
    python benchmarks/memory.py --only 1b       # or --only 8b
Without CUDA it says so, runs one step of each method on a tiny config as a smoke test of this script,
and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
# (shape, method, seq_len, batch_size, gradient checkpointing)
CASES = [("1b", "full", 2048, 1, False), ("1b", "lora", 2048, 1, False), ("1b", "qlora", 2048, 1, False),
         ("1b", "lora", 2048, 4, True), ("1b", "qlora", 2048, 4, True),
         ("8b", "lora", 2048, 1, False), ("8b", "qlora", 2048, 1, False),
         ("8b", "lora", 512, 1, True), ("8b", "qlora", 512, 1, True)]
TOLERANCE = 0.15


def build(shape: str, method: str, device: torch.device):
    """The random-init model, quantized for QLoRA, wrapped with LoRA unless full fine-tuning."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, get_peft_model
    from lorakit.fast import use_fast_kernels
    from lorakit.quant import quantize_model

    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa", use_cache=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if method == "qlora":
        quantize_model(model, "nf4")
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    use_fast_kernels(model)  # as lorakit train does: the Triton norm, SwiGLU and rotary on CUDA
    return model


def train_steps(model, steps: int, seq_len: int, batch_size: int, checkpointing: bool,
                device: torch.device) -> None:
    """`steps` optimizer steps the way lorakit's Trainer takes them."""
    from lorakit.fast import label_only_lm_loss
    from lorakit.train import runtime

    if checkpointing:
        runtime.enable_gradient_checkpointing(model)
    model.train()
    loss_fn = label_only_lm_loss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8)
    amp = torch.bfloat16 if device.type == "cuda" else None
    vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
        with runtime.autocast(device, amp):
            loss = loss_fn(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def estimated(shape: str, method: str, seq_len: int, batch_size: int, checkpointing: bool) -> int:
    from lorakit.estimate import EstimateSettings, estimate, shape_from_config

    config = {"model_type": "llama", **SHAPES[shape]}
    settings = EstimateSettings(method=method, r=16, seq_len=seq_len, batch_size=batch_size,
                                gradient_checkpointing=checkpointing, dropout=0.05)
    return estimate(shape_from_config(config, shape), settings).total_bytes


def measure(case: tuple, steps: int, device: torch.device) -> dict:
    shape, method, seq_len, batch_size, checkpointing = case
    model = build(shape, method, device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_steps(model, steps, seq_len, batch_size, checkpointing, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"case": case, "estimate": estimated(*case), "measured": peak, "seconds": seconds}


def report(rows: list[dict]) -> bool:
    """Print the table; True when every case meets the acceptance."""
    ok = True
    print(f"{'model':<6}{'method':<7}{'seq':>6}{'batch':>6}{'ckpt':>6}{'estimate':>12}{'measured':>12}"
          f"{'ratio':>8}{'s':>7}")
    for row in rows:
        shape, method, seq_len, batch_size, ckpt = row["case"]
        ratio = row["measured"] / row["estimate"]
        ok &= abs(ratio - 1) <= TOLERANCE
        print(f"{shape:<6}{method:<7}{seq_len:>6}{batch_size:>6}{'on' if ckpt else 'off':>6}"
              f"{row['estimate'] / 1e9:>10.2f}GB{row['measured'] / 1e9:>10.2f}GB{ratio:>8.2f}{row['seconds']:>7.1f}"
              + ("" if abs(ratio - 1) <= TOLERANCE else "   <- outside +-15%"))
    by_case = {row["case"]: row["measured"] for row in rows}
    for (shape, method, seq_len, batch_size, ckpt), peak in by_case.items():
        lora = by_case.get((shape, "lora", seq_len, batch_size, ckpt))
        if method == "qlora" and shape == "8b" and lora:
            share = peak / lora
            ok &= share <= 0.40 or not ckpt
            print(f"8b QLoRA / LoRA peak at seq {seq_len}, ckpt {'on' if ckpt else 'off'}: {share:.2f}"
                  + ("  (acceptance <= 0.40)" if ckpt else "  (activations dominate here)"))
    return ok


def cpu_smoke() -> None:
    """Without CUDA: one step of each method on a tiny config, so this script's code paths are exercised."""
    device = torch.device("cpu")
    for method in ("full", "lora", "qlora"):
        model = build("tiny", method, device)
        train_steps(model, 1, 32, 2, checkpointing=method == "qlora", device=device)
        print(f"  tiny {method:<6} one step ok; estimate for the 1B case at seq 2048: "
              f"{estimated('1b', method, 2048, 1, False) / 1e9:.2f} GB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("1b", "8b"), help="run the cases of one model size only")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (default 3)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/memory.py measures CUDA memory and needs a GPU; none here. Smoke-testing the script "
              "on a tiny config instead:")
        cpu_smoke()
        return 0
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; {args.steps} steps per case")
    rows = []
    for case in CASES:
        if args.only and case[0] != args.only:
            continue
        with contextlib.suppress(torch.cuda.OutOfMemoryError):
            rows.append(measure(case, args.steps, device))
            continue
        print(f"{case}: out of memory", file=sys.stderr)
        gc.collect()
        torch.cuda.empty_cache()
    ok = report(rows)
    print("all cases within the acceptance" if ok else "some cases outside the acceptance (marked above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
