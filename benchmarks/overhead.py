"""Host-side cost of a LoRA training step: CPU milliseconds per step of a Llama with the 1B config's
structure (16 layers, grouped-query attention, 7 LoRA projections per layer) at a tiny width.

At this width every kernel is tiny, so what is timed is Python, dispatch and autograd: the work the host
does to issue a step. On a GPU that work overlaps the kernels; where the kernels are short (the 1B
config's forward on an H100) the GPU waits for it. This is the part of a GPU step a CPU-only machine
can measure.

    python benchmarks/overhead.py    # lorakit, lorakit without the q/k/v and gate/up groups, PEFT, no LoRA
    python benchmarks/overhead.py --rounds 9

Each method trains LoRA r=16 on q,k,v,o,gate,up,down with AdamW (foreach) on the same random batch, as
benchmarks/throughput.py prepares it; "no-lora" is the floor: the same model with no adapter (only the
embedding trains, so the backward runs through every layer). One thread; the methods take turns within
each round, and the median over rounds is printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import prepare  # noqa: E402  (puts the repository on sys.path too)

STRUCTURE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=16, num_attention_heads=4,
                 num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True)  # the 1B's layers and GQA ratio
METHODS = ["lorakit", "lorakit-ungrouped", "peft", "no-lora"]


def build(method: str):
    """(forward, step) closures for one method: the training forward to the loss, and a whole step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**STRUCTURE, attn_implementation="sdpa"))
    if method == "no-lora":  # the floor: the same model with no adapter, only the embedding trains
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        loss_fn = lambda m, b: m(**b).loss  # noqa: E731
    else:
        model, loss_fn = prepare("lorakit" if method.startswith("lorakit") else method, model, False)
    if method == "lorakit-ungrouped":  # every LoRA projection its own fused node: the class's own forwards
        from lorakit.fast.kernels import patch

        for module in model.modules():
            if type(module).__name__ in patch.ATTENTIONS | patch.MLPS:
                module.__dict__.pop("forward", None)
    model.train()
    ids = torch.randint(0, STRUCTURE["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)

    def forward():
        loss_fn(model, batch)

    def step():
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward, step


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10, help="steps timed together in a round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {method: build(method) for method in METHODS}
    times = {m: {"forward": [], "step": []} for m in METHODS}
    for fn in (f for m in METHODS for f in runs[m]):
        fn()  # warm-up
    for _ in range(args.rounds):
        for method in METHODS:
            forward, step = runs[method]
            times[method]["forward"].append(timed(forward, args.repeats))
            times[method]["step"].append(timed(step, args.repeats))
    print(f"host time per training step, Llama with the 1B config's structure at width {STRUCTURE['hidden_size']}, "
          f"batch 2 x 32, LoRA r=16 on 7 projections; 1 thread, median of {args.rounds} rounds x {args.repeats}")
    print(f"{'method':<20}{'forward ms':>12}{'step ms':>10}{'step vs peft':>14}")
    peft_step = statistics.median(times["peft"]["step"])
    for method in METHODS:
        fwd, step = (statistics.median(times[method][k]) for k in ("forward", "step"))
        print(f"{method:<20}{fwd:>12.2f}{step:>10.2f}{peft_step / step:>13.2f}x")


if __name__ == "__main__":
    main()
