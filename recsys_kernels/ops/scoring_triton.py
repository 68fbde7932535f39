"""The Triton backend of the scoring ops: recsys_kernels::{pair_scores, pair_scores_backward,
candidate_scores, candidate_topk, topk_scores}_triton, torch.library.triton_ops with the schemas
of the reference ops, around the kernels in kernels/scoring.py (recsys_kernels._triton).

* pair_scores / candidate_scores: one gather-dot kernel (a candidate's query row is its CSR
  segment, found with searchsorted: static shapes, traceable).
* candidate_topk: the gather-dot kernel also writes each candidate's ranking key; the per-user
  top-k is then two stable sorts of the keys (by key, then by user) and a gather of each user's
  first k: no [U, max list length] padding, no host sync, static shapes.
* topk_scores: for each block of TOPK_USER_CHUNK users and each chunk of TOPK_CHUNK items
  (ops/scoring.py's constants, read at every call), _topk_keys_kernel writes the chunk's ranking
  keys (scores by tl.dot, bias and exclusions applied in the kernel); torch.topk picks the
  chunk's k best keys and merges them into the running top-k, as in the reference. The [U, I]
  score matrix never exists: the largest buffer is [users, chunk] keys. Keys are unique per
  item, so the answer does not depend on torch.topk's order among equal values, and equals the
  reference's wherever the scores are equal (bit for bit on the tests' exact data; fp32
  summation order otherwise: the kernel's tl.dot order is not mm's).
* pair_scores_backward: deterministic, no atomics. The pairs are sorted stably by user (and by
  item); one kernel sums each row's pairs in pair order, each product rounded before the add:
  index_add_'s arithmetic and order, the reference's bits on every run.

int8 tables: an int8 row-wise table scores exactly like its dequantized fp32 table on this
backend (see kernels/scoring.py); against the reference the int8 scores differ only by fp32
summation order, so the top-k ids can differ where two scores are within that rounding (near
ties).

Value checks. A kernel cannot raise, so the reference's value checks (CSR offsets, indices in
range, finite scales of the int8 rows the reference dequantizes) run in torch before the launch,
with one host sync: the conditions reduce into one flag, and only when it is set are the errors
worked out with the reference's own checks, in its order (same types, same words). They live in
separate opaque custom ops (scoring_triton_check_*) returning an empty token that is passed to
the launches, so that torch.compile keeps them (see embedding_triton.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _common
from . import scoring as _s
from .rowwise import _fresh

_k, _REASON = _common.triton_kernels("scoring")

_NON_FINITE = "packed table has non-finite scales or biases"  # the reference's words (rowwise.py)


# ----------------------------------------------------------------------------- value checks
def _out_of_range(idx: Tensor, n: int) -> Tensor:
    bad = idx < 0
    if n <= torch.iinfo(idx.dtype).max:  # else no index of this dtype can reach n
        bad = bad | (idx >= n)
    return bad.any()


def _tails_not_finite(items: Tensor, rows: Optional[Tensor]) -> Tensor:
    """True when a scale or bias of the int8 rows `rows` (all rows when None) is not finite;
    only the 8 tail bytes are read."""
    tail = items[:, items.shape[1] - 8:]
    # a fresh tensor: the slice of a one-row table is contiguous at an odd storage offset, which
    # the float view refuses
    tail = _fresh(tail) if rows is None else tail.index_select(0, rows.long().clamp(0, items.shape[0] - 1))
    return ~torch.isfinite(tail.view(torch.float32)).all()


def _offsets_bad(offsets: Tensor, nnz: int) -> Tensor:
    off = offsets.long()
    bad = (off[0] != 0) | (off[-1] != nnz)
    if off.numel() > 1:
        bad = bad | (off[1:] < off[:-1]).any()
    return bad


def _pair_check(user_emb: Tensor, item_emb: Tensor, user_idx: Tensor, item_idx: Tensor) -> Tensor:
    if user_idx.numel() > 0:
        bad = _out_of_range(user_idx, user_emb.shape[0]) | _out_of_range(item_idx, item_emb.shape[0])
        if item_emb.dtype == torch.uint8 and item_emb.shape[0] > 0:
            bad = bad | _tails_not_finite(item_emb, item_idx)
        if bool(bad):  # the one host sync
            _s._check_index_range(user_idx, user_emb.shape[0], "user_idx")
            _s._check_index_range(item_idx, item_emb.shape[0], "item_idx")
            raise ValueError(_NON_FINITE)
    return user_idx.new_empty(0)


def _candidate_check(items: Tensor, cand_offsets: Tensor, cand_items: Tensor) -> Tensor:
    if cand_offsets.numel() == 0:
        _s._check_offsets(cand_offsets, cand_items.shape[0], "cand_offsets")  # raises
    bad = _offsets_bad(cand_offsets, cand_items.shape[0])
    if cand_items.numel() > 0:
        bad = bad | _out_of_range(cand_items, items.shape[0])
        if items.dtype == torch.uint8 and items.shape[0] > 0:
            bad = bad | _tails_not_finite(items, cand_items)
    if bool(bad):
        _s._check_offsets(cand_offsets, cand_items.shape[0], "cand_offsets")
        _s._check_index_range(cand_items, items.shape[0], "cand_items")
        raise ValueError(_NON_FINITE)
    return cand_items.new_empty(0)


def _topk_check(queries: Tensor, items: Tensor, exclude_offsets: Optional[Tensor],
                exclude_items: Optional[Tensor]) -> Tensor:
    bad = torch.zeros((), dtype=torch.bool, device=queries.device)
    if exclude_offsets is not None:
        if exclude_offsets.numel() == 0:
            _s._check_offsets(exclude_offsets, exclude_items.shape[0], "exclude_offsets")  # raises
        bad = bad | _offsets_bad(exclude_offsets, exclude_items.shape[0])
        if exclude_items.numel() > 0:
            bad = bad | _out_of_range(exclude_items, items.shape[0])
    # the reference dequantizes every row when there is a user to score
    if items.dtype == torch.uint8 and items.shape[0] > 0 and queries.shape[0] > 0:
        bad = bad | _tails_not_finite(items, None)
    if bool(bad):
        if exclude_offsets is not None:
            _s._check_offsets(exclude_offsets, exclude_items.shape[0], "exclude_offsets")
            _s._check_index_range(exclude_items, items.shape[0], "exclude_items")
        raise ValueError(_NON_FINITE)
    return queries.new_empty(0)


def _check_op(name, fn, fake):
    op = torch.library.custom_op(f"{_common.LIB}::{name}", fn, mutates_args=())
    op.register_fake(fake)
    return op


CHECK_PAIR = _check_op("scoring_triton_check_pair", _pair_check, lambda u, v, ui, ii: ui.new_empty(0))
CHECK_CANDIDATES = _check_op("scoring_triton_check_candidates", _candidate_check,
                             lambda items, off, cand: cand.new_empty(0))
CHECK_TOPK = _check_op("scoring_triton_check_topk", _topk_check, lambda q, items, off, ex: q.new_empty(0))


def _keep(t: Tensor, token: Tensor) -> Tensor:
    """t, made to depend on a check's (empty) token so that tracing cannot drop the check."""
    return t + token.sum().to(t.dtype)


