"""A Triton helper the kernels share: fp32 -> the output dtype, rounded to nearest even."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_dtype_rne(y, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """y in `dtype`, rounded to nearest even. Triton's interpreter truncates fp32 -> bf16 (a GPU
    rounds), so with BF16_BY_HAND an fp32 y goes to bf16 on its bits: the same result as a GPU's
    cast, on both."""
    if BF16_BY_HAND and dtype == tl.bfloat16 and y.dtype == tl.float32:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN stays a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(dtype)
