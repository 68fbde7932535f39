"""Triton kernel of embedding_bag_grouped: F embedding-bag lookups, each with its own table (fp32,
fp16, bf16, or int8/int4 fused row-wise uint8), index dtype, mode and padding row, in one launch.

The lookups differ in types and sizes, so nothing about them can be a constexpr or a typed
kernel argument. Instead each lookup is one row of an int64 table META (fields below) holding
the raw addresses of its tensors and its sizes and codes; the kernel turns an address into a
typed pointer with `.to(tl.pointer_type(...))` and branches on the codes at run time (uniform
within a program, so no divergence). The work is cut into "tasks" of BLOCK_D columns of one
lookup (TASKS [T, 2]: lookup, first column); the grid is (bag, task), so a wide table gets
several tasks and every program has the same tile shape. Column blocks of the tasks past
grid axis 1's limit are walked by a loop.

Per task and bag the walk is kernels/embedding_bag.py's: BLOCK_L indices at a time, rows and a
keep mask from the bounds policy and padding row, a [BLOCK_L, BLOCK_D] tile dequantized in
registers, folded by sum (times the per-sample weights) or max into an fp32 accumulator; mean
divides by the kept count; an empty bag gives 0. No value checks here (the caller makes them
before the launch); out-of-range rows are never read. Row addresses are int64.
Semantics: recsys_kernels/ops/embedding_grouped.py (the reference).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .embedding_bag import _int4_rows, _int8_rows
from .rounding import compiled_on_gpu, interpreted, mul_rn, to_dtype_rne  # noqa: F401 - for the wrappers too

# fields of a META row
F_WEIGHT, F_INDICES, F_OFFSETS, F_PSW, F_ROWS, F_ROW_STRIDE, F_DIM, F_FORMAT, F_INDEX64, F_MODE, F_PAD, \
    F_OUT_COL, F_HAS_PSW = range(13)
N_FIELDS = 16  # padded: a row is 128 bytes
FORMAT_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 3, "int4": 4}
MODE_CODES = {"sum": 0, "mean": 1, "max": 2}
BOUNDS_CODES = {"raise": 0, "zero": 1, "clamp": 2}  # raise: checked by the caller, masked like zero here
MAX_GRID_Y = 65535


@triton.jit
def _load_index(addr, pos, pmask, index64):
    """int64 values of an int32 or int64 index / offset array at `pos`."""
    if index64 != 0:
        v = tl.load(addr.to(tl.pointer_type(tl.int64)) + pos, mask=pmask, other=0)
    else:
        v = tl.load(addr.to(tl.pointer_type(tl.int32)) + pos, mask=pmask, other=0).to(tl.int64)
    return v


@triton.jit
def _load_offset(addr, i, index64):
    """offsets[i] (int32 or int64) as int64."""
    if index64 != 0:
        v = tl.load(addr.to(tl.pointer_type(tl.int64)) + i)
    else:
        v = tl.load(addr.to(tl.pointer_type(tl.int32)) + i).to(tl.int64)
    return v


@triton.jit
def _float_rows(W, row, row_stride, cols, m2):
    """fp32 [BLOCK_L, BLOCK_D] tile of a float table (W: a typed pointer)."""
    base = W + row * row_stride
    return tl.load(base[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)


@triton.jit
def _load_rows(w_addr, fmt, row, row_stride, dim, cols, keep, m2, GPU_RN: tl.constexpr, BLOCK_L: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """The [BLOCK_L, BLOCK_D] tile of rows `row`, columns `cols`, in fp32; 0 where ~m2. The table's
    address becomes a pointer of its format's element type."""
    vals = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    if fmt == 0:
        vals = _float_rows(w_addr.to(tl.pointer_type(tl.float32)), row, row_stride, cols, m2)
    elif fmt == 1:
        vals = _float_rows(w_addr.to(tl.pointer_type(tl.float16)), row, row_stride, cols, m2)
    elif fmt == 2:
        vals = _float_rows(w_addr.to(tl.pointer_type(tl.bfloat16)), row, row_stride, cols, m2)
    elif fmt == 3:
        vals = _int8_rows(w_addr.to(tl.pointer_type(tl.uint8)), row, row_stride, dim, cols, keep, m2, GPU_RN, 1)
    else:
        vals = _int4_rows(w_addr.to(tl.pointer_type(tl.uint8)), row, row_stride, dim, cols, keep, m2, GPU_RN, 1)
    return vals


