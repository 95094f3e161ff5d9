"""Export an adapter to where people run models: llama.cpp / Ollama GGUF files, and plain-LoRA PEFT folders
that a serving engine (vLLM, llama.cpp) accepts.

    gguf_names.py    HF module names -> llama.cpp tensor names; Llama's q/k row permutation
    adapter_delta.py each adapted layer's factors, scaling and exact weight difference
    gguf_adapter.py  the adapter as a llama.cpp LoRA GGUF (`--lora`, Ollama's ADAPTER)
    gguf_merged.py   base + adapter merged into a full GGUF (f32, f16, bf16, q8_0, q4_0 ...)
    modelfile.py     an Ollama Modelfile, the chat template translated to Go template form
    portability.py   what an engine refuses, and a plain-LoRA rewrite by truncated SVD

The module imports torch, numpy and the `gguf` package (the format's own library); it is not part of
the core (lorakit/lora/), which never imports it.
"""
