"""Serving throughput on smollm2-135m: many adapters in mixed batches vs one merged model vs one request at
a time with adapter switching, then a load test against a real uvicorn server on loopback.

    python benchmarks/serving.py            # a few minutes on CPU (the first run also dequantizes the GGUF)

Every adapter is random and non-zero (rank 8 on q, k, v, o, gate, up, down), so each really costs its
matmuls. Tokens/s counts generated tokens over wall time, prompts' prefill included.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.serve.engine import Engine, SamplingParams  # noqa: E402

MODEL = os.environ.get("LORAKIT_BENCH_MODEL", "smollm2-135m")
ADAPTERS = 16
REQUESTS = 16  # in flight together (one batch)
NEW_TOKENS = 32
ROUNDS = 2  # interleaved measurement rounds of the batched configurations
SEQUENTIAL = 8  # requests in the one-at-a-time baseline
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What is the capital of France?", "Give me three tips for sleeping well.",
             "Explain photosynthesis in one sentence.", "Write a haiku about the sea.",
             "What does a lawyer do?", "How do vaccines work?", "Name a prime number above 50.",
             "Summarise the plot of Hamlet."]


def many_adapters(model, count: int):
    """`count` random non-zero adapters a0..a{count-1} on the model, frozen for inference."""
    torch.manual_seed(0)
    peft = None
    for i in range(count):
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        if peft is None:
            peft = get_peft_model(model, config, adapter_name=f"a{i}")
        else:
            peft.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            p.requires_grad_(False)
            if "lora_B" in name:
                p.mul_(0.05)  # keep the text sensible: small updates, still non-zero
    return peft.eval()


def prompts(tokenizer, n: int) -> list[list[int]]:
    """Short raw prompts (about 10 tokens), so decoding, where adapters cost most, dominates the time."""
    return [tokenizer(QUESTIONS[i % len(QUESTIONS)])["input_ids"] for i in range(n)]


def batch_tokens_per_s(engine: Engine, ids: list[list[int]], adapters: list[str]) -> float:
    """Submit every request at once; generated tokens / wall seconds."""
    results: list = [None] * len(ids)

    def run(i: int) -> None:
        results[i] = engine.generate(ids[i], adapters[i], SamplingParams(max_tokens=NEW_TOKENS))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ids))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(len(tokens) for tokens, _ in results) / (time.perf_counter() - start)


@torch.no_grad()
def sequential_tokens_per_s(model, tokenizer, ids: list[list[int]], adapters: list[str]) -> float:
    """The classic way: one request at a time, set_adapter before each, transformers' generate."""
    start, produced = time.perf_counter(), 0
    for prompt, name in zip(ids, adapters):
        model.set_adapter(name)
        x = torch.tensor([prompt])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        produced += out.shape[1] - x.shape[1]
    return produced / (time.perf_counter() - start)


def merged_model(adapter_model):
    """A plain model with adapter a0 folded into its weights (what a single-adapter deployment runs)."""
    loaded = load_model(MODEL, device="cpu")
    base = loaded.model.eval()
    with torch.no_grad():
        from lorakit.lora.inject import lora_layers

        for name, layer in lora_layers(adapter_model.get_base_model()):
            target = base.get_submodule(name)
            target.weight.add_(layer.delta_weight("a0").to(target.weight.dtype))
    return base


