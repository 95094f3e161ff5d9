"""Training throughput: lorakit against PEFT (and PEFT + Liger, and full fine-tuning) on the same batches.

    python benchmarks/throughput.py                  # CPU: smollm2-135m, fp32, batch 4 x 256, packed demo data
    python benchmarks/throughput.py --config 1b      # CUDA: random-init Llama 1B in bf16, batch 8 x 1024
    python benchmarks/throughput.py --config 8b --gradient-checkpointing   # CUDA: 8B, batch 4 x 2048
    python benchmarks/throughput.py --config moe     # CPU: random-init Qwen3-MoE (8 experts, top 2), all-linear
                                                     # (attention, router and every expert, as PEFT resolves it)

Every method trains LoRA r=16, alpha 32, dropout 0 on q,k,v,o,gate,up,down with AdamW, from the same
weights on the same batches, each in its own child process (so peak memory is its own):
  lorakit            lorakit's training path: label-only LM head (`lorakit.fast.label_only_lm_loss`), packed-row
                     attention (`lorakit.fast.use_packed_attention`) and `lorakit.fast.use_fast_kernels` (the
                     q/k/v and gate/up nodes; Triton kernels on CUDA, torch-op RMSNorm and rotary on CPU)
  lorakit-reference  lorakit's plain LoRA layers (y = Wx + s·B(Ax), no fused function, no kept factor casts) and
                     transformers' own loss: the reference the fast path must match
  peft               PEFT's get_peft_model and transformers' loss: what a PEFT user runs
  peft+liger         the same with Liger Kernel's fused ops patched in (only when liger-kernel is installed)
  full               full fine-tuning (6N FLOPs per token instead of LoRA's 4N)
Prints tokens/s, peak memory, MFU (FLOPs per token: 4N + attention for LoRA, 6N + attention for full,
N = parameters in matmuls, attention = 12 x layers x hidden x seq), the ratios against PEFT, and the loss
of each step of lorakit next to lorakit-reference (they must agree). tokens/s counts real tokens, not
padding: every method trains the same rows; lorakit's batches are padding-free, the others' are padded.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {  # name: (model, batch, seq, dtype, device)
    "cpu": {"model": "smollm2-135m", "batch": 4, "seq": 256, "dtype": "float32", "device": "cpu"},
    # the same in bf16: weights loaded in bf16, bf16 autocast, LoRA factors in fp32 (PEFT upcasts them by default)
    "cpu-bf16": {"model": "smollm2-135m", "batch": 4, "seq": 256, "dtype": "bfloat16", "device": "cpu"},
    "1b": {"llama": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
           "batch": 8, "seq": 1024, "dtype": "bfloat16", "device": "cuda"},
    "8b": {"llama": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
           "batch": 4, "seq": 2048, "dtype": "bfloat16", "device": "cuda"},
}
CONFIGS["moe"] = {"qwen3_moe": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                    num_experts=8, num_experts_per_tok=2, vocab_size=4096),
                  "batch": 4, "seq": 128, "dtype": "float32", "device": "cpu", "targets": "all-linear"}
METHODS = ["lorakit", "lorakit-reference", "peft", "peft+liger", "full"]


def build_model(cfg: dict):
    """(model, tokenizer or None) in the config's dtype and device, the same weights every call."""
    import torch

    dtype = getattr(torch, cfg["dtype"])
    if "model" in cfg:
        from lorakit.models import load_model

        loaded = load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
        return loaded.model, loaded.tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    kind, config_cls, model_cls = ("qwen3_moe", Qwen3MoeConfig, Qwen3MoeForCausalLM) if "qwen3_moe" in cfg else \
        ("llama", LlamaConfig, LlamaForCausalLM)
    config = config_cls(**cfg[kind], attn_implementation="sdpa", torch_dtype=dtype)
    with torch.device(cfg["device"]):
        model = model_cls(config).to(dtype)
    return model, None


def batches(cfg: dict, tokenizer, steps: int, padding_free: bool) -> list[tuple[dict, int]]:
    """`steps` (batch, real tokens) pairs of batch x seq: packed demo chats (CPU) or random tokens with
    labels (GPU, no padding). Packed rows are padded to the longest, with the block-diagonal mask, or,
    `padding_free`, joined into one row (lorakit's packed attention keeps the examples apart)."""
    import torch

    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        vocab = cfg.get("llama", cfg.get("qwen3_moe"))["vocab_size"]
        out = []
        for _ in range(steps):
            ids = torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g)
            out.append(({"input_ids": ids, "labels": ids.clone()}, ids.numel()))
        return out
    from lorakit.data import build_causal_examples, collate_causal, load_demo, records_from_dicts

    demo = load_demo()
    records = records_from_dicts([{"messages": r["messages"]} for r in demo.train], name="built-in demo")
    examples = build_causal_examples(records, tokenizer, seq_len=cfg["seq"], packing=True).examples
    rows = [examples[i % len(examples)] for i in range(steps * cfg["batch"])]
    groups = [rows[i:i + cfg["batch"]] for i in range(0, len(rows), cfg["batch"])]
    return [(collate_causal(group, pad_token_id=tokenizer.pad_token_id, flatten=padding_free),
             sum(len(row["input_ids"]) for row in group)) for group in groups]


