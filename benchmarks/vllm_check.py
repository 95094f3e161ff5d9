"""Load an adapter exported for vLLM (`lorakit export --format peft --for vllm`) in vLLM and compare its greedy
answers with lorakit's on the demo's held-out questions. Needs a CUDA GPU and `pip install vllm`.

    python benchmarks/vllm_check.py --adapter runs/demo/export-vllm [--original runs/demo/adapter] [--questions 76]

The base model is the adapter's recorded base, as lorakit loads it (for the embedded SmolLM2: the cached,
dequantized transformers folder lorakit converts its GGUF into), so vLLM and lorakit run the same weights.
Both run greedy, 24 new tokens, in --dtype (default bfloat16). Prints the held-out accuracy of each, the share of
identical answers, and the answers that differ; writes ADAPTER/vllm_check.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def base_folder(adapter: str) -> str:
    """A transformers folder vLLM can load for the adapter's base model."""
    from lorakit.cli.commands import recorded_base_model
    from lorakit.models.gguf_cache import ensure_gguf_cache
    from lorakit.models.sources import resolve_source

    source = resolve_source(recorded_base_model(adapter, where="vllm_check"))
    return str(ensure_gguf_cache(source.location)) if source.kind == "gguf" else source.location


def lorakit_answers(adapter: str, prompts: list[str], dtype: str, max_new_tokens: int) -> list[str]:
    from lorakit.cli.commands import ModelOptions, load_with_adapters
    from lorakit.evaluate.generation import generate_texts

    model, tokenizer = load_with_adapters(ModelOptions(adapter=[adapter], device="cuda", dtype=dtype))
    return generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens)


def vllm_answers(base: str, adapter: str, prompts: list[str], dtype: str, max_new_tokens: int) -> list[str]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
    llm = LLM(model=base, enable_lora=True, max_lora_rank=max(8, rank), dtype=dtype, gpu_memory_utilization=0.3,
              max_model_len=1024, seed=0)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new_tokens),
                           lora_request=LoRARequest("exported", 1, str(Path(adapter).resolve())))
    return [o.outputs[0].text.strip() for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the folder `lorakit export --format peft --for vllm` wrote")
    parser.add_argument("--original", default=None, help="the adapter before the rewrite (e.g. a DoRA adapter)")
    parser.add_argument("--questions", type=int, default=0, help="first N held-out questions (0: all)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    from lorakit.cli.export import ExportOptions, load_for_export
    from lorakit.data import answer_is_correct, load_demo
    from lorakit.evaluate.generation import chat_prompts

    heldout = load_demo().heldout
    heldout = heldout[:args.questions] if args.questions else heldout
    _, tokenizer, _ = load_for_export(ExportOptions(adapter=args.adapter).validate())
    prompts = chat_prompts(tokenizer, [q["question"] for q in heldout])
    runs = {"lorakit (rewritten)": lorakit_answers(args.adapter, prompts, args.dtype, args.max_new_tokens)}
    if args.original:
        runs["lorakit (original)"] = lorakit_answers(args.original, prompts, args.dtype, args.max_new_tokens)
    runs["vLLM (rewritten)"] = vllm_answers(base_folder(args.adapter), args.adapter, prompts, args.dtype,
                                            args.max_new_tokens)
    reference = runs["lorakit (rewritten)"]
    facts = {}
    for label, answers in runs.items():
        correct = sum(answer_is_correct(a, q["keys"]) for a, q in zip(answers, heldout))
        same = sum(a == b for a, b in zip(answers, reference))
        facts[label] = {"heldout_correct": correct, "identical_to_lorakit_rewritten": same, "answers": answers}
        print(f"{label:<24} held-out {correct}/{len(heldout)}   identical answers to lorakit (rewritten): "
              f"{same}/{len(heldout)}")
    for q, a, b in zip(heldout, reference, runs["vLLM (rewritten)"]):
        if a != b:
            print(f"  differs: {q['question']!r}\n    lorakit: {a!r}\n    vLLM:    {b!r}")
    (Path(args.adapter) / "vllm_check.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
