"""What the Triton kernels share: roundings that match the reference's on a GPU too, and whether
they run compiled on a GPU or under the interpreter."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_dtype_rne(y, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """y in `dtype`, rounded to nearest even. Triton's interpreter truncates fp32 -> bf16 (a GPU
    rounds), so with BF16_BY_HAND an fp32 y goes to bf16 on its bits: the same result as a GPU's
    cast, on both."""
    if y.dtype == tl.float64 and (dtype == tl.float16 or dtype == tl.bfloat16):
        # torch's fp64 -> fp16 / bf16 goes through fp32 (two roundings; a GPU's cvt.rn.f16.f64
        # rounds once), and the interpreter's fp64 -> bf16 cast returned garbage
        y = y.to(tl.float32)
    if BF16_BY_HAND and dtype == tl.bfloat16 and y.dtype == tl.float32:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN stays a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(dtype)


@triton.jit
def mul_rn(a, b, GPU_RN: tl.constexpr):
    """a * b rounded on its own, as the reference computes it. Triton lets the compiler contract a
    product and a following add into one fma (one rounding: other bits than the reference's), so
    on a GPU (GPU_RN) the product is an inline `mul.rn`, which is never contracted."""
    if GPU_RN:
        a, b = tl.broadcast(a, b)
        if a.dtype.is_fp64():
            product = tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                                is_pure=True, pack=1)
        else:
            product = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                                is_pure=True, pack=1)
    else:
        product = a * b
    return product


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (a jitted function is an InterpretedFunction, not a JITFunction)."""
    return not isinstance(to_dtype_rne, triton.runtime.JITFunction)


def compiled_on_gpu(t) -> bool:
    """Whether kernels on `t`'s device run compiled on a GPU (not interpreted on CPU tensors): the
    GPU launch configs, and GPU_RN (mul_rn)."""
    return t.is_cuda and not interpreted()
