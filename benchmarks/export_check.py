"""Held-out accuracy of an exported adapter in llama.cpp against lorakit, and the export times.

    PYTHONPATH=... python benchmarks/export_check.py --adapter runs/demo/adapter --out runs/demo/gguf

Exports the adapter (`lorakit export --format gguf`: adapter.gguf, merged f16 and q8_0, Modelfile), then answers
the demo's held-out handbook questions greedily (24 new tokens, as `lorakit train` scores them) with:
    lorakit     the PyTorch model: the embedded Q4_1 weights dequantized to fp32, + the adapter
    llama.cpp   the Q4_1 base file + adapter.gguf; an f16 base GGUF of lorakit's own (dequantized) weights +
                adapter.gguf (the adapter alone, as tests/test_export_gguf.py checks it); merged f16; merged q8_0
and prints the accuracy of each and the answer to "What is the guest Wi-Fi called?". Needs the export-test
extra (llama-cpp-python). Writes OUT/export_check.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

WIFI = "What is the guest Wi-Fi called?"


def llama_answers(model_path: str, lora: str | None, tokenizer, prompts: list[str], max_new_tokens: int,
                  threads: int) -> list[str]:
    """Greedy answers from llama.cpp, fed lorakit's own token ids (so tokenization is not what is compared)."""
    from llama_cpp import Llama

    from lorakit.export.engine_check import llama_answers as answers_of

    llm = Llama(model_path=model_path, lora_path=lora, n_ctx=512, n_threads=threads, logits_all=True, verbose=False)
    try:
        return answers_of(llm, tokenizer, prompts, max_new_tokens)
    finally:
        llm.close()


def _same_weights_base(base_name: str, path: Path) -> str:
    """The base as lorakit holds it (the Q4_1 file dequantized) written as an f16 GGUF: llama.cpp then runs the
    numbers lorakit runs, without its 8-bit rounding of activations for Q4_1 products."""
    from lorakit.export.gguf_merged import source_gguf, write_merged_gguf
    from lorakit.models import load_model

    base = load_model(base_name, task="causal-lm", device="cpu", dtype="float32").model
    write_merged_gguf(base, path, source_gguf(base_name), "f16")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="runs/demo/adapter")
    parser.add_argument("--out", default=None, help="default: gguf/ beside the adapter folder")
    parser.add_argument("--quant", default="f16,q8_0")
    parser.add_argument("--questions", type=int, default=0, help="first N held-out questions (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from lorakit.cli.export import ExportOptions, export_gguf
    from lorakit.data import answer_is_correct, load_demo
    from lorakit.evaluate.generation import chat_prompts, generate_texts

    out = Path(args.out or Path(args.adapter).resolve().parent / "gguf")
    facts = export_gguf(ExportOptions(adapter=args.adapter, out=str(out), quant=args.quant).validate())
    heldout = load_demo().heldout
    heldout = heldout[:args.questions] if args.questions else heldout
    questions = [q["question"] for q in heldout] + [WIFI]

    from lorakit.cli.export import load_for_export

    model, tokenizer, base_name = load_for_export(ExportOptions(adapter=args.adapter).validate())
    same_weights = _same_weights_base(base_name, out / "base-f16.gguf")
    prompts = chat_prompts(tokenizer, questions)
    runs: dict[str, dict] = {}
    start = time.perf_counter()
    runs["lorakit (PyTorch, Q4_1 dequantized + adapter)"] = {
        "answers": generate_texts(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)}
    runs["lorakit (PyTorch, Q4_1 dequantized + adapter)"]["seconds"] = time.perf_counter() - start
    engines = {"llama.cpp (Q4_1 base + adapter.gguf)": (facts["base_gguf"], facts["lora_gguf"].get("path")),
               "llama.cpp (f16 of the same weights + adapter.gguf)": (same_weights, facts["lora_gguf"].get("path"))}
    for item in facts["merged"]:
        engines[f"llama.cpp (merged {item['quant']})"] = (item["path"], None)
    for label, (path, lora) in engines.items():
        start = time.perf_counter()
        runs[label] = {"answers": llama_answers(path, lora, tokenizer, prompts, args.max_new_tokens, args.threads),
                       "seconds": time.perf_counter() - start}
    reference = runs["lorakit (PyTorch, Q4_1 dequantized + adapter)"]["answers"]
    print(f"\nheld-out handbook accuracy ({len(heldout)} questions, greedy, {args.max_new_tokens} new tokens):")
    for label, run in runs.items():
        correct = [answer_is_correct(a, q["keys"]) for a, q in zip(run["answers"], heldout)]
        run["heldout_correct"] = sum(correct)
        run["heldout_accuracy"] = sum(correct) / len(heldout)
        run["same_answer_as_lorakit"] = sum(a == b for a, b in zip(run["answers"][:-1], reference[:-1]))
        print(f"  {label:<48} {run['heldout_correct']:>3}/{len(heldout)} = {run['heldout_accuracy']:.3f}   "
              f"identical answers to lorakit: {run['same_answer_as_lorakit']}/{len(heldout)}   ({run['seconds']:.0f} s)")
    print(f"\n{WIFI}")
    for label, run in runs.items():
        print(f"  {label:<48} {run['answers'][-1]!r}")
    print("\nexport times (s):", json.dumps(facts["seconds"]))
    result = {"export": facts, "runs": runs, "questions": questions}
    (out / "export_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
