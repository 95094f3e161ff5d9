"""How long get_peft_model takes on a 1B-parameter Llama config (CPU), lorakit vs PEFT, same model.

The base is built on the meta device and materialised uninitialised, so what is timed is the
injection itself (finding targets, creating and initialising A and B), not the base's random init.
"""
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)


def base():
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIG)
    return model.to_empty(device="cpu")


def timed(get_peft_model, LoraConfig) -> float:
    model = base()
    start = time.perf_counter()
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    return time.perf_counter() - start


def main() -> None:
    import lorakit
    import peft

    rows = []
    for name, mod in (("lorakit", lorakit), ("peft", peft)):
        times = sorted(timed(mod.get_peft_model, mod.LoraConfig) for _ in range(3))
        rows.append((name, times[1]))
    print(f"get_peft_model, Llama 1B config (16 layers, hidden 2048), r=16 on 7 projections, median of 3:")
    for name, t in rows:
        print(f"  {name:<8} {t:6.3f} s")
    print(f"  ratio peft/lorakit: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