def prepare(method: str, model, gradient_checkpointing: bool, targets=TARGETS):
    """(model, loss_fn) for one method."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method.startswith("peft"):
        import peft

        if method == "peft+liger":
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
    else:
        import lorakit

        model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                 target_modules=targets, task_type="CAUSAL_LM"))
    if gradient_checkpointing and method == "lorakit":
        from lorakit.train.runtime import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)  # what lorakit train does: with the lean recompute
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    loss_fn = None
    if method == "lorakit-reference":
        from lorakit.lora.layer import LoraLinear

        LoraLinear._fusable_adapter = lambda self, x: None  # every layer takes the plain path (this child only)
    if method == "lorakit":
        from lorakit.fast import keep_freed_memory, label_only_lm_loss, use_fast_kernels, use_packed_attention

        loss_fn = label_only_lm_loss(model)
        use_packed_attention(model)
        if keep_freed_memory():  # what lorakit's Trainer does on CPU (a no-op for CUDA tensors' memory)
            print("lorakit: glibc malloc keeps freed memory (lorakit.fast.keep_freed_memory)")
        print(f"lorakit kernels: {use_fast_kernels(model)}")
    return model, loss_fn or (lambda m, b: m(**b).loss)


def child(config_name: str, method: str, steps: int, warmup: int, gradient_checkpointing: bool,
          profile: bool = False) -> dict:
    import torch

    cfg = CONFIGS[config_name]
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg)
    model, loss_fn = prepare(method, model, gradient_checkpointing, cfg.get("targets", TARGETS))
    model.train()
    data = batches(cfg, tokenizer, steps + warmup, padding_free=method == "lorakit")
    if method.startswith("lorakit") and cfg["dtype"] == "bfloat16" and cfg["device"] == "cpu":
        from lorakit.train.runtime import keep_trainable_in_fp32  # fp32 masters, as lorakit train keeps them

        keep_trainable_in_fp32(model)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if cfg["device"] == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=1e-4, **fused)
    autocast = torch.autocast(cfg["device"], dtype=torch.bfloat16, enabled=cfg["dtype"] == "bfloat16")
    sync = torch.cuda.synchronize if cfg["device"] == "cuda" else (lambda: None)
    losses, start, tokens = [], None, 0
    for i, (batch, real_tokens) in enumerate(data):
        if i == warmup:
            sync()
            start = time.perf_counter()
            if cfg["device"] == "cuda":
                torch.cuda.reset_peak_memory_stats()
        losses.append(float(train_step(model, loss_fn, optimizer, batch, cfg["device"], autocast)))
        if i >= warmup:
            tokens += real_tokens  # padding is not counted: every method trains the same tokens
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cfg["device"] == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if profile:
        profile_steps(method, model, loss_fn, optimizer, data[:3], cfg["device"], autocast)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"tokens_per_second": tokens / seconds, "peak_bytes": peak, "losses": losses,
            "flops_per_token": flops_per_token(base, cfg["seq"], full=method == "full")}


def train_step(model, loss_fn, optimizer, batch: dict, device: str, autocast):
    """One optimizer step on `batch` (moved to `device`, forward under `autocast`); returns the loss."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast:
        loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def profile_steps(method: str, model, loss_fn, optimizer, data: list, device: str, autocast) -> None:
    """Three more steps under torch.profiler: the ops that took the most device time, printed."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch, _ in data:
            train_step(model, loss_fn, optimizer, batch, device, autocast)
        if device == "cuda":
            torch.cuda.synchronize()
    for key in (["self_cuda_time_total"] if device == "cuda" else []) + ["self_cpu_time_total"]:
        print(f"-- profile of {method}, {len(data)} steps, by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
    if device == "cuda":
        print_gpu_gaps(method, prof)


def print_gpu_gaps(method: str, prof) -> None:
    """Where the GPU waited in the profiled steps: the idle time between consecutive kernels, summed by the
    pair of kernels around each gap (a gap means the CPU had not yet issued the next kernel, or waited)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"][:40]) for e in events if e.get("cat") == "kernel")
    if len(kernels) < 2:
        return
    busy = sum(end - start for start, end, _ in kernels)
    span = kernels[-1][1] - kernels[0][0]
    by_pair: dict = {}
    for (_, end, before), (start, _, after) in zip(kernels, kernels[1:]):
        if start - end > 5:  # us; shorter ones are launch spacing
            total, count = by_pair.get((before, after), (0.0, 0))
            by_pair[(before, after)] = (total + start - end, count + 1)
    print(f"-- GPU idle in the profiled steps of {method}: {(span - busy) / 1e3:.1f} of {span / 1e3:.1f} ms "
          f"({(span - busy) / span:.0%}); largest by the kernels around the gap (gaps > 5 us):")
    for (before, after), (total, count) in sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"  {total / 1e3:7.2f} ms x{count:<4} {before:<40} -> {after}")


