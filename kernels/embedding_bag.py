"""Triton forward kernel of embedding_bag (float tables and int8/int4 fused row-wise tables).

One program per (bag, block of BLOCK_D columns). The program walks its bag BLOCK_L indices at a
time: it loads the BLOCK_L indices (and per-sample weights), turns them into rows and a "keep"
mask (bounds policy, padding_idx), loads a [BLOCK_L, BLOCK_D] tile of rows (dequantizing fused
row-wise rows in registers), and folds it into an fp32 (fp64 for fp64 tables) accumulator by
sum or max. Mean divides by the number of kept indices at the end; a bag with none gives 0.

No value checks here (a kernel cannot raise): out-of-range indices are never read whatever the
bounds policy (masked loads), and the caller checks offsets / indices before launching. All row
addresses are computed in int64. Semantics: recsys_kernels/ops/embedding.py (the reference).
"""
from __future__ import annotations

import triton
import triton.language as tl

# constexpr codes
MODE_CODES = {"sum": 0, "mean": 1, "max": 2}
BOUNDS_CODES = {"raise": 0, "zero": 1, "clamp": 2}  # raise: checked by the caller, masked like zero here


@triton.jit
def _bag_rows(IDX, pos, pmask, n_rows, pad, BOUNDS: tl.constexpr, HAS_PAD: tl.constexpr):
    """(row, keep) of the indices at `pos`: the forward's bounds / padding_idx rules."""
    idx = tl.load(IDX + pos, mask=pmask, other=0).to(tl.int64)
    if BOUNDS == 2:
        row = tl.minimum(tl.maximum(idx, 0), n_rows - 1)
        keep = pmask
    else:
        keep = pmask & (idx >= 0) & (idx < n_rows)
        row = tl.where(keep, idx, 0)
    if HAS_PAD:
        keep = keep & (row != pad)
    return row, keep


