"""Sparse scoring: user-item pair scores, candidate-list scores and top-k, and fused score + top-k
over a whole item catalog (DESIGN.md §4 "Scoring").

score(u, i) = <queries[u], items[i]> (+ item_bias[i]), products and sums in fp32, output fp32.
Queries are fp32/fp16/bf16 [U, D]; items are fp32/fp16/bf16 [I, D] or an int8 fused row-wise
table uint8 [I, D + 8] (recsys_kernels.ops.rowwise; bits=8 only), dequantized row by row
(pair/candidate scores) or chunk by chunk (topk_scores), never as a whole table.

Ranking rule, the same in every op and backend:
  * higher score first; equal scores: LOWER ITEM ID first (deterministic, unlike torch.topk);
  * NaN scores sort last: after every number including -inf, ties among NaNs again by item id.
    A NaN therefore only shows up in a top-k when fewer than k non-NaN items are available;
  * padding (a user with fewer than k candidates / non-excluded items) comes after everything,
    as value -inf with id -1. A real item scoring -inf keeps its id, so ids tell the two apart.
candidate_topk ranks the candidate list as given: an item listed twice for a user is two
entries (same score, same id) and may fill two slots.

topk_scores never materialises the [U, I] score matrix: it scores TOPK_CHUNK items at a time
(and at most TOPK_USER_CHUNK users at a time), keeps a running top-k per user and merges it with
each chunk with torch.topk on an int64 key that packs (score, lower id first) into one number
and so is unique per item: the answer does not depend on topk's order among equal values.
Item ids must be < 2^32 for that key.

Exclusion (exclude_offsets / exclude_items) is a CSR list of item ids per user, e.g. items
already seen; excluded items never appear; duplicates in a list are harmless.

Autograd: pair_scores has grads for user_emb, item_emb (float tables only) and item_bias, dense,
in the input dtypes, duplicated indices accumulating. The backward calls pair_scores_backward of
the same backend as the forward. candidate_scores, and the values of candidate_topk and
topk_scores, have the same gradients: each is the score of a (user, item) pair, and their
backward is pair_scores' over those pairs (the ranking itself is piecewise constant, as in
torch.topk; padding slots carry no gradient).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _common
from .rowwise import check_packed_table, dequantize_rows

TOPK_CHUNK = 16384  # items scored at once by topk_scores (tests shrink it to exercise merging)
TOPK_USER_CHUNK = 1024  # users at once: bounds the [users, TOPK_CHUNK] score and key buffers

# Ranking key, int64, larger = ranked first: (score ordinal << 32) | (2^32 - 1 - item id).
# The ordinal is the fp32 bit pattern made monotone (so every score keeps its order); below
# fp32 -inf's ordinal come NaN, then "not an item" (padding / excluded), taking the ordinals of
# negative-NaN bit patterns, which never occur after the NaN remap. The id part makes keys unique
# per (score, item), so the non-stable torch.topk gives a deterministic answer and ties go to the
# lower id. Item ids must be < 2^32.
_ORD_NEG_INF = -2139095041  # ordinal of fp32 -inf (bits 0xff800000 ^ 0x7fffffff)
_ORD_NAN = _ORD_NEG_INF - 1
_KEY_INVALID = (_ORD_NEG_INF - 2) << 32
_ID_MASK = 0xFFFFFFFF
_MAX_ITEMS = 1 << 32


# ----------------------------------------------------------------------------- value checks
def _check_index_range(idx: Tensor, n: int, name: str) -> None:
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name}: index {bad} out of range [0, {n})")


def _check_offsets(offsets: Tensor, nnz: int, name: str) -> None:
    if offsets.numel() == 0:
        raise ValueError(f"{name} must have at least one element (offsets[0] = 0)")
    if int(offsets[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(offsets[0])}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if int(offsets[-1]) != nnz:
        raise ValueError(f"{name}[-1] must equal the number of items listed ({nnz}), got {int(offsets[-1])}")


def _check_item_count(items: Tensor) -> None:
    if items.shape[0] > _MAX_ITEMS:
        raise ValueError(f"items: top-k ranks at most 2^32 items, got {items.shape[0]}")


# ----------------------------------------------------------------------------- shared pieces
def _item_rows(items: Tensor, idx: Tensor) -> Tensor:
    """fp32 rows items[idx] of a float table or an int8 row-wise table."""
    rows = items[idx]
    return dequantize_rows(rows, 8) if items.dtype == torch.uint8 else rows.float()


def _item_slice(items: Tensor, start: int, stop: int) -> Tensor:
    rows = items[start:stop]
    return dequantize_rows(rows, 8) if items.dtype == torch.uint8 else rows.float()


def _gather_dot(queries: Tensor, items: Tensor, q_idx: Tensor, i_idx: Tensor,
                item_bias: Optional[Tensor]) -> Tensor:
    q_idx, i_idx = q_idx.long(), i_idx.long()
    scores = (queries[q_idx].float() * _item_rows(items, i_idx)).sum(dim=1)
    if item_bias is not None:
        scores = scores + item_bias[i_idx].float()
    return scores.contiguous()


def _segment_ids(offsets: Tensor) -> Tensor:
    """The row (user) of every entry of a checked CSR list."""
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)


def _rank_key(scores: Tensor, ids: Tensor, valid: Optional[Tensor]) -> Tensor:
    """The ranking key (see _ORD_NEG_INF) of fp32 scores of items `ids` (broadcastable to
    scores); entries where `valid` is False rank last. In place where possible: this is the
    reference's hot loop."""
    scores = (scores + 0.0).contiguous()  # -0.0 -> +0.0: equal scores need equal ordinals
    key = scores.view(torch.int32).long()
    key = torch.where(key >= 0, key, key ^ 0x7FFFFFFF)  # monotone in the float value
    key.masked_fill_(torch.isnan(scores), _ORD_NAN)
    key.bitwise_left_shift_(32).bitwise_or_(_ID_MASK - ids)
    if valid is not None:
        key.masked_fill_(~valid, _KEY_INVALID)
    return key