def flops_per_token(model, seq: int, full: bool) -> float:
    """6N (full) or 4N (LoRA: no weight gradient for frozen W) + attention's 12 x layers x hidden x seq."""
    import torch

    n = sum(m.weight.numel() for m in model.modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Linear4bit")
    c = model.config
    experts = getattr(c, "num_experts", 0) or getattr(c, "num_local_experts", 0)
    if experts:  # fused 3-D expert weights: a token uses num_experts_per_tok of them
        n += sum(p.numel() for p in model.parameters() if p.dim() == 3) * c.num_experts_per_tok // experts
    return (6 if full else 4) * n + 12 * c.num_hidden_layers * c.hidden_size * seq


def peak_flops(device: str) -> tuple[float, str]:
    """The matmul rate MFU is measured against, measured here: bf16 8192³ products on CUDA (what the
    issue's MFU uses), fp32 2048³ on CPU."""
    import torch

    cuda = device == "cuda"
    n, dtype, label, unit = (8192, torch.bfloat16, "bf16 8192^3", 1e12) if cuda else \
        (2048, torch.float32, "fp32 2048x2048", 1e9)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3 if cuda else 1):
        a @ b
    sync()
    repeats, start = 20 if cuda else 5, time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    rate = repeats * 2 * n ** 3 / (time.perf_counter() - start)
    return rate, f"{rate / unit:.0f} {'TFLOP/s' if cuda else 'GFLOP/s'} ({label} matmul measured here)"


def available(method: str) -> bool:
    import importlib.util

    if method.startswith("peft") and importlib.util.find_spec("peft") is None:
        return False
    return method != "peft+liger" or importlib.util.find_spec("liger_kernel") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu", choices=list(CONFIGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=0, help="measured steps (default: 8 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="unmeasured first steps (default: 2 on CPU, 5 on CUDA)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also print each method's top ops by device and CPU time, and where the GPU waited")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = CONFIGS[args.config]
    steps = args.steps or (8 if cfg["device"] == "cpu" else 20)
    if args.warmup is None:
        args.warmup = 2 if cfg["device"] == "cpu" else 5  # CUDA: Triton compiles, clocks settle
    if args.child:
        method, out = args.child
        Path(out).write_text(json.dumps(child(args.config, method, steps, args.warmup, args.gradient_checkpointing,
                                             args.profile)))
        return
    import torch

    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks/throughput.py --config {args.config}: needs a CUDA GPU; skipped")
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            if not available(method):
                print(f"== {method}: skipped (not installed)")
                continue
            print(f"== {method}", flush=True)
            out = Path(tmp) / f"{method}.json"
            cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(steps), "--warmup",
                   str(args.warmup), "--child", method, str(out)] + \
                (["--gradient-checkpointing"] if args.gradient_checkpointing else []) + \
                (["--profile"] if args.profile else [])
            subprocess.run(cmd, check=True)
            results[method] = json.loads(out.read_text())
    report(args, cfg, results)


def report(args, cfg: dict, results: dict) -> None:
    peak, peak_text = peak_flops(cfg["device"])
    device = torch_device_name(cfg["device"])
    model = cfg.get("model", "random-init Qwen3-MoE" if "qwen3_moe" in cfg else "random-init Llama")
    targets = "all-linear (attention, router, experts)" if cfg.get("targets") else "7 projections"
    print(f"\nthroughput, {args.config}: {model} {cfg['dtype']}, batch "
          f"{cfg['batch']} x {cfg['seq']}, LoRA r=16 on {targets}, dropout 0"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; {device}; MFU against {peak_text}")
    ref = results.get("peft")
    print(f"{'method':<20}{'tokens/s':>10}{'vs peft':>9}{'peak GiB':>10}{'vs peft':>9}{'MFU':>8}")
    for method, r in results.items():
        mfu = r["tokens_per_second"] * r["flops_per_token"] / peak
        speed = f"{r['tokens_per_second'] / ref['tokens_per_second']:>9.2f}" if ref else f"{'':>9}"
        memory = f"{r['peak_bytes'] / ref['peak_bytes']:>9.2f}" if ref else f"{'':>9}"
        print(f"{method:<20}{r['tokens_per_second']:>10.1f}{speed}{r['peak_bytes'] / 2**30:>10.2f}{memory}{mfu:>8.1%}")
    if cfg["device"] == "cpu":
        print("peak memory on CPU = the child process's max RSS (weights, activations, optimizer, Python)")
    if "lorakit" in results and "lorakit-reference" in results:
        fast, plain = results["lorakit"]["losses"], results["lorakit-reference"]["losses"]
        print("\nloss per step, fast path vs reference (same weights, same batches):")
        for i, (a, b) in enumerate(zip(fast, plain)):
            print(f"  step {i + 1:>2}: {a:.5f}  {b:.5f}  diff {abs(a - b):.2e}")
        print(f"max |difference| {max(abs(a - b) for a, b in zip(fast, plain)):.2e}")


def torch_device_name(device: str) -> str:
    import os
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