@triton.jit
def _embedding_bag_grouped_fwd_kernel(
    META, TASKS, OUT,
    n_tasks, out_stride,
    NF: tl.constexpr,  # int64 fields per META row
    BOUNDS: tl.constexpr,
    GPU_RN: tl.constexpr,  # on a GPU: products rounded on their own (rounding.mul_rn)
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_L)
    for task in range(tl.program_id(1), n_tasks, tl.num_programs(1)):
        lookup = tl.load(TASKS + 2 * task).to(tl.int64)
        col0 = tl.load(TASKS + 2 * task + 1).to(tl.int64)
        meta = META + lookup * NF
        w_addr = tl.load(meta + 0)
        idx_addr = tl.load(meta + 1)
        off_addr = tl.load(meta + 2)
        psw_addr = tl.load(meta + 3)
        n_rows = tl.load(meta + 4)
        row_stride = tl.load(meta + 5)
        dim = tl.load(meta + 6)
        fmt = tl.load(meta + 7)
        index64 = tl.load(meta + 8)
        mode = tl.load(meta + 9)
        pad = tl.load(meta + 10)
        out_col = tl.load(meta + 11)
        has_psw = tl.load(meta + 12)

        start = _load_offset(off_addr, bag, index64)
        end = _load_offset(off_addr, bag + 1, index64)

        cols = col0 + tl.arange(0, BLOCK_D)
        cmask = cols < dim
        acc = tl.zeros([BLOCK_D], tl.float32)
        if mode == 2:
            acc = tl.full([BLOCK_D], float("-inf"), tl.float32)
        count = tl.zeros([BLOCK_L], tl.int32)
        nan_seen = tl.zeros([BLOCK_D], tl.int32)  # max: a NaN wins (tl.max / tl.maximum drop it)
        for p0 in range(start, end, BLOCK_L):
            pos = p0 + lanes
            pmask = pos < end
            idx = _load_index(idx_addr, pos, pmask, index64)
            if BOUNDS == 2:
                row = tl.minimum(tl.maximum(idx, 0), n_rows - 1)
                keep = pmask
            else:
                keep = pmask & (idx >= 0) & (idx < n_rows)
                row = tl.where(keep, idx, 0)
            keep = keep & ((pad < 0) | (row != pad))
            count += keep.to(tl.int32)
            m2 = keep[:, None] & cmask[None, :]
            vals = _load_rows(w_addr, fmt, row, row_stride, dim, cols, keep, m2, GPU_RN, BLOCK_L, BLOCK_D)
            if mode == 2:
                vals = tl.where(m2, vals, float("-inf"))
                acc = tl.maximum(acc, tl.max(vals, axis=0))
                nan_seen = tl.maximum(nan_seen, tl.max((vals != vals).to(tl.int32), axis=0))
            else:
                if has_psw != 0:
                    # as the reference: a skipped index's weight (even inf or NaN) contributes nothing
                    w = tl.load(psw_addr.to(tl.pointer_type(tl.float32)) + pos, mask=keep, other=0.0)
                    vals = mul_rn(vals, w[:, None], GPU_RN)
                acc += tl.sum(vals, axis=0)
        n = tl.sum(count, axis=0)
        if mode == 1:
            # correctly rounded, as the reference (fp32 `/` is div.full.f32 on a GPU: 2 ulp)
            acc = tl.math.div_rn(acc, tl.full([BLOCK_D], 1, tl.float32) * tl.maximum(n, 1).to(tl.float32))
        elif mode == 2:
            acc = tl.where(nan_seen > 0, float("nan"), acc)
            acc = tl.where(n > 0, acc, 0.0)
        tl.store(OUT + bag * out_stride + out_col + cols, to_dtype_rne(acc, OUT.dtype.element_ty, True), mask=cmask)


def launch_config(max_dim: int, on_gpu: bool) -> dict:
    """BLOCK_D (one column block size for every lookup), BLOCK_L and num_warps."""
    if on_gpu:
        block_d = min(triton.next_power_of_2(max(max_dim, 1)), 128)
        return dict(BLOCK_L=max(4, min(16, 2048 // block_d)), BLOCK_D=block_d, num_warps=4 if block_d >= 128 else 2)
    # the interpreter: fewer, bigger steps are what is cheap
    return dict(BLOCK_L=64, BLOCK_D=min(triton.next_power_of_2(max(max_dim, 1)), 256), num_warps=1)


def tasks(dims: list[int], block_d: int) -> list[tuple[int, int]]:
    """(lookup, first column) of every BLOCK_D-column block of every lookup."""
    return [(f, c) for f, d in enumerate(dims) for c in range(0, d, block_d)]


def grid(n_bags: int, n_tasks: int) -> tuple:
    return (n_bags, min(n_tasks, MAX_GRID_Y))