@triton.jit
def _embedding_bag_fwd_kernel(
    W, IDX, OFF, PSW, OUT,
    TOKEN,  # unused: the output of the caller's value checks, so that a compiler keeps them
    n_rows, row_stride, D,
    pad,
    MODE: tl.constexpr, BOUNDS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_PSW: tl.constexpr,
    BITS: tl.constexpr,  # 0: float table; 8 / 4: fused row-wise uint8 table
    ACC64: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    dblk = tl.program_id(1)
    ACC = tl.float64 if ACC64 else tl.float32

    start = tl.load(OFF + bag).to(tl.int64)
    end = tl.load(OFF + bag + 1).to(tl.int64)

    cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    lanes = tl.arange(0, BLOCK_L)

    if MODE == 2:
        acc = tl.full([BLOCK_D], float("-inf"), ACC)
    else:
        acc = tl.zeros([BLOCK_D], ACC)
    count = tl.zeros([BLOCK_L], tl.int32)

    for p0 in range(start, end, BLOCK_L):
        pos = p0 + lanes
        pmask = pos < end
        row, keep = _bag_rows(IDX, pos, pmask, n_rows, pad, BOUNDS, HAS_PAD)
        count += keep.to(tl.int32)

        m2 = keep[:, None] & cmask[None, :]
        base = W + row * row_stride  # [BLOCK_L] pointers, int64 offsets
        if BITS == 8:
            codes = tl.load(base[:, None] + cols[None, :], mask=m2, other=0)
            tail = base + D
            s0 = tl.load(tail + 0, mask=keep, other=0).to(tl.uint32)
            s1 = tl.load(tail + 1, mask=keep, other=0).to(tl.uint32)
            s2 = tl.load(tail + 2, mask=keep, other=0).to(tl.uint32)
            s3 = tl.load(tail + 3, mask=keep, other=0).to(tl.uint32)
            b0 = tl.load(tail + 4, mask=keep, other=0).to(tl.uint32)
            b1 = tl.load(tail + 5, mask=keep, other=0).to(tl.uint32)
            b2 = tl.load(tail + 6, mask=keep, other=0).to(tl.uint32)
            b3 = tl.load(tail + 7, mask=keep, other=0).to(tl.uint32)
            scale = (s0 | (s1 << 8) | (s2 << 16) | (s3 << 24)).to(tl.float32, bitcast=True)
            bias = (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)
            vals = codes.to(tl.float32) * scale[:, None] + bias[:, None]
            vals = tl.where(m2, vals, 0.0).to(ACC)
        elif BITS == 4:
            packed = tl.load(base[:, None] + (cols // 2)[None, :], mask=m2, other=0)
            codes = tl.where((cols % 2 == 0)[None, :], packed & 0xF, packed >> 4)
            tail = base + D // 2
            s0 = tl.load(tail + 0, mask=keep, other=0).to(tl.uint16)
            s1 = tl.load(tail + 1, mask=keep, other=0).to(tl.uint16)
            b0 = tl.load(tail + 2, mask=keep, other=0).to(tl.uint16)
            b1 = tl.load(tail + 3, mask=keep, other=0).to(tl.uint16)
            scale = (s0 | (s1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            bias = (b0 | (b1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            vals = codes.to(tl.float32) * scale[:, None] + bias[:, None]
            vals = tl.where(m2, vals, 0.0).to(ACC)
        else:
            vals = tl.load(base[:, None] + cols[None, :], mask=m2, other=0.0).to(ACC)

        if MODE == 2:
            vals = tl.where(m2, vals, float("-inf"))
            acc = tl.maximum(acc, tl.max(vals, axis=0))
        else:
            if HAS_PSW:
                # like the reference: skipped rows are 0 and still multiplied by their weight
                w = tl.load(PSW + pos, mask=pmask, other=0.0).to(ACC)
                vals = vals * w[:, None]
            acc += tl.sum(vals, axis=0)

    n = tl.sum(count, axis=0)
    if MODE == 1:
        acc = acc / tl.maximum(n, 1).to(ACC)
    elif MODE == 2:
        acc = tl.where(n > 0, acc, 0.0)
    tl.store(OUT + bag * D + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


@triton.jit
def _embedding_bag_bwd_kernel(
    GO, W, IDX, OFF, PSW, GW, GPSW,
    TOKEN,  # unused: see the forward kernel
    n_rows, D,
    pad,
    MODE: tl.constexpr, BOUNDS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_PSW: tl.constexpr,
    SPARSE: tl.constexpr,  # GW: per-index rows [nnz, D] (stored) instead of [N, D] (atomic adds)
    ACC64: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of a float table, one program per (bag, block of columns). Dense: atomically adds
    each contributing index's gradient row into GW [N, D] (the accumulation dtype, zeroed by the
    caller). Sparse: writes the row of every index of the bag into GW [nnz, D]. GPSW (acc dtype,
    zeroed) gets the per-sample-weight gradient, summed over the column blocks atomically. max:
    the gradient of each column goes to the first index attaining the maximum."""
    bag = tl.program_id(0).to(tl.int64)
    dblk = tl.program_id(1)
    ACC = tl.float64 if ACC64 else tl.float32

    start = tl.load(OFF + bag).to(tl.int64)
    end = tl.load(OFF + bag + 1).to(tl.int64)
    cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    lanes = tl.arange(0, BLOCK_L)
    g = tl.load(GO + bag * D + cols, mask=cmask, other=0.0).to(ACC)

    if MODE == 2:
        best = tl.full([BLOCK_D], float("-inf"), ACC)
        first = tl.full([BLOCK_D], -1, tl.int64)
        for p0 in range(start, end, BLOCK_L):
            pos = p0 + lanes
            pmask = pos < end
            row, keep = _bag_rows(IDX, pos, pmask, n_rows, pad, BOUNDS, HAS_PAD)
            m2 = keep[:, None] & cmask[None, :]
            vals = tl.load(W + row[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
            vals = tl.where(m2, vals, float("-inf"))
            cmax = tl.max(vals, axis=0)
            is_best = (vals == cmax[None, :]) & m2
            lane = tl.min(tl.where(is_best, lanes[:, None], BLOCK_L), axis=0)
            better = (lane < BLOCK_L) & ((cmax > best) | (first < 0))
            best = tl.where(better, cmax, best)
            first = tl.where(better, p0 + lane, first)
        has = first >= 0
        at = tl.where(has, first, 0)
        row, _keep = _bag_rows(IDX, at, has, n_rows, pad, BOUNDS, HAS_PAD)
        if SPARSE:
            tl.store(GW + at * D + cols, g.to(GW.dtype.element_ty), mask=has & cmask)
        else:
            tl.atomic_add(GW + row * D + cols, g, mask=has & cmask)
    else:
        if MODE == 1:
            count = tl.zeros([BLOCK_L], tl.int32)
            for p0 in range(start, end, BLOCK_L):
                pos = p0 + lanes
                row, keep = _bag_rows(IDX, pos, pos < end, n_rows, pad, BOUNDS, HAS_PAD)
                count += keep.to(tl.int32)
            g = g / tl.maximum(tl.sum(count, axis=0), 1).to(ACC)
        for p0 in range(start, end, BLOCK_L):
            pos = p0 + lanes
            pmask = pos < end
            row, keep = _bag_rows(IDX, pos, pmask, n_rows, pad, BOUNDS, HAS_PAD)
            m2 = keep[:, None] & cmask[None, :]
            grad = tl.where(m2, g[None, :], 0.0)
            if HAS_PSW:
                rows = tl.load(W + row[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
                tl.atomic_add(GPSW + pos, tl.sum(grad * rows, axis=1), mask=pmask)
                w = tl.load(PSW + pos, mask=pmask, other=0.0).to(ACC)
                grad = grad * w[:, None]
            if SPARSE:
                tl.store(GW + pos[:, None] * D + cols[None, :], grad.to(GW.dtype.element_ty),
                         mask=pmask[:, None] & cmask[None, :])
            else:
                tl.atomic_add(GW + row[:, None] * D + cols[None, :], grad, mask=m2)


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (the kernel is an InterpretedFunction, not a JITFunction)."""
    return not isinstance(_embedding_bag_fwd_kernel, triton.runtime.JITFunction)


def launch_config(dim: int, on_gpu: bool) -> dict:
    """BLOCK_D, BLOCK_L and num_warps for embedding dimension `dim`."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), 256)
    if on_gpu:
        block_l = max(4, min(16, 2048 // block_d))
        num_warps = 4 if block_d >= 128 else 2
    else:  # the interpreter: fewer, bigger steps are what is cheap
        block_l, num_warps = 64, 1
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, num_warps=num_warps)


def grid(n_bags: int, dim: int, block_d: int) -> tuple:
    return (n_bags, triton.cdiv(dim, block_d))