def _top_keys(key: Tensor, k: int) -> Tensor:
    """The k largest keys of each row, largest first (invalid keys pad rows shorter than k).
    Keys are unique per (score, item), so torch.topk's unspecified order among equal values does
    not matter: only identical entries (padding, an item listed twice) can share a key."""
    if key.shape[1] < k:
        key = torch.cat([key, key.new_full((key.shape[0], k - key.shape[1]), _KEY_INVALID)], dim=1)
    return torch.topk(key, k, dim=1).values


def _decode(key: Tensor) -> tuple[Tensor, Tensor]:
    """(values fp32, ids int64) of ranking keys; invalid keys give (-inf, -1). Exact for every
    score (a -0.0 score comes back as +0.0, a NaN as the default NaN)."""
    invalid = key == _KEY_INVALID
    ids = (_ID_MASK - (key & _ID_MASK)).masked_fill_(invalid, -1)
    ordinal = key >> 32
    bits = torch.where(ordinal >= 0, ordinal, ordinal ^ 0x7FFFFFFF).int()
    values = bits.view(torch.float32).masked_fill(ordinal == _ORD_NAN, float("nan"))
    return values.masked_fill_(invalid, float("-inf")).contiguous(), ids.contiguous()


# ----------------------------------------------------------------------------- pair_scores
def _pair_scores_ref(user_emb: Tensor, item_emb: Tensor, user_idx: Tensor, item_idx: Tensor,
                     item_bias: Optional[Tensor]) -> Tensor:
    _check_index_range(user_idx, user_emb.shape[0], "user_idx")
    _check_index_range(item_idx, item_emb.shape[0], "item_idx")
    return _gather_dot(user_emb, item_emb, user_idx, item_idx, item_bias)


def _pair_scores_fake(user_emb, item_emb, user_idx, item_idx, item_bias):
    return user_emb.new_empty(user_idx.shape[0], dtype=torch.float32)