def load_test(app, total: int = 200, concurrency: int = 16, max_tokens: int = 8) -> dict:
    """`total` requests (mixed adapters, some streamed) at `concurrency` against a real uvicorn server."""
    import httpx

    from lorakit.serve.server import serve_in_background

    def one(i: int):
        body = {"model": f"a{i % ADAPTERS}" if i % 4 else "base", "prompt": QUESTIONS[i % len(QUESTIONS)],
                "max_tokens": max_tokens, "temperature": 0, "stream": i % 5 == 0}
        t0 = time.perf_counter()
        try:
            r = http.post("/v1/completions", json=body)
            ok = r.status_code == 200 and ("[DONE]" in r.text if body["stream"] else '"choices"' in r.text)
            return ("ok" if ok else f"HTTP {r.status_code}"), time.perf_counter() - t0
        except httpx.HTTPError as e:
            return f"{type(e).__name__}", time.perf_counter() - t0

    with serve_in_background(app) as url, httpx.Client(base_url=url, timeout=300) as http:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(total)))
        elapsed = time.perf_counter() - start
    latencies = sorted(t for _, t in results)
    errors = [s for s, _ in results if s != "ok"]
    return {"requests": total, "answered": len(results), "errors": len(errors), "lost": total - len(results),
            "seconds": elapsed, "p50": latencies[len(latencies) // 2], "p95": latencies[int(len(latencies) * 0.95)],
            "kinds": sorted(set(errors))}


def throughput_table(model, tok) -> dict[str, float]:
    """tokens/s of each configuration; the batched ones are measured in interleaved rounds (best of
    ROUNDS), so a change in machine load does not favour whichever ran last."""
    ids = prompts(tok, REQUESTS)
    lora = Engine(model, tok, max_batch=REQUESTS, eos_token_ids=[]).start()
    merged = Engine(merged_model(model), tok, max_batch=REQUESTS, eos_token_ids=[]).start()
    configs = {f"mixed batch, {k} adapter{'s' if k > 1 else ''}": (lora, [f"a{i % k}" for i in range(REQUESTS)])
               for k in (1, 4, 16)}
    configs["one merged model (no LoRA)"] = (merged, ["__base__"] * REQUESTS)
    for engine, names in configs.values():
        engine.generate(ids[0], names[0], SamplingParams(max_tokens=2))  # warm-up: builds the adapter stacks
    rows = {name: 0.0 for name in configs}
    for round_ in range(ROUNDS):
        for name, (engine, names) in configs.items():
            rows[name] = max(rows[name], batch_tokens_per_s(engine, ids, names))
        print(f"round {round_ + 1}/{ROUNDS}: " + ", ".join(f"{v:.1f}" for v in rows.values()), flush=True)
    lora.stop()
    merged.stop()
    rows["one at a time, set_adapter + generate"] = sequential_tokens_per_s(
        model, tok, ids[:SEQUENTIAL], [f"a{i % ADAPTERS}" for i in range(SEQUENTIAL)])
    return rows


def main() -> None:
    # One thread by default: the numbers stay comparable on a shared machine (set LORAKIT_BENCH_THREADS).
    torch.set_num_threads(int(os.environ.get("LORAKIT_BENCH_THREADS", "1")))
    print(f"model {MODEL}, {ADAPTERS} random rank-8 adapters, {REQUESTS} requests x {NEW_TOKENS} new tokens, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    loaded = load_model(MODEL, device="cpu")
    tok = loaded.tokenizer
    model = many_adapters(loaded.model, ADAPTERS)
    rows = throughput_table(model, tok)
    reference = rows["one merged model (no LoRA)"]
    print(f"\n{'configuration':<40} {'tokens/s':>9} {'vs merged':>10}")
    for name, value in rows.items():
        print(f"{name:<40} {value:>9.1f} {value / reference:>9.2f}x")
    ratio = rows["mixed batch, 16 adapters"] / reference
    print(f"\n16 adapters in mixed batches reach {ratio:.0%} of the merged model's tokens/s (target >= 70%)")

    from lorakit.serve.app import create_app
    from lorakit.serve.adapters import AdapterRegistry
    from lorakit.serve.protocol import Limits

    engine = Engine(model, tok, max_batch=16)
    registry = AdapterRegistry(engine, {MODEL})
    for i in range(ADAPTERS):
        registry.adopt(f"a{i}")
    result = load_test(create_app(engine, registry, Limits(max_tokens=64), MODEL))
    print(f"\nload test: {result['requests']} requests at concurrency 16 (max_tokens 8, mixed adapters, 1 in 5 "
          f"streamed): {result['errors']} errors, {result['lost']} lost, {result['seconds']:.1f} s, "
          f"{result['requests'] / result['seconds']:.1f} req/s, latency p50 {result['p50']:.2f} s, "
          f"p95 {result['p95']:.2f} s {result['kinds'] or ''}")
    if result["errors"] or result["lost"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
