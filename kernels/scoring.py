"""Triton kernels of the scoring ops (pair_scores + its backward, candidate_scores,
candidate_topk, topk_scores). Semantics: recsys_kernels/ops/scoring.py (the reference);
registered as the `triton` backend in recsys_kernels/ops/scoring_triton.py.

* _gather_dot_kernel: one score per (query row, item row) pair, BLOCK_P pairs per program,
  fp32 products and sums; optionally the int64 ranking key of each score (candidate_topk).
* _topk_keys_kernel: the ranking keys of a [users, item chunk] block of the catalog, one
  (BLOCK_U x BLOCK_I) tile at a time with tl.dot, bias and exclusions applied in the kernel; the
  caller selects the chunk's top-k on those keys and merges it into the running top-k. The
  exclusion lists arrive sorted per user: a program binary-searches each user's list once for
  the start of its item span, then walks it forward tile by tile (a merge), so each excluded
  item is looked at once.
* _segment_grad_kernel: the deterministic backward, one program per block of output rows: the
  pairs of a row are summed in pair order (the caller's stable sort), no atomics.

The ranking key is the reference's (_rank_key in ops/scoring.py): (monotone fp32 ordinal << 32)
| (2^32 - 1 - item id), NaN below -inf, "not an item" below NaN. Unique per item, so selecting
on keys gives ties to the lower id whatever the selection order.

int8 row-wise tables (D codes, fp32 scale, fp32 bias per row, D + 8 bytes) are dequantized in
registers as code * scale + bias with two roundings, like the reference: on a GPU the product is
an inline `mul.rn.f32`, which the compiler never contracts into an fma with the add, so an
int8 table scores bit for bit like its dequantized fp32 table on this backend.

No value checks here (a kernel cannot raise): the caller checks offsets, indices and scales
before the launch. Row addresses are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .rounding import compiled_on_gpu, interpreted, mul_rn  # noqa: F401 - for the wrappers too

ORD_NAN = tl.constexpr(-2139095042)  # the ordinal of NaN: one below fp32 -inf's
KEY_INVALID = tl.constexpr((-2139095041 - 2) << 32)  # padding / excluded: below every NaN
ID_MASK = tl.constexpr(4294967295)


@triton.jit
def _tail_f32(tail, off, mask):
    """The fp32 at byte `off` of each row tail: rows of D + 8 bytes are not 4-byte aligned, so
    it is read byte by byte."""
    b0 = tl.load(tail + off + 0, mask=mask, other=0).to(tl.uint32)
    b1 = tl.load(tail + off + 1, mask=mask, other=0).to(tl.uint32)
    b2 = tl.load(tail + off + 2, mask=mask, other=0).to(tl.uint32)
    b3 = tl.load(tail + off + 3, mask=mask, other=0).to(tl.uint32)
    return (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _item_rows(ITEMS, rows, row_stride, D, cols, rmask, m2, INT8: tl.constexpr, GPU_RN: tl.constexpr):
    """fp32 values [R, C] of item rows `rows` [R] at columns `cols` [C]; 0 where m2 is False."""
    base = ITEMS + rows * row_stride
    if INT8:
        codes = tl.load(base[:, None] + cols[None, :], mask=m2, other=0).to(tl.float32)
        scale = _tail_f32(base + D, 0, rmask)
        bias = _tail_f32(base + D, 4, rmask)
        vals = mul_rn(codes, scale[:, None], GPU_RN) + bias[:, None]
        return tl.where(m2, vals, 0.0)
    else:
        return tl.load(base[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)


@triton.jit
def _item_cols(ITEMS, items, row_stride, D, ks, imask, m2, INT8: tl.constexpr, GPU_RN: tl.constexpr):
    """fp32 values [K, I] of item rows `items` [I] at columns `ks` [K] (the transposed tile of
    tl.dot's right operand); 0 where m2 is False."""
    base = ITEMS + items * row_stride
    if INT8:
        codes = tl.load(base[None, :] + ks[:, None], mask=m2, other=0).to(tl.float32)
        scale = _tail_f32(base + D, 0, imask)
        bias = _tail_f32(base + D, 4, imask)
        vals = mul_rn(codes, scale[None, :], GPU_RN) + bias[None, :]
        return tl.where(m2, vals, 0.0)
    else:
        return tl.load(base[None, :] + ks[:, None], mask=m2, other=0.0)


@triton.jit
def _rank_keys(scores, ids):
    """The reference's int64 ranking key of fp32 scores of items `ids` (int64, broadcastable)."""
    s = tl.where(scores == 0.0, 0.0, scores)  # -0.0 -> +0.0: equal scores, equal ordinals
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    ordinal = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float value
    ordinal = tl.where(s != s, ORD_NAN, ordinal)
    return (ordinal << 32) | (ID_MASK - ids.to(tl.int64))


@triton.jit
def _gather_dot_kernel(
    Q, ITEMS, BIAS, QIDX, IIDX, OUT, KEYS,
    TOKEN,  # unused: the output of the caller's value checks, so that a compiler keeps them
    n_pairs, D, item_stride,
    HAS_BIAS: tl.constexpr, INT8: tl.constexpr, WRITE_KEYS: tl.constexpr, GPU_RN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT[p] = <Q[QIDX[p]], ITEMS[IIDX[p]]> (+ BIAS[IIDX[p]]) in fp32; KEYS[p] its ranking key
    (item id IIDX[p]) when WRITE_KEYS."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < n_pairs
    qi = tl.load(QIDX + p, mask=pm, other=0).to(tl.int64)
    ii = tl.load(IIDX + p, mask=pm, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = pm[:, None] & (cols < D)[None, :]
        q = tl.load(Q + qi[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        v = _item_rows(ITEMS, ii, item_stride, D, cols, pm, m2, INT8, GPU_RN)
        acc += tl.sum(q * v, axis=1)
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + ii, mask=pm, other=0.0).to(tl.float32)
    tl.store(OUT + p, acc, mask=pm)
    if WRITE_KEYS:
        tl.store(KEYS + p, _rank_keys(acc, ii), mask=pm)


@triton.jit
def _topk_keys_kernel(
    Q, ITEMS, BIAS, EX_OFF, EX_SORTED, KEYS,
    TOKEN,  # unused: see _gather_dot_kernel
    n_users, start, stop, span, D, item_stride,
    HAS_BIAS: tl.constexpr, HAS_EX: tl.constexpr, INT8: tl.constexpr, GPU_RN: tl.constexpr,
    DOT_FP32: tl.constexpr,  # convert both operands to fp32 (ieee dot); else a dot in Q's dtype
    KP: tl.constexpr,  # 0: write every key; else (a power of two <= BLOCK_I) only the span's top KP
    BLOCK_U: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """KEYS[u, i - start] = ranking key of (user u, item i) for u < n_users, i in [start, stop);
    KEY_INVALID for excluded items. Q [n_users, D] (this block's users); EX_OFF [n_users + 1]
    (this block's slice of the CSR offsets, absolute positions into EX_SORTED); EX_SORTED:
    every user's exclusion list sorted ascending. Program (pid_u, pid_i) covers
    BLOCK_U users x the items [start + pid_i * span, + span).

    With KP > 0 the program selects in registers: a running [BLOCK_U, KP] top-k of its span's
    keys (tl.topk of each tile, joined with the running one, tl.topk again), and writes only
    that, to KEYS[u, pid_i * KP : (pid_i + 1) * KP] (KEYS is [n_users, programs * KP]).
    Entries past the span are KEY_INVALID, so they can fill slots but never outrank an item."""
    users = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    um = users < n_users
    users64 = users.to(tl.int64)
    span_lo = start + tl.program_id(1).to(tl.int64) * span
    span_hi = tl.minimum(span_lo + span, stop)
    if HAS_EX:
        ex_end = tl.load(EX_OFF + users64 + 1, mask=um, other=0).to(tl.int64)
        # lower bound of span_lo in each user's sorted list (halving [lo, hi) per step)
        lo = tl.load(EX_OFF + users64, mask=um, other=0).to(tl.int64)
        hi = ex_end
        while tl.max((lo < hi).to(tl.int32), axis=0) > 0:
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(EX_SORTED + mid, mask=active, other=0)
            right = active & (v < span_lo)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & (v >= span_lo), mid, hi)
        ptr = lo
    if KP > 0:
        best = tl.full([BLOCK_U, KP], KEY_INVALID, tl.int64)
    for t0 in range(span_lo, span_hi, BLOCK_I):
        items = t0 + tl.arange(0, BLOCK_I)
        im = items < span_hi
        acc = tl.zeros([BLOCK_U, BLOCK_I], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ks = d0 + tl.arange(0, BLOCK_D)
            km = ks < D
            q = tl.load(Q + users64[:, None] * D + ks[None, :], mask=um[:, None] & km[None, :], other=0.0)
            v = _item_cols(ITEMS, items, item_stride, D, ks, im, km[:, None] & im[None, :], INT8, GPU_RN)
            if DOT_FP32:
                acc = tl.dot(q.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(q, v.to(q.dtype), acc)
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + items, mask=im, other=0.0).to(tl.float32)[None, :]
        key = _rank_keys(acc, items[None, :])
        if HAS_EX:
            # walk each user's sorted list over this tile's items
            t_end = tl.minimum(t0 + BLOCK_I, span_hi)
            excluded = tl.zeros([BLOCK_U, BLOCK_I], tl.int32)
            e = tl.load(EX_SORTED + ptr, mask=ptr < ex_end, other=0)
            hit = (ptr < ex_end) & (e < t_end)
            while tl.max(hit.to(tl.int32), axis=0) > 0:
                excluded = excluded | (hit[:, None] & (items[None, :] == e[:, None])).to(tl.int32)
                ptr = ptr + hit.to(tl.int64)
                e = tl.load(EX_SORTED + ptr, mask=ptr < ex_end, other=0)
                hit = (ptr < ex_end) & (e < t_end)
            key = tl.where(excluded != 0, KEY_INVALID, key)
        if KP > 0:
            key = tl.where(im[None, :], key, KEY_INVALID)
            both = tl.reshape(tl.join(best, tl.topk(key, KP)), [BLOCK_U, 2 * KP])
            best = tl.topk(both, KP)
        else:
            out = KEYS + users64[:, None] * (stop - start) + (items - start)[None, :]
            tl.store(out, key, mask=um[:, None] & im[None, :])
    if KP > 0:
        slots = tl.program_id(1) * KP + tl.arange(0, KP)
        out = KEYS + users64[:, None] * (tl.num_programs(1) * KP) + slots[None, :]
        tl.store(out, best, mask=um[:, None])


@triton.jit
def _segment_grad_kernel(
    G, OTHER, OTHER_IDX, PERM, SEG_LO, SEG_HI, OUT, OUT_BIAS,
    TOKEN,  # unused: see _gather_dot_kernel
    n_rows, D, other_stride,
    INT8: tl.constexpr, HAS_BIAS: tl.constexpr, GPU_RN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT[r] = sum over the pairs p of row r, in pair order, of G[p] * OTHER[OTHER_IDX[p]] (fp32,
    [n_rows, D]); OUT_BIAS[r] = the sum of G[p] (when HAS_BIAS, written by column block 0). The
    pairs of row r are PERM[SEG_LO[r]:SEG_HI[r]] (a stable sort of the pairs by row). Each
    product is rounded, then added: index_add_'s arithmetic and order, so the same bits."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < n_rows
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    lo = tl.load(SEG_LO + rows, mask=rm, other=0)
    n = tl.load(SEG_HI + rows, mask=rm, other=0) - lo
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    bacc = tl.zeros([BLOCK_R], tl.float32)
    for t in range(0, tl.max(n, axis=0)):
        a = t < n
        p = tl.load(PERM + lo + t, mask=a, other=0)
        g = tl.load(G + p, mask=a, other=0.0).to(tl.float32)
        oi = tl.load(OTHER_IDX + p, mask=a, other=0).to(tl.int64)
        m2 = a[:, None] & cm[None, :]
        if INT8:
            vals = _item_rows(OTHER, oi, other_stride, D, cols, a, m2, INT8, GPU_RN)
        else:
            vals = tl.load(OTHER + oi[:, None] * other_stride + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += mul_rn(g[:, None], vals, GPU_RN)  # +0.0 where masked: no change
        if HAS_BIAS:
            bacc += g
    tl.store(OUT + rows[:, None] * D + cols[None, :], acc, mask=rm[:, None] & cm[None, :])
    if HAS_BIAS:
        tl.store(OUT_BIAS + rows, bacc, mask=rm & (tl.program_id(1) == 0))


# ----------------------------------------------------------------------------- launch helpers
def gather_config(dim: int, on_gpu: bool) -> dict:
    block_d = min(triton.next_power_of_2(max(dim, 1)), 128 if on_gpu else 1024)
    if on_gpu:
        return dict(BLOCK_P=max(1, min(64, 2048 // block_d)), BLOCK_D=block_d, num_warps=4)  # no spills (sm_90)
    return dict(BLOCK_P=max(1, min(1024, 65536 // block_d)), BLOCK_D=block_d, num_warps=1)


SELECT_MAX_K = 64  # the largest k selected in registers (KP); above it every key is written


def topk_config(n_users: int, chunk: int, dim: int, k: int, on_gpu: bool) -> dict:
    """Tiles of the topk key kernel (tl.dot needs >= 16 on every side), `span` (the items per
    program) and KP (in-register selection when it shrinks the output: k <= SELECT_MAX_K and a
    span longer than KP). Not timed on a GPU (none was available when this was written); the GPU
    tiles are the largest that compile for sm_90 without register spills (ptxas, checked ahead
    of time for fp32 / int8 / bf16 tables with and without selection): 32 x 64 x 16, 8 warps."""
    block_d = 16 if on_gpu else max(16, min(triton.next_power_of_2(max(dim, 1)), 1024))
    kp = triton.next_power_of_2(max(k, 1))
    selecting = kp <= SELECT_MAX_K  # then BLOCK_I >= KP (tl.topk of a tile)
    if on_gpu:
        block_u = 16 if n_users <= 16 else 32
        block_i = max(64, kp) if selecting else 64
        span = 16 * block_i if selecting else 4 * block_i
        cfg = dict(BLOCK_U=block_u, BLOCK_I=block_i, BLOCK_D=block_d, span=span, num_warps=8)
    else:  # the interpreter pays per op, not per element: one program per chunk and user block
        block_u = max(16, min(triton.next_power_of_2(max(n_users, 1)), 64))
        block_i = max(16, kp if selecting else 16, min(triton.next_power_of_2(max(chunk, 1)), 2048))
        cfg = dict(BLOCK_U=block_u, BLOCK_I=block_i, BLOCK_D=block_d, span=max(chunk, 1), num_warps=1)
    cfg["KP"] = kp if selecting and kp < min(cfg["span"], chunk) else 0
    return cfg


def segment_config(dim: int, n_rows: int, on_gpu: bool) -> dict:
    block_d = min(triton.next_power_of_2(max(dim, 1)), 128 if on_gpu else 1024)
    if on_gpu:
        return dict(BLOCK_R=4, BLOCK_D=block_d, num_warps=4)
    return dict(BLOCK_R=max(1, min(triton.next_power_of_2(max(n_rows, 1)), 65536 // block_d)), BLOCK_D=block_d,
                num_warps=1)
