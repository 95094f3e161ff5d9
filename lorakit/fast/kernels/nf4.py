"""NF4 weights back to dense, in one kernel that writes only the output.

torchao's `NF4Tensor.get_original_weight` builds the dense weight from int64 index tensors, looked-up
halves and scaled halves, about 15 bytes of temporaries per weight value, which is what a QLoRA step's
peak pays for its largest layer. Here each output value is read off its packed byte, its NF4 level and
its block's scale directly:

    w[i] = round(nf4[code(i)] · scale[i // block]),  code(i) = high nibble of byte i//2 for even i, else low

with the scales dequantized (double quantization undone) by torchao itself, so the values are
torchao's exactly.
"""
from __future__ import annotations

import torch

from lorakit.fast.kernels.runtime import HAS_TRITON

BLOCK = 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_dequantize(packed_ptr, table_ptr, scale_ptr, out_ptr, n, block_size: tl.constexpr,
                        BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(i % 2 == 0, byte >> 4, byte & 15)
        level = tl.load(table_ptr + code, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + i // block_size, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, (level * scale).to(out_ptr.dtype.element_ty), mask=mask)


def block_scales(weight) -> torch.Tensor:
    """(blocks,) the scale of each block of a torchao NF4Tensor, in its dtype, double quantization undone:
    the factor its dequantized values are the NF4 levels times."""
    return weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)


def nf4_dequantize(weight) -> torch.Tensor:
    """The dense weight (its shape, its dtype) of a torchao NF4Tensor, equal to `get_original_weight()`."""
    scales = block_scales(weight)
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    n = out.numel()
    _nf4_dequantize[(triton.cdiv(n, BLOCK),)](weight.quantized_data, weight.nf4, scales, out, n,
                                              block_size=weight.block_size, BLOCK=BLOCK, num_warps=4)
    return out