def _pair_scores_backward_ref(grad_output: Tensor, user_emb: Tensor, item_emb: Tensor, user_idx: Tensor,
                              item_idx: Tensor, item_bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    _check_index_range(user_idx, user_emb.shape[0], "user_idx")
    _check_index_range(item_idx, item_emb.shape[0], "item_idx")
    u_idx, i_idx = user_idx.long(), item_idx.long()
    g = grad_output.float().unsqueeze(1)
    # accumulate in fp32 (duplicate indices add up), cast to the input dtype once at the end
    grad_user = torch.zeros(user_emb.shape, dtype=torch.float32, device=user_emb.device)
    grad_user.index_add_(0, u_idx, g * _item_rows(item_emb, i_idx))
    grad_user = grad_user.to(user_emb.dtype)
    if item_emb.dtype == torch.uint8:  # quantized tables are inference-only
        grad_item = torch.empty(0, dtype=torch.float32, device=item_emb.device)
    else:
        grad_item = torch.zeros(item_emb.shape, dtype=torch.float32, device=item_emb.device)
        grad_item.index_add_(0, i_idx, g * user_emb[u_idx].float())
        grad_item = grad_item.to(item_emb.dtype)
    if item_bias is None:
        grad_bias = torch.empty(0, dtype=torch.float32, device=user_emb.device)
    else:
        grad_bias = torch.zeros(item_bias.shape, dtype=torch.float32, device=item_bias.device)
        grad_bias.index_add_(0, i_idx, g.squeeze(1))
        grad_bias = grad_bias.to(item_bias.dtype)
    return grad_user, grad_item, grad_bias


def _pair_scores_backward_fake(grad_output, user_emb, item_emb, user_idx, item_idx, item_bias):
    grad_user = user_emb.new_empty(user_emb.shape)
    if item_emb.dtype == torch.uint8:
        grad_item = user_emb.new_empty(0, dtype=torch.float32)
    else:
        grad_item = item_emb.new_empty(item_emb.shape)
    if item_bias is None:
        grad_bias = user_emb.new_empty(0, dtype=torch.float32)
    else:
        grad_bias = item_bias.new_empty(item_bias.shape)
    return grad_user, grad_item, grad_bias


_PAIR_VARIANTS = _common.define_op("pair_scores", _pair_scores_ref, _pair_scores_fake)
_PAIR_BACKWARD_VARIANTS = _common.define_op(
    "pair_scores_backward", _pair_scores_backward_ref, _pair_scores_backward_fake)


# ----------------------------------------------------------------------------- candidate ops
def _candidate_scores_ref(queries: Tensor, items: Tensor, cand_offsets: Tensor, cand_items: Tensor,
                          item_bias: Optional[Tensor]) -> Tensor:
    _check_offsets(cand_offsets, cand_items.shape[0], "cand_offsets")
    _check_index_range(cand_items, items.shape[0], "cand_items")
    return _gather_dot(queries, items, _segment_ids(cand_offsets), cand_items, item_bias)


def _candidate_scores_fake(queries, items, cand_offsets, cand_items, item_bias):
    return queries.new_empty(cand_items.shape[0], dtype=torch.float32)


def _candidate_topk_ref(queries: Tensor, items: Tensor, cand_offsets: Tensor, cand_items: Tensor, k: int,
                        item_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    _check_item_count(items)
    scores = _candidate_scores_ref(queries, items, cand_offsets, cand_items, item_bias)
    n_users, nnz = queries.shape[0], cand_items.shape[0]
    offsets = cand_offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    width = int(lengths.max()) if nnz > 0 else 0
    # [U, width] padded layout of the candidate lists
    rows = _segment_ids(cand_offsets)
    cols = torch.arange(nnz, device=offsets.device) - offsets[rows]
    device = queries.device
    key = torch.full((n_users, width), _KEY_INVALID, dtype=torch.int64, device=device)
    key[rows, cols] = _rank_key(scores, cand_items.long(), None)
    return _decode(_top_keys(key, k))


def _topk_outputs(queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Uninitialised (values, ids) [U, k]: the fake kernels' answer."""
    return (queries.new_empty(queries.shape[0], k, dtype=torch.float32),
            queries.new_empty(queries.shape[0], k, dtype=torch.int64))


def _candidate_topk_fake(queries, items, cand_offsets, cand_items, k, item_bias):
    return _topk_outputs(queries, k)


_CANDIDATE_VARIANTS = _common.define_op("candidate_scores", _candidate_scores_ref, _candidate_scores_fake)
_CANDIDATE_TOPK_VARIANTS = _common.define_op("candidate_topk", _candidate_topk_ref, _candidate_topk_fake)


# ----------------------------------------------------------------------------- topk_scores
def _topk_block(queries: Tensor, items: Tensor, k: int, ex_rows: Optional[Tensor], ex_items: Optional[Tensor],
                item_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Running top-k of a block of users over the catalog, TOPK_CHUNK items at a time.
    ex_rows / ex_items: the block's exclusions as (row in block, item id) pairs, or None."""
    n_users, n_items = queries.shape[0], items.shape[0]
    device = queries.device
    q = queries.float()
    key = torch.full((n_users, k), _KEY_INVALID, dtype=torch.int64, device=device)  # running top-k
    chunk = max(1, int(TOPK_CHUNK))
    for start in range(0, n_items, chunk):
        stop = min(n_items, start + chunk)
        scores = q @ _item_slice(items, start, stop).t()  # [users, chunk] fp32
        if item_bias is not None:
            scores = scores + item_bias[start:stop].float()
        valid = None
        if ex_items is not None:
            valid = torch.ones_like(scores, dtype=torch.bool)
            here = (ex_items >= start) & (ex_items < stop)
            valid[ex_rows[here], ex_items[here] - start] = False
        chunk_key = _rank_key(scores, torch.arange(start, stop, device=device), valid)
        # the chunk's own top-k first: the merge then concatenates only [users, <= 2k]
        chunk_key = torch.topk(chunk_key, min(k, stop - start), dim=1).values
        key = _top_keys(torch.cat([key, chunk_key], dim=1), k)
    return _decode(key)


def _topk_scores_ref(queries: Tensor, items: Tensor, k: int, exclude_offsets: Optional[Tensor],
                     exclude_items: Optional[Tensor], item_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    n_users, n_items = queries.shape[0], items.shape[0]
    if k < 0 or k > n_items:
        raise ValueError(f"k must be in [0, {n_items}] (the number of items), got {k}")
    _check_item_count(items)
    if (exclude_offsets is None) != (exclude_items is None):
        raise ValueError("exclude_offsets and exclude_items must be given together")
    ex_offsets = None
    if exclude_offsets is not None:
        _check_offsets(exclude_offsets, exclude_items.shape[0], "exclude_offsets")
        _check_index_range(exclude_items, n_items, "exclude_items")
        ex_offsets = exclude_offsets.long()
        ex_rows_all = _segment_ids(exclude_offsets)
        ex_items_all = exclude_items.long()
    out_values, out_ids = [], []
    step = max(1, int(TOPK_USER_CHUNK))
    for u0 in range(0, n_users, step):
        u1 = min(n_users, u0 + step)
        ex_rows = ex_items = None
        if ex_offsets is not None:
            lo, hi = int(ex_offsets[u0]), int(ex_offsets[u1])
            ex_rows, ex_items = ex_rows_all[lo:hi] - u0, ex_items_all[lo:hi]
        v, i = _topk_block(queries[u0:u1], items, k, ex_rows, ex_items, item_bias)
        out_values.append(v)
        out_ids.append(i)
    if not out_values:  # no users: [0, k] outputs
        return _topk_outputs(queries, k)
    if len(out_values) == 1:
        return out_values[0], out_ids[0]
    return torch.cat(out_values), torch.cat(out_ids)


def _topk_scores_fake(queries, items, k, exclude_offsets, exclude_items, item_bias):
    return _topk_outputs(queries, k)


_TOPK_VARIANTS = _common.define_op("topk_scores", _topk_scores_ref, _topk_scores_fake)


# ----------------------------------------------------------------------------- autograd
# Every scoring op returns scores of (user, item) pairs, so each backward is pair_scores' backward
# over its pairs: pair_scores' own; candidate_scores' are (the user of each CSR entry, cand_items);
# the top-k ops' are (user, returned id) for every slot, where a padding slot (id -1) carries no
# gradient (its pair is pointed at item 0 with a zero gradient). The ranking itself is piecewise
# constant, as in torch.topk, whose values are differentiable the same way.
def _pair_setup_context(ctx, inputs, output):
    user_emb, item_emb, user_idx, item_idx, item_bias = inputs
    ctx.save_for_backward(user_emb, item_emb, user_idx, item_idx, item_bias)


def _candidate_setup_context(ctx, inputs, output):
    queries, items, cand_offsets, cand_items, item_bias = inputs
    ctx.save_for_backward(queries, items, cand_offsets, cand_items, item_bias)


def _topk_setup_context(ctx, inputs, output):
    queries, items, *_, item_bias = inputs  # candidate_topk and topk_scores: the bias comes last
    ctx.save_for_backward(queries, items, item_bias, output[1])


def _scores_backward(ctx, pick, grad, queries, items, item_bias, user_idx, item_idx):
    """The (grad queries, grad items, grad bias) of scores of the pairs (user_idx, item_idx)."""
    grad_user, grad_item, grad_bias = pick(queries.is_cuda)(grad.contiguous(), queries, items, user_idx, item_idx,
                                                            item_bias)
    needs = ctx.needs_input_grad
    return (grad_user if needs[0] else None, grad_item if needs[1] and items.dtype != torch.uint8 else None,
            grad_bias if item_bias is not None and needs[-1] else None)


def _make_pair_backward(pick):
    """pick(is_cuda) gives the pair_scores_backward op to call (that of the forward's backend)."""
    def backward(ctx, grad_output):
        user_emb, item_emb, user_idx, item_idx, item_bias = ctx.saved_tensors
        g_u, g_i, g_b = _scores_backward(ctx, pick, grad_output, user_emb, item_emb, item_bias, user_idx, item_idx)
        return g_u, g_i, None, None, g_b
    return backward


def _make_candidate_backward(pick):
    def backward(ctx, grad):
        queries, items, cand_offsets, cand_items, item_bias = ctx.saved_tensors
        offsets = cand_offsets.long()
        users = torch.repeat_interleave(torch.arange(queries.shape[0], device=offsets.device),
                                        offsets[1:] - offsets[:-1], output_size=cand_items.shape[0])
        g_q, g_i, g_b = _scores_backward(ctx, pick, grad, queries, items, item_bias, users, cand_items.long())
        return g_q, g_i, None, None, g_b
    return backward


def _make_topk_backward(pick):
    """candidate_topk and topk_scores: three inputs between the items and the bias (the candidate
    list and k; k and the exclusion list), none of them differentiable."""
    def backward(ctx, grad_values, grad_ids):
        queries, items, item_bias, ids = ctx.saved_tensors
        if items.shape[0] == 0:  # every slot is padding, and there is no item 0 to point it at
            zero_bias = None if item_bias is None else torch.zeros_like(item_bias)
            return (torch.zeros_like(queries), torch.zeros_like(items), None, None, None, zero_bias)
        n_users, k = ids.shape
        users = torch.arange(n_users, device=ids.device).repeat_interleave(k)
        padding = ids < 0
        g_q, g_i, g_b = _scores_backward(ctx, pick, grad_values.float().masked_fill(padding, 0.0).reshape(-1),
                                         queries, items, item_bias, users, ids.clamp(min=0).reshape(-1))
        return g_q, g_i, None, None, None, g_b
    return backward


def register_scoring_autograd(forward_variants: dict, backward_variants: dict) -> None:
    """The autograd formulas of the scoring ops on the given variants of each ({backend: op} per
    op name), calling pair_scores_backward of the same backend (here for the native and
    reference ops; scoring_triton.py for its own)."""
    formulas = {"pair_scores": (_make_pair_backward, _pair_setup_context),
                "candidate_scores": (_make_candidate_backward, _candidate_setup_context),
                "candidate_topk": (_make_topk_backward, _topk_setup_context),
                "topk_scores": (_make_topk_backward, _topk_setup_context)}
    for name, variants in forward_variants.items():
        make_backward, setup_context = formulas[name]
        _common.register_autograd_with_backward_op(variants, backward_variants, "pair_scores_backward",
                                                   make_backward, setup_context)


register_scoring_autograd({"pair_scores": _PAIR_VARIANTS, "candidate_scores": _CANDIDATE_VARIANTS,
                           "candidate_topk": _CANDIDATE_TOPK_VARIANTS, "topk_scores": _TOPK_VARIANTS},
                          _PAIR_BACKWARD_VARIANTS)


# ----------------------------------------------------------------------------- front doors
def _check_items(items, name: str) -> int:
    """A float table [I, D] or an int8 fused row-wise table [I, D + 8]; returns D."""
    if isinstance(items, Tensor) and items.dtype == torch.uint8:
        return check_packed_table(items, 8, name)
    _common.check_tensor(items, name, dtypes=_common.FLOAT_DTYPES + (torch.uint8,), dim=2)
    return items.shape[1]


def _check_queries(queries, name: str, dim: int, items_name: str) -> None:
    _common.check_tensor(queries, name, dtypes=_common.FLOAT_DTYPES, dim=2)
    if queries.shape[1] != dim:
        raise ValueError(f"{name} has dim {queries.shape[1]} but {items_name} has dim {dim}")


def _check_bias(item_bias, n_items: int) -> None:
    if item_bias is None:
        return
    _common.check_tensor(item_bias, "item_bias", dtypes=_common.FLOAT_DTYPES, dim=1)
    if item_bias.shape[0] != n_items:
        raise ValueError(f"item_bias must have one value per item ({n_items}), got {item_bias.shape[0]}")


def _check_index_pair(a, a_name: str, b, b_name: str) -> tuple[Tensor, Tensor]:
    """Two 1-D index tensors; mixed int32/int64 become int64 so kernels see one index type."""
    _common.check_tensor(a, a_name, dtypes=_common.INDEX_DTYPES, dim=1)
    _common.check_tensor(b, b_name, dtypes=_common.INDEX_DTYPES, dim=1)
    if a.dtype != b.dtype:
        a, b = a.long(), b.long()
    return a.contiguous(), b.contiguous()


def _check_k(k, upper: int | None = None) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if upper is not None and k > upper:
        raise ValueError(f"k must be <= the number of items ({upper}), got {k}")


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def check_pair_args(user_emb, item_emb, user_idx, item_idx, item_bias):
    """pair_scores' metadata checks (its front door's, and the Triton ops' called directly, whose
    kernels trust the shapes); returns (device, user_idx, item_idx) in one index dtype."""
    dim = _check_items(item_emb, "item_emb")
    _check_queries(user_emb, "user_emb", dim, "item_emb")
    user_idx, item_idx = _check_index_pair(user_idx, "user_idx", item_idx, "item_idx")
    if user_idx.shape[0] != item_idx.shape[0]:
        raise ValueError(f"user_idx and item_idx must have the same length, got {user_idx.shape[0]} "
                         f"and {item_idx.shape[0]}")
    _check_bias(item_bias, item_emb.shape[0])
    device = _common.check_same_device((user_emb, item_emb, user_idx, item_idx, item_bias),
                                       ("user_emb", "item_emb", "user_idx", "item_idx", "item_bias"))
    return device, user_idx, item_idx


def pair_scores(user_emb: Tensor, item_emb: Tensor, user_idx: Tensor, item_idx: Tensor,
                item_bias: Optional[Tensor] = None, *, backend: str | None = None) -> Tensor:
    """scores[p] = <user_emb[user_idx[p]], item_emb[item_idx[p]]> (+ item_bias[item_idx[p]]),
    fp32 [P]. Differentiable in user_emb, item_emb (float tables) and item_bias."""
    out = _common.call_cpu_op_directly("pair_scores", backend, user_emb, item_emb, user_idx, item_idx, item_bias)
    if out is not None:  # the C++ op checked the arguments itself
        return out
    device, user_idx, item_idx = check_pair_args(user_emb, item_emb, user_idx, item_idx, item_bias)
    return _common.call("pair_scores", device, backend, user_emb.contiguous(), item_emb.contiguous(),
                        user_idx, item_idx, _opt(item_bias))


def check_candidate_args(queries, items, cand_offsets, cand_items, item_bias):
    """candidate_scores' / candidate_topk's metadata checks (front doors and Triton ops); returns
    (device, cand_offsets, cand_items) in one index dtype."""
    dim = _check_items(items, "items")
    _check_queries(queries, "queries", dim, "items")
    cand_offsets, cand_items = _check_index_pair(cand_offsets, "cand_offsets", cand_items, "cand_items")
    if cand_offsets.shape[0] != queries.shape[0] + 1:
        raise ValueError(f"cand_offsets must have U + 1 = {queries.shape[0] + 1} elements, "
                         f"got {cand_offsets.shape[0]}")
    _check_bias(item_bias, items.shape[0])
    device = _common.check_same_device((queries, items, cand_offsets, cand_items, item_bias),
                                       ("queries", "items", "cand_offsets", "cand_items", "item_bias"))
    return device, cand_offsets, cand_items


def candidate_scores(queries: Tensor, items: Tensor, cand_offsets: Tensor, cand_items: Tensor,
                     item_bias: Optional[Tensor] = None, *, backend: str | None = None) -> Tensor:
    """Score of every candidate in a CSR list: user u's candidates are
    cand_items[cand_offsets[u]:cand_offsets[u + 1]]. Returns fp32 [nnz], aligned with cand_items."""
    out = _common.call_cpu_op_directly("candidate_scores", backend, queries, items, cand_offsets, cand_items,
                                       item_bias)
    if out is not None:  # the C++ op checked the arguments itself
        return out
    device, cand_offsets, cand_items = check_candidate_args(queries, items, cand_offsets, cand_items, item_bias)
    return _common.call("candidate_scores", device, backend, queries.contiguous(), items.contiguous(),
                        cand_offsets, cand_items, _opt(item_bias))


def candidate_topk(queries: Tensor, items: Tensor, cand_offsets: Tensor, cand_items: Tensor, k: int,
                   item_bias: Optional[Tensor] = None, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-user top-k of its candidate list: (values fp32 [U, k], item ids int64 [U, k]), ranked
    by the module's rule; padded with -inf / -1 when a user has fewer than k candidates."""
    out = (_common.call_cpu_op_directly("candidate_topk", backend, queries, items, cand_offsets, cand_items, k,
                                        item_bias) if type(k) is int else None)
    if out is not None:  # the C++ op checked the arguments itself
        return out
    _check_k(k)
    device, cand_offsets, cand_items = check_candidate_args(queries, items, cand_offsets, cand_items, item_bias)
    return _common.call("candidate_topk", device, backend, queries.contiguous(), items.contiguous(),
                        cand_offsets, cand_items, k, _opt(item_bias))


def check_topk_args(queries, items, k, exclude_offsets, exclude_items, item_bias):
    """topk_scores' metadata checks (front door and Triton op); returns (device, exclude_offsets,
    exclude_items) in one index dtype."""
    dim = _check_items(items, "items")
    _check_queries(queries, "queries", dim, "items")
    _check_k(k, items.shape[0])
    if (exclude_offsets is None) != (exclude_items is None):
        raise ValueError("exclude_offsets and exclude_items must be given together (or neither)")
    if exclude_offsets is not None:
        exclude_offsets, exclude_items = _check_index_pair(exclude_offsets, "exclude_offsets",
                                                           exclude_items, "exclude_items")
        if exclude_offsets.shape[0] != queries.shape[0] + 1:
            raise ValueError(f"exclude_offsets must have U + 1 = {queries.shape[0] + 1} elements, "
                             f"got {exclude_offsets.shape[0]}")
    _check_bias(item_bias, items.shape[0])
    device = _common.check_same_device((queries, items, exclude_offsets, exclude_items, item_bias),
                                       ("queries", "items", "exclude_offsets", "exclude_items", "item_bias"))
    return device, exclude_offsets, exclude_items


def topk_scores(queries: Tensor, items: Tensor, k: int, *, exclude_offsets: Optional[Tensor] = None,
                exclude_items: Optional[Tensor] = None, item_bias: Optional[Tensor] = None,
                backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Top-k items of the whole catalog for every query, without materialising [U, I]:
    (values fp32 [U, k], item ids int64 [U, k]). exclude_offsets [U + 1] / exclude_items: CSR
    lists of item ids to leave out per user. Padded with -inf / -1 when fewer than k remain."""
    out = (_common.call_cpu_op_directly("topk_scores", backend, queries, items, k, exclude_offsets, exclude_items,
                                        item_bias) if type(k) is int else None)
    if out is not None:  # the C++ op checked the arguments itself
        return out
    device, exclude_offsets, exclude_items = check_topk_args(queries, items, k, exclude_offsets, exclude_items,
                                                             item_bias)
    return _common.call("topk_scores", device, backend, queries.contiguous(), items.contiguous(), k,
                        exclude_offsets, exclude_items, _opt(item_bias))
