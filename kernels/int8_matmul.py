"""Triton kernels of the int8 matmul family: per-row int8 quantization, the int8 GEMM with its
fused dequant + bias + activation epilogue, and the weight-only (int8 weights, float x) GEMM.
Semantics: recsys_kernels/ops/int8_matmul.py (the reference); registered as the `triton`
backend in recsys_kernels/ops/int8_matmul_triton.py.

Bit-exactness of the quantization: the reference divides in fp32 with IEEE rounding and rounds
half to even. `/` in Triton may compile to an approximate division on a GPU, so the kernel uses
tl.div_rn; rounding to an integer uses the 1.5 * 2^23 trick (one fp32 add rounds to nearest
even), which needs no libdevice call and so runs the same under TRITON_INTERPRET=1.

The int8 GEMM: a [M, K] @ b [N, K].T with tl.dot on int8 tiles into an int32 accumulator. No
int8 dot product of K <= 131071 terms can leave int32 (|a * b| <= 2^14), so that path has no
check at all. For larger K (BIG_K) the int32 accumulator is flushed into an int64 one every
CHUNK_K elements; without scales every program that sees a value outside int32 writes 1 to a
one-int flag, which the caller reads once and turns into the reference's ValueError.

No value checks here (a kernel cannot raise): the caller checks finiteness before the launch.
Rows of M and N past the end are read modulo M / N (valid memory, results dropped at the store),
so only K needs load masks; all row offsets are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .rounding import interpreted, to_dtype_rne  # noqa: F401 - interpreted: for the wrappers

INT32_SAFE_K = 131071  # the largest K at which no int8 dot product can leave int32
CHUNK_K = tl.constexpr(65536)  # terms per int32 partial sum when K > INT32_SAFE_K (a power of two >= any BLOCK_K)
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _round_half_even(v):
    """v rounded to an integer, ties to even, for |v| <= 2^22: v + 1.5 * 2^23 lies in [2^23, 2^24)
    where the fp32 ulp is 1, so the add itself rounds (IEEE default mode); the subtraction is
    exact. (No fast-math reassociation in Triton: the pair survives into the SASS, checked.)"""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize(x, scale):
    """int8 codes of the fp32 tile x [BLOCK_M, BLOCK_K] with per-row scales [BLOCK_M]."""
    v = tl.div_rn(x, scale[:, None])  # |v| <= ~127 (+ rounding), so the rounding trick holds
    r = _round_half_even(v)
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    return r.to(tl.int8)


@triton.jit
def _activation(y, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.where(y < 0.0, 0.0, y)  # relu; NaN stays NaN as in torch.relu
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))  # exact (erf) gelu
    elif ACT == 3:
        y = y * tl.sigmoid(y)  # silu
    return y


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program `pid`, walking GROUP_M tile rows column by column so
    that programs running together share both their a rows and their b rows in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    rows_here = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % rows_here
    pid_n = (pid % in_group) // rows_here
    return pid_m, pid_n


@triton.jit
def _int8_dot(a_rows, b_cols, k_start, k_end,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The exact int32 sum over k in [k_start, k_end) of a[m, k] * b[n, k] for a tile; the caller
    keeps k_end - k_start <= INT32_SAFE_K. a_rows [BLOCK_M, 1] and b_cols [1, BLOCK_N] point at
    the start of each row of a and b."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + rk
        in_k = ks < k_end
        a = tl.load(a_rows + ks[None, :], mask=in_k[None, :], other=0)
        b = tl.load(b_cols + ks[:, None], mask=in_k[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # explicit: Triton < 3.8 defaults to float32
    return acc


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _quantize_rows_kernel(
    X, Q, SCALE,
    TOKEN,  # unused: the output of the caller's value checks, so that a compiler keeps them
    M, K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,  # K <= BLOCK_K: the rows stay in registers between absmax and codes
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = rows < M
    row_off = rows.to(tl.int64) * K
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = in_m[:, None] & (cols < K)[None, :]
        x = tl.load(X + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
    else:
        absmax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + cols
            mask = in_m[:, None] & (ks < K)[None, :]
            x = tl.load(X + row_off[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    scale = tl.div_rn(absmax, tl.full([BLOCK_M], 127.0, tl.float32))
    scale = tl.where(scale == 0.0, 1.0, scale)  # an all-zero row, or absmax / 127 underflowed
    tl.store(SCALE + rows, scale, mask=in_m)
    if ONE_PASS:
        tl.store(Q + row_off[:, None] + cols[None, :], _quantize(x, scale), mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + cols
            mask = in_m[:, None] & (ks < K)[None, :]
            x = tl.load(X + row_off[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(Q + row_off[:, None] + ks[None, :], _quantize(x, scale), mask=mask)


@triton.jit
def _int8_gemm_kernel(
    A, B, C,  # a [M, K] int8, b [N, K] int8, c [M, N] int32 (no scales) or float
    A_SCALE, B_SCALE, BIAS,  # fp32 [M], [N], [N]; unread unless HAS_SCALES / HAS_BIAS
    OVERFLOW,  # int32 [1]: set to 1 when an int32 result does not fit (BIG_K without scales)
    TOKEN,  # unused: the output of the caller's value checks, so that a compiler keeps them
    M, N, K,
    m_bucket,  # unused: next_power_of_2(M), the autotuning key (one tuning per size class of M)
    HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BIG_K: tl.constexpr,
    BF16_RNE_BY_HAND: tl.constexpr,  # under the interpreter only (see kernels/rounding.py)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_in = rm % M  # rows past the end read a valid row; dropped at the store
    rn_in = rn % N
    a_rows = A + (rm_in.to(tl.int64) * K)[:, None]
    b_cols = B + (rn_in.to(tl.int64) * K)[None, :]

    if BIG_K:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int64)
        for c0 in range(0, K, CHUNK_K):
            acc += _int8_dot(a_rows, b_cols, c0, tl.minimum(c0 + CHUNK_K, K),
                             BLOCK_M, BLOCK_N, BLOCK_K).to(tl.int64)
    else:
        acc = _int8_dot(a_rows, b_cols, 0, K, BLOCK_M, BLOCK_N, BLOCK_K)

    if HAS_SCALES:
        # the reference's order: (acc * a_scale[m]) * b_scale[n] + bias[n], activation, cast.
        # The int -> fp32 conversion rounds to nearest like the reference's fp64 -> fp32 one.
        y = acc.to(tl.float32)
        y = y * tl.load(A_SCALE + rm_in)[:, None]
        y = y * tl.load(B_SCALE + rn_in)[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + rn_in)[None, :]
        out = to_dtype_rne(_activation(y, ACT), C.dtype.element_ty, BF16_RNE_BY_HAND)
    else:
        if BIG_K:
            outside = ((acc > 2147483647) | (acc < -2147483648)).to(tl.int32)
            any_outside = tl.max(tl.max(outside, axis=1), axis=0)  # wrapped rows repeat valid ones
            tl.store(OVERFLOW, any_outside, mask=any_outside > 0)
        out = acc.to(tl.int32)
    c_mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(C + (rm.to(tl.int64) * N)[:, None] + rn[None, :], out, mask=c_mask)


@triton.jit
def _weight_only_kernel(
    X, W, C,  # x [M, K] fp32/fp16/bf16, w [N, K] int8, c [M, N] float
    W_SCALE, BIAS,  # fp32 [N], [N]; BIAS unread unless HAS_BIAS
    TOKEN,  # unused: the output of the caller's value checks, so that a compiler keeps them
    M, N, K,
    m_bucket,  # unused: the autotuning key, as in _int8_gemm_kernel
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 x, or the interpreter (whose dot cannot multiply bf16)
    BF16_RNE_BY_HAND: tl.constexpr,  # under the interpreter only (see kernels/rounding.py)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = (x @ w.T) * w_scale[n] + bias[n], activation: the int8 weights are converted in
    registers (exactly: |q| <= 128 fits fp16 / bf16) and the scale is applied once per output.
    DOT_FP32: an IEEE fp32 dot (no TF32) of x in fp32; else (fp16 / bf16 x on a GPU) a tensor-core
    dot in x's dtype, whose products are exact in the fp32 accumulator."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_in = rm % M
    rn_in = rn % N
    x_rows = X + (rm_in.to(tl.int64) * K)[:, None]
    w_cols = W + (rn_in.to(tl.int64) * K)[None, :]
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        in_k = ks < K
        x = tl.load(x_rows + ks[None, :], mask=in_k[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=in_k[:, None], other=0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(X.dtype.element_ty), acc)
    y = acc * tl.load(W_SCALE + rn_in)[None, :]
    if HAS_BIAS:
        y = y + tl.load(BIAS + rn_in)[None, :]
    out = to_dtype_rne(_activation(y, ACT), C.dtype.element_ty, BF16_RNE_BY_HAND)
    c_mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(C + (rm.to(tl.int64) * N)[:, None] + rn[None, :], out, mask=c_mask)


# ----------------------------------------------------------------------------- launch helpers
def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def quantize_config(k: int, on_gpu: bool) -> dict:
    """BLOCK_M, BLOCK_K, ONE_PASS, num_warps of the quantize kernel for rows of length k."""
    if on_gpu:
        block_k = min(triton.next_power_of_2(max(k, 1)), 4096)
        block_m = max(1, min(16, 2048 // block_k))  # ~2K+ elements per program
        num_warps = 8 if block_k >= 2048 else 4
    else:  # the interpreter: few, big steps are what is cheap
        block_k = min(triton.next_power_of_2(max(k, 1)), 8192)
        block_m, num_warps = max(1, min(64, 8192 // block_k)), 1
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=k <= block_k, num_warps=num_warps)


def quantize_grid(m: int, block_m: int) -> tuple:
    return (triton.cdiv(m, block_m),)


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# Ampere (mma.s8 m16n8k32) and Hopper (wgmma s8, 64-row warpgroup tiles): int8 tiles want
# BLOCK_K >= 64; shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K bytes, <= 147 KB at 3
# stages for the largest, inside an A100's 164 KB. Configs that do not fit are skipped by the
# autotuner (OutOfResources).
_GEMM_CONFIGS = [
    _cfg(128, 256, 128, 8, 3), _cfg(256, 128, 128, 8, 3), _cfg(128, 128, 128, 8, 4),
    _cfg(128, 128, 64, 4, 4), _cfg(128, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 4),
    _cfg(64, 64, 128, 4, 5), _cfg(64, 64, 256, 4, 3),
    _cfg(32, 64, 256, 4, 4), _cfg(16, 64, 256, 4, 4), _cfg(16, 128, 128, 4, 4),
]
# weight-only: small M, bandwidth-bound on the int8 weights
_WEIGHT_ONLY_CONFIGS = [
    _cfg(16, 32, 256, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 64, 256, 4, 3), _cfg(16, 128, 128, 4, 4),
    _cfg(32, 64, 128, 4, 4), _cfg(32, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 3),
    _cfg(128, 128, 32, 8, 3),
]


def _prune(configs, named_args, **kwargs):
    """Drop tiles far taller than M (M = 1..16 would compute mostly padding) and, for BIG_K,
    tiles whose extra int64 accumulator would spill."""
    bucket = named_args.get("m_bucket", kwargs.get("m_bucket", 4096))
    big_k = kwargs.get("BIG_K", named_args.get("BIG_K", False))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, 2 * bucket)
            and (not big_k or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128)]
    return kept or configs[-1:]


_KEY = ["m_bucket", "N", "K"]
int8_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=_KEY + ["HAS_SCALES"],
                                  prune_configs_by={"early_config_prune": _prune})(_int8_gemm_kernel)
weight_only_tuned = triton.autotune(_WEIGHT_ONLY_CONFIGS, key=_KEY,
                                    prune_configs_by={"early_config_prune": _prune})(_weight_only_kernel)


def interpreter_gemm_config(m: int, n: int, k: int) -> dict:
    """The fixed block config under TRITON_INTERPRET=1 (no autotuning on a CPU): small problems
    in one program, K in few steps (numpy's integer matmul is not BLAS: no tile taller than
    needed). BLOCK_K divides CHUNK_K; tl.dot needs 16 rows at least."""
    return dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=16 if n <= 16 else 32,
                BLOCK_K=min(max(triton.next_power_of_2(max(k, 1)), 32), 8192), GROUP_M=8, num_warps=1)


def gemm_grid(m: int, n: int):
    """The launch grid, a function of the config the autotuner picks."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
