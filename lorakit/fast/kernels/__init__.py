"""Triton kernels for the element-wise parts of a decoder layer, with the plain PyTorch they replace.

Each op is an autograd function whose forward and backward are one Triton kernel each (where the
plain version launches five to ten kernels and keeps fp32 copies for the backward):

    rms_norm(x, w, eps)        w · round(x / rms(x))          (frozen w: LoRA trains no norm)
    silu_mul(gate, up)         round(silu(gate)) · up         (the SwiGLU MLP's middle)
    rotary(q, k, cos, sin)     q·cos + rotate_half(q)·sin, the same for k
    cross_entropy_grad_(logits, targets)  per-row loss, and the logits overwritten by their gradient

`use_fast_kernels(model)` swaps them into a transformers Llama-family model (Llama, Mistral, Qwen2,
Qwen3), and lorakit's chunked cross-entropy uses the last: they run on CUDA tensors when Triton is
installed. Elsewhere (CPU, or no Triton) norms and rotary take the same equations in torch ops
(`rms_norm_torch`, `rotary_torch`) and every other call runs the plain code unchanged.
The tests run the kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1) against the plain
code, and on a GPU when there is one.
"""
from lorakit.fast.kernels.patch import use_fast_kernels
from lorakit.fast.kernels.runtime import triton_runs

__all__ = ["use_fast_kernels", "triton_runs"]