# ----------------------------------------------------------------------------- launches
def _dim(items: Tensor) -> int:
    return items.shape[1] - 8 if items.dtype == torch.uint8 else items.shape[1]


def _gather_dot(queries: Tensor, items: Tensor, q_idx: Tensor, i_idx: Tensor, item_bias: Optional[Tensor],
                token: Tensor, with_keys: bool) -> tuple[Tensor, Tensor]:
    """fp32 scores [n] of the pairs (q_idx, i_idx), and their ranking keys when with_keys."""
    n = q_idx.shape[0]
    device = queries.device
    out = torch.empty(n, dtype=torch.float32, device=device)
    keys = torch.empty(n if with_keys else 0, dtype=torch.int64, device=device)
    if n == 0:
        return _keep(out, token), keys
    dim = _dim(items)
    cfg = _k.gather_config(dim, _k.compiled_on_gpu(queries))
    grid = (triton_cdiv(n, cfg["BLOCK_P"]),)
    _common.launch_triton(_k._gather_dot_kernel, grid)(
        queries, items, item_bias if item_bias is not None else out, q_idx, i_idx, out,
        keys if with_keys else out, token,
        n, dim, items.stride(0),
        HAS_BIAS=item_bias is not None, INT8=items.dtype == torch.uint8, WRITE_KEYS=with_keys,
        GPU_RN=_k.compiled_on_gpu(queries), **cfg)
    return out, keys


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _segments(idx: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(perm, seg_lo, seg_hi): a stable sort of the pairs by `idx`; row r's pairs are
    perm[seg_lo[r]:seg_hi[r]], in pair order. Static shapes (no unique), so traceable."""
    sorted_idx, perm = torch.sort(idx.long(), stable=True)
    rows = torch.arange(n_rows, device=idx.device)
    return (perm, torch.searchsorted(sorted_idx, rows), torch.searchsorted(sorted_idx, rows, right=True))


def _segment_grad(grad_output: Tensor, other: Tensor, other_idx: Tensor, row_idx: Tensor, n_rows: int,
                  dim: int, with_bias: bool, token: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 [n_rows, dim]: row r = sum of grad_output[p] * other[other_idx[p]] over the pairs
    with row_idx[p] == r; and the per-row sums of grad_output when with_bias."""
    device = grad_output.device
    out = torch.zeros(n_rows, dim, dtype=torch.float32, device=device)
    out_bias = torch.zeros(n_rows if with_bias else 0, dtype=torch.float32, device=device)
    if n_rows == 0 or row_idx.numel() == 0 or (dim == 0 and not with_bias):
        return _keep(out, token), out_bias
    perm, seg_lo, seg_hi = _segments(row_idx, n_rows)
    cfg = _k.segment_config(dim, n_rows, _k.compiled_on_gpu(grad_output))
    grid = (triton_cdiv(n_rows, cfg["BLOCK_R"]), max(1, triton_cdiv(dim, cfg["BLOCK_D"])))
    _common.launch_triton(_k._segment_grad_kernel, grid)(
        grad_output, other, other_idx, perm, seg_lo, seg_hi, out, out_bias if with_bias else out, token,
        n_rows, dim, other.stride(0),
        INT8=other.dtype == torch.uint8, HAS_BIAS=with_bias, GPU_RN=_k.compiled_on_gpu(grad_output), **cfg)
    return out, out_bias


# ----------------------------------------------------------------------------- the ops
def _pair_scores_triton(user_emb: Tensor, item_emb: Tensor, user_idx: Tensor, item_idx: Tensor,
                        item_bias: Optional[Tensor]) -> Tensor:
    _, user_idx, item_idx = _s.check_pair_args(user_emb, item_emb, user_idx, item_idx, item_bias)
    token = CHECK_PAIR(user_emb, item_emb, user_idx, item_idx)
    user_emb, item_emb = user_emb.contiguous(), item_emb.contiguous()
    bias = None if item_bias is None else item_bias.contiguous()
    return _gather_dot(user_emb, item_emb, user_idx.contiguous(), item_idx.contiguous(), bias, token, False)[0]


def _pair_scores_backward_triton(grad_output: Tensor, user_emb: Tensor, item_emb: Tensor, user_idx: Tensor,
                                 item_idx: Tensor, item_bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    _, user_idx, item_idx = _s.check_pair_args(user_emb, item_emb, user_idx, item_idx, item_bias)
    _common.check_tensor(grad_output, "grad_output", dtypes=_common.FLOAT_DTYPES, dim=1)
    if grad_output.shape[0] != user_idx.shape[0]:
        raise ValueError(f"grad_output must have one value per pair ({user_idx.shape[0]}), "
                         f"got shape {tuple(grad_output.shape)}")
    token = CHECK_PAIR(user_emb, item_emb, user_idx, item_idx)
    grad_output = grad_output.contiguous()
    user_emb, item_emb = user_emb.contiguous(), item_emb.contiguous()
    user_idx, item_idx = user_idx.contiguous(), item_idx.contiguous()
    dim = _dim(item_emb)
    quantized = item_emb.dtype == torch.uint8
    grad_user, _ = _segment_grad(grad_output, item_emb, item_idx, user_idx, user_emb.shape[0], dim, False, token)
    grad_user = grad_user.to(user_emb.dtype)
    # the item side: the item table's gradient (float tables) and the bias gradient, one launch
    if quantized and item_bias is None:
        grad_item = grad_bias = None
    else:
        grad_item, grad_bias = _segment_grad(grad_output, user_emb, user_idx, item_idx, item_emb.shape[0],
                                             0 if quantized else dim, item_bias is not None, token)
    device = user_emb.device
    if quantized:  # quantized tables are inference-only
        grad_item = torch.empty(0, dtype=torch.float32, device=device)
    else:
        grad_item = grad_item.to(item_emb.dtype)
    if item_bias is None:
        grad_bias = torch.empty(0, dtype=torch.float32, device=device)
    else:
        grad_bias = grad_bias.to(item_bias.dtype)
    return grad_user, grad_item, grad_bias


def _segment_of(offsets: Tensor, nnz: int) -> Tensor:
    """The row of each of the nnz entries of a checked CSR list (static shape)."""
    positions = torch.arange(nnz, device=offsets.device)
    # over the whole offsets (offsets[0] = 0 <= p always), not the view offsets[1:]: under torch
    # 2.11's Inductor on a GPU candidate_scores came out wrong (eager and aot_eager were right), and
    # searchsorted over that view is the suspect (docs/performance.md, "First GPU check")
    return torch.searchsorted(offsets.long(), positions, right=True) - 1


def _candidate_scores_triton(queries: Tensor, items: Tensor, cand_offsets: Tensor, cand_items: Tensor,
                             item_bias: Optional[Tensor]) -> Tensor:
    _, cand_offsets, cand_items = _s.check_candidate_args(queries, items, cand_offsets, cand_items, item_bias)
    token = CHECK_CANDIDATES(items, cand_offsets, cand_items)
    rows = _segment_of(cand_offsets, cand_items.shape[0])
    bias = None if item_bias is None else item_bias.contiguous()
    return _gather_dot(queries.contiguous(), items.contiguous(), rows, cand_items.contiguous(), bias, token, False)[0]


def _candidate_topk_triton(queries: Tensor, items: Tensor, cand_offsets: Tensor, cand_items: Tensor, k: int,
                           item_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _s._check_k(k)
    _, cand_offsets, cand_items = _s.check_candidate_args(queries, items, cand_offsets, cand_items, item_bias)
    _s._check_item_count(items)
    token = CHECK_CANDIDATES(items, cand_offsets, cand_items)
    n_users, nnz = queries.shape[0], cand_items.shape[0]
    device = queries.device
    rows = _segment_of(cand_offsets, nnz)
    bias = None if item_bias is None else item_bias.contiguous()
    _, keys = _gather_dot(queries.contiguous(), items.contiguous(), rows, cand_items.contiguous(), bias, token,
                          True)
    # each user's keys in descending order: by key, then stably by user
    order = torch.sort(keys, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    ranked = keys[order]
    offsets = cand_offsets.long()
    slot = torch.arange(k, device=device)
    lengths = offsets[1:] - offsets[:-1]
    pos = (offsets[:-1, None] + slot[None, :]).clamp(max=max(nnz - 1, 0))
    picked = ranked[pos] if nnz > 0 else torch.empty(n_users, k, dtype=torch.int64, device=device)
    top = torch.where(slot[None, :] < lengths[:, None], picked, torch.full_like(picked, _s._KEY_INVALID))
    values, ids = _s._decode(_keep(top, token))
    return values, ids


def _topk_scores_triton(queries: Tensor, items: Tensor, k: int, exclude_offsets: Optional[Tensor],
                        exclude_items: Optional[Tensor], item_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _, exclude_offsets, exclude_items = _s.check_topk_args(queries, items, k, exclude_offsets, exclude_items,
                                                           item_bias)
    n_users, n_items = queries.shape[0], items.shape[0]
    _s._check_item_count(items)
    token = CHECK_TOPK(queries, items, exclude_offsets, exclude_items)
    device = queries.device
    queries, items = queries.contiguous(), items.contiguous()
    bias = None if item_bias is None else item_bias.contiguous()
    ex_offsets = ex_sorted = None
    if exclude_offsets is not None:
        # every user's list sorted ascending (the kernel walks it): one sort of (user, item)
        ex_offsets = exclude_offsets.long().contiguous()
        owner = _segment_of(ex_offsets, exclude_items.shape[0])
        composite = owner * max(n_items, 1) + exclude_items.long()
        ex_sorted = (torch.sort(composite).values - owner * max(n_items, 1)).contiguous()
    if n_users == 0 or k == 0:  # nothing to rank (the checks above still ran)
        values, ids = _s._topk_outputs(queries, k)
        return _keep(values.fill_(float("-inf")), token), ids.fill_(-1)
    dim = _dim(items)
    chunk = max(1, int(_s.TOPK_CHUNK))
    user_step = max(1, int(_s.TOPK_USER_CHUNK))
    on_gpu = _k.compiled_on_gpu(queries)
    dot_fp32 = not on_gpu or queries.dtype == torch.float32 or queries.dtype != items.dtype
    out_keys = []
    for u0 in range(0, n_users, user_step):
        u1 = min(n_users, u0 + user_step)
        q = queries[u0:u1]
        running = torch.full((u1 - u0, k), _s._KEY_INVALID, dtype=torch.int64, device=device)
        for start in range(0, n_items, chunk):
            stop = min(n_items, start + chunk)
            cfg = _k.topk_config(u1 - u0, stop - start, dim, k, on_gpu)
            span = cfg.pop("span")
            grid = (triton_cdiv(u1 - u0, cfg["BLOCK_U"]), triton_cdiv(stop - start, span))
            # every key of the chunk, or each program's top KP (selected in the kernel)
            width = grid[1] * cfg["KP"] if cfg["KP"] else stop - start
            keys = torch.empty(u1 - u0, width, dtype=torch.int64, device=device)
            _common.launch_triton(_k._topk_keys_kernel, grid)(
                q, items, bias if bias is not None else q, ex_offsets[u0:] if ex_offsets is not None else keys,
                ex_sorted if ex_sorted is not None else keys, keys, token,
                u1 - u0, start, stop, span, dim, items.stride(0),
                HAS_BIAS=bias is not None, HAS_EX=ex_offsets is not None, INT8=items.dtype == torch.uint8,
                GPU_RN=on_gpu, DOT_FP32=dot_fp32, **cfg)
            # the chunk's own top-k first: the merge then concatenates only [users, <= 2k]
            best = torch.topk(keys, min(k, width), dim=1).values
            running = _s._top_keys(torch.cat([running, best], dim=1), k)
        out_keys.append(running)
    top = out_keys[0] if len(out_keys) == 1 else torch.cat(out_keys)
    return _s._decode(_keep(top, token))


# ----------------------------------------------------------------------------- registration
# (name, body, fake kernel, opaque to torch.compile on a GPU too): the top-k bodies pick chunks and
# kernel configurations from k, so traced, each k compiled a graph of its own (5 graphs for
# k = 1..11 on an H200, 2026-11-30); under the interpreter every op is opaque
_OPS = (("pair_scores", _pair_scores_triton, _s._pair_scores_fake, False),
        ("pair_scores_backward", _pair_scores_backward_triton, _s._pair_scores_backward_fake, False),
        ("candidate_scores", _candidate_scores_triton, _s._candidate_scores_fake, False),
        ("candidate_topk", _candidate_topk_triton, _s._candidate_topk_fake, True),
        ("topk_scores", _topk_scores_triton, _s._topk_scores_fake, True))
OPS = {}
for _name, _fn, _fake, _opaque in _OPS:
    _op = None
    if _k is not None:
        _op = torch.library.triton_op(f"{_common.LIB}::{_name}_triton", _fn, mutates_args=())
        _op.register_fake(_fake)  # the shared fake kernel (a triton_op's own would trace the body)
        if _k.interpreted() or _opaque:
            _common.keep_opaque_to_compile(_op)
    OPS[_name] = _op
    _backend.register(_name, "triton", _op, devices=_common.triton_devices(), reason=_REASON)

if _k is not None:
    # the autograd formulas, calling the Triton pair_scores backward
    _s.register_scoring_autograd({name: {"triton": OPS[name]} for name in ("pair_scores", "candidate_scores",
                                                                          "candidate_topk", "topk_scores")},
                                 {**_s._PAIR_BACKWARD_VARIANTS, "triton": OPS["pair_scores_backward"]})
