"""Triton kernels of embedding_bag: the forward (float tables and int8/int4 fused row-wise
tables) and the backward of float tables (per-index gradient rows, then their deterministic
reduction into the dense gradient: see _embedding_bag_bwd_segment_kernel).

Forward:

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

from .rounding import compiled_on_gpu, interpreted, mul_rn, to_dtype_rne  # noqa: F401 - for the wrappers too

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
def _row_base(W, row, row_stride, ALIGN: tl.constexpr):
    """[BLOCK_L] row pointers; ALIGN > 1 tells the compiler that every row start is a multiple of
    ALIGN bytes (the caller checked the table's address and row stride), so that it may load
    several bytes of a row at once."""
    offset = row * row_stride
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return W + offset


@triton.jit
def _int8_rows(W, row, row_stride, dim, cols, keep, m2, GPU_RN: tl.constexpr, ALIGN: tl.constexpr):
    """An int8 row is D codes, fp32 scale, fp32 bias. With ALIGN >= 4 the scale and bias are one
    word each (D + 8 a multiple of 4, so is D); else rows of D + 8 bytes are not 4-byte aligned,
    and they are read byte by byte. (Without ALIGN the GPU kernel read every byte on its own: 144
    byte loads per thread and step at D = 128, against 4 16-byte loads for fp32 rows; sm_90 SASS.)"""
    base = _row_base(W, row, row_stride, ALIGN)
    codes = tl.load(base[:, None] + cols[None, :], mask=m2, other=0)
    if ALIGN >= 4:
        tail = (base + dim).to(tl.pointer_type(tl.float32))
        scale = tl.load(tail, mask=keep, other=0.0)
        bias = tl.load(tail + 1, mask=keep, other=0.0)
    else:
        tail = base + dim
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
    return tl.where(m2, mul_rn(codes.to(tl.float32), scale[:, None], GPU_RN) + bias[:, None], 0.0)


@triton.jit
def _int4_rows(W, row, row_stride, dim, cols, keep, m2, GPU_RN: tl.constexpr, ALIGN: tl.constexpr,
               col0=0, BLOCK_L: tl.constexpr = 1, BLOCK_D: tl.constexpr = 2):
    """An int4 row is D/2 bytes (low nibble first), fp16 scale, fp16 bias. With ALIGN >= 2 each
    byte of the tile's columns col0 + [0, BLOCK_D) is loaded once and its nibbles are put side by
    side, and scale and bias are read as halves; else every column loads its byte and the tail is
    read byte by byte."""
    base = _row_base(W, row, row_stride, ALIGN)
    if ALIGN >= 2:
        half = col0 // 2 + tl.arange(0, BLOCK_D // 2)  # (the mask keeps the reads inside the row)
        packed = tl.load(base[:, None] + half[None, :], mask=keep[:, None] & (half < dim // 2)[None, :], other=0)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), [BLOCK_L, BLOCK_D])
        tail = (base + dim // 2).to(tl.pointer_type(tl.float16))
        scale = tl.load(tail, mask=keep, other=0.0).to(tl.float32)
        bias = tl.load(tail + 1, mask=keep, other=0.0).to(tl.float32)
    else:
        packed = tl.load(base[:, None] + (cols // 2)[None, :], mask=m2, other=0)
        codes = tl.where((cols % 2 == 0)[None, :], packed & 0xF, packed >> 4)
        tail = base + dim // 2
        s0 = tl.load(tail + 0, mask=keep, other=0).to(tl.uint16)
        s1 = tl.load(tail + 1, mask=keep, other=0).to(tl.uint16)
        b0 = tl.load(tail + 2, mask=keep, other=0).to(tl.uint16)
        b1 = tl.load(tail + 3, mask=keep, other=0).to(tl.uint16)
        scale = (s0 | (s1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        bias = (b0 | (b1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.where(m2, mul_rn(codes.to(tl.float32), scale[:, None], GPU_RN) + bias[:, None], 0.0)


@triton.jit
def _embedding_bag_fwd_kernel(
    W, IDX, OFF, PSW, OUT,
    TOKEN,  # unused: the output of the caller's value checks, so that a compiler keeps them
    n_rows, row_stride, D,
    pad,
    MODE: tl.constexpr, BOUNDS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_PSW: tl.constexpr,
    BITS: tl.constexpr,  # 0: float table; 8 / 4: fused row-wise uint8 table
    ROW_ALIGN: tl.constexpr,  # uint8 tables: every row starts on a multiple of this many bytes
    ACC64: tl.constexpr,
    GPU_RN: tl.constexpr,  # on a GPU: products rounded on their own (rounding.mul_rn)
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
    nan_seen = tl.zeros([BLOCK_D], tl.int32)  # max: a NaN wins (tl.max / tl.maximum drop it)

    for p0 in range(start, end, BLOCK_L):
        pos = p0 + lanes
        pmask = pos < end
        row, keep = _bag_rows(IDX, pos, pmask, n_rows, pad, BOUNDS, HAS_PAD)
        count += keep.to(tl.int32)

        m2 = keep[:, None] & cmask[None, :]
        if BITS == 8:
            vals = _int8_rows(W, row, row_stride, D, cols, keep, m2, GPU_RN, ROW_ALIGN).to(ACC)
        elif BITS == 4:
            vals = _int4_rows(W, row, row_stride, D, cols, keep, m2, GPU_RN, ROW_ALIGN, dblk * BLOCK_D, BLOCK_L,
                              BLOCK_D).to(ACC)
        else:
            base = W + row * row_stride  # [BLOCK_L] pointers, int64 offsets
            vals = tl.load(base[:, None] + cols[None, :], mask=m2, other=0.0).to(ACC)

        if MODE == 2:
            vals = tl.where(m2, vals, float("-inf"))
            acc = tl.maximum(acc, tl.max(vals, axis=0))
            nan_seen = tl.maximum(nan_seen, tl.max((vals != vals).to(tl.int32), axis=0))
        else:
            if HAS_PSW:
                # as the reference: a skipped index's weight (even inf or NaN) contributes nothing
                w = tl.load(PSW + pos, mask=keep, other=0.0).to(ACC)
                vals = mul_rn(vals, w[:, None], GPU_RN)
            acc += tl.sum(vals, axis=0)

    n = tl.sum(count, axis=0)
    if MODE == 1:
        # correctly rounded, as the reference (fp32 `/` is div.full.f32 on a GPU: 2 ulp)
        n_acc = tl.maximum(n, 1).to(ACC)
        acc = acc / n_acc if ACC64 else tl.math.div_rn(acc, tl.full([BLOCK_D], 1, ACC) * n_acc)
    elif MODE == 2:
        acc = tl.where(nan_seen > 0, float("nan"), acc)
        acc = tl.where(n > 0, acc, 0.0)
    tl.store(OUT + bag * D + cols, to_dtype_rne(acc, OUT.dtype.element_ty, True), mask=cmask)


@triton.jit
def _embedding_bag_bwd_rows_kernel(
    GO, W, IDX, OFF, PSW, G, GPSW, ROW_OF,
    TOKEN,  # unused: see the forward kernel
    n_rows, nnz, D,
    pad,
    MODE: tl.constexpr, BOUNDS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_PSW: tl.constexpr,
    WRITE_ROWS: tl.constexpr,  # write ROW_OF (the dense gradient's reduction needs it)
    ACC64: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of a float table, one program per (bag, block of columns): the per-index gradient
    rows G [nnz, D] (d out[bag] / d row of index p, times its per-sample weight; 0 where the index
    contributes nothing; G is zeroed by the caller in max mode, where only the first arg-max index
    of each column gets the gradient). GPSW [column blocks, nnz] gets each column block's part of
    the per-sample-weight gradient (the caller adds the parts up). ROW_OF [nnz]: the row each index
    contributes to, -1 for none (written by the programs of column block 0). No atomics."""
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
        # a column whose max is NaN routes its gradient nowhere (the reference compares with the
        # max, and NaN equals nothing); tl.max drops NaN, so they are counted apart
        nan_seen = tl.zeros([BLOCK_D], tl.int32)
        for p0 in range(start, end, BLOCK_L):
            pos = p0 + lanes
            pmask = pos < end
            row, keep = _bag_rows(IDX, pos, pmask, n_rows, pad, BOUNDS, HAS_PAD)
            if WRITE_ROWS:
                tl.store(ROW_OF + pos, tl.where(keep, row, -1), mask=pmask & (dblk == 0))
            m2 = keep[:, None] & cmask[None, :]
            vals = tl.load(W + row[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
            vals = tl.where(m2, vals, float("-inf"))
            nan_seen = tl.maximum(nan_seen, tl.max((vals != vals).to(tl.int32), axis=0))
            cmax = tl.max(vals, axis=0)
            is_best = (vals == cmax[None, :]) & m2
            lane = tl.min(tl.where(is_best, lanes[:, None], BLOCK_L), axis=0)
            better = (lane < BLOCK_L) & ((cmax > best) | (first < 0))
            best = tl.where(better, cmax, best)
            first = tl.where(better, p0 + lane, first)
        has = (first >= 0) & (nan_seen == 0)
        at = tl.where(has, first, 0)
        tl.store(G + at * D + cols, to_dtype_rne(g, G.dtype.element_ty, True), mask=has & cmask)
    else:
        if MODE == 1:
            count = tl.zeros([BLOCK_L], tl.int32)
            for p0 in range(start, end, BLOCK_L):
                pos = p0 + lanes
                row, keep = _bag_rows(IDX, pos, pos < end, n_rows, pad, BOUNDS, HAS_PAD)
                count += keep.to(tl.int32)
            n = tl.maximum(tl.sum(count, axis=0), 1).to(ACC)
            # correctly rounded (the reference's and the CPU backend's quotient): the dense
            # gradient then has the same bits on every device
            g = g / n if ACC64 else tl.math.div_rn(g, tl.full([BLOCK_D], 1, ACC) * n)
        for p0 in range(start, end, BLOCK_L):
            pos = p0 + lanes
            pmask = pos < end
            row, keep = _bag_rows(IDX, pos, pmask, n_rows, pad, BOUNDS, HAS_PAD)
            if WRITE_ROWS:
                tl.store(ROW_OF + pos, tl.where(keep, row, -1), mask=pmask & (dblk == 0))
            m2 = keep[:, None] & cmask[None, :]
            grad = tl.where(m2, g[None, :], 0.0)
            if HAS_PSW:
                rows = tl.load(W + row[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
                tl.store(GPSW + dblk * nnz + pos, tl.sum(grad * rows, axis=1), mask=pmask)
                w = tl.load(PSW + pos, mask=keep, other=0.0).to(ACC)
                grad = grad * w[:, None]
            tl.store(G + pos[:, None] * D + cols[None, :], to_dtype_rne(grad, G.dtype.element_ty, True),
                     mask=pmask[:, None] & cmask[None, :])


# Dense gradient from G, deterministically. The caller sorts ROW_OF stably: slot j of the sorted
# order holds position PERM[j], whose row is SROW[j]; the slots of one row form a segment
# [SEG_START[j], SEG_END[j]), in index order. A segment is cut into chunks of DENSE_CHUNK slots
# from its start, and each chunk is summed in slot order by the lane (row of the [BLOCK_S,
# BLOCK_D] tile) of its first slot. A one-chunk segment (the common case) writes its table row:
# the same sums, in the same order, as index_add_ and the CPU backend. A longer one (a hot row,
# spread over several lanes / programs) leaves its chunk sums in G, in place of each chunk's
# first row (read by that lane only), and _embedding_bag_bwd_combine_kernel adds them up in chunk
# order: the CUDA backend's grouping. Lanes of other slots do nothing; rows that no index
# reaches keep the caller's zeros. The grouping depends on the sorted rows alone, never on
# scheduling: the same bits on every run.
DENSE_CHUNK = 128


@triton.jit
def _embedding_bag_bwd_segment_kernel(
    G, GW, SROW, PERM, SEG_START, SEG_END,
    nnz, D,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    smask = slots < nnz
    row = tl.load(SROW + slots, mask=smask, other=-1)
    seg_start = tl.load(SEG_START + slots, mask=smask, other=0)
    seg_end = tl.load(SEG_END + slots, mask=smask, other=0)
    owner = (row >= 0) & ((slots - seg_start) % CHUNK == 0)
    n = tl.where(owner, tl.minimum(seg_end - slots, CHUNK), 0)  # the slots each lane sums
    acc = tl.zeros([BLOCK_S, BLOCK_D], G.dtype.element_ty)
    # four rows per lane in flight per step, added one after the other (the order is the point).
    # A masked-off row loads as +0.0, and adding +0.0 changes no bits: acc starts at +0.0, and a
    # round-to-nearest sum is -0.0 only when both terms are, so acc is never -0.0.
    for t in range(0, tl.max(n, axis=0), 4):
        a0 = t < n
        a1 = t + 1 < n
        a2 = t + 2 < n
        a3 = t + 3 < n
        p0 = tl.load(PERM + slots + t, mask=a0, other=0)
        p1 = tl.load(PERM + slots + t + 1, mask=a1, other=0)
        p2 = tl.load(PERM + slots + t + 2, mask=a2, other=0)
        p3 = tl.load(PERM + slots + t + 3, mask=a3, other=0)
        r0 = tl.load(G + p0[:, None] * D + cols[None, :], mask=a0[:, None] & cmask[None, :], other=0.0)
        r1 = tl.load(G + p1[:, None] * D + cols[None, :], mask=a1[:, None] & cmask[None, :], other=0.0)
        r2 = tl.load(G + p2[:, None] * D + cols[None, :], mask=a2[:, None] & cmask[None, :], other=0.0)
        r3 = tl.load(G + p3[:, None] * D + cols[None, :], mask=a3[:, None] & cmask[None, :], other=0.0)
        acc += r0
        acc += r1
        acc += r2
        acc += r3
    one_chunk = seg_end - seg_start <= CHUNK
    several = seg_end - seg_start > CHUNK
    m2 = owner[:, None] & cmask[None, :]
    tl.store(GW + row[:, None] * D + cols[None, :], to_dtype_rne(acc, GW.dtype.element_ty, True),
             mask=m2 & one_chunk[:, None])
    head = tl.load(PERM + slots, mask=smask, other=0)
    tl.store(G + head[:, None] * D + cols[None, :], acc, mask=m2 & several[:, None])


@triton.jit
def _embedding_bag_bwd_combine_kernel(
    G, GW, SROW, PERM, SEG_START, SEG_END,
    nnz, D,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The rows of segments longer than CHUNK: their chunk sums, added in chunk order by the lane
    of the segment's first slot."""
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    smask = slots < nnz
    row = tl.load(SROW + slots, mask=smask, other=-1)
    seg_start = tl.load(SEG_START + slots, mask=smask, other=0)
    seg_end = tl.load(SEG_END + slots, mask=smask, other=0)
    owner = (row >= 0) & (slots == seg_start) & (seg_end - seg_start > CHUNK)
    n_chunks = tl.where(owner, (seg_end - seg_start + CHUNK - 1) // CHUNK, 0)
    acc = tl.zeros([BLOCK_S, BLOCK_D], G.dtype.element_ty)
    for k in range(0, tl.max(n_chunks, axis=0)):
        a = k < n_chunks
        head = tl.load(PERM + slots + k * CHUNK, mask=a, other=0)
        part = tl.load(G + head[:, None] * D + cols[None, :], mask=a[:, None] & cmask[None, :], other=0.0)
        acc += part  # +0.0 where masked off: no change (see the segment kernel)
    tl.store(GW + row[:, None] * D + cols[None, :], to_dtype_rne(acc, GW.dtype.element_ty, True),
             mask=owner[:, None] & cmask[None, :])


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


def segment_config(nnz: int, block_d: int, on_gpu: bool) -> dict:
    """BLOCK_S (slots per program) and num_warps of the dense gradient's segment kernels. On a GPU
    one slot per program: a lane that owns a hot chunk does not hold up the others (not tuned).
    The interpreter pays per program and per op, not per element: many slots per program."""
    if on_gpu:
        return dict(BLOCK_S=1, BLOCK_D=block_d, num_warps=4 if block_d >= 128 else 2)
    block_s = min(triton.next_power_of_2(max(nnz, 1)), max(1, 65536 // block_d))
    return dict(BLOCK_S=block_s, BLOCK_D=block_d, num_warps=1)
