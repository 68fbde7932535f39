"""Ranking metrics on tensors: DCG, NDCG, recall, hit rate and MRR at a cut-off k.

Inputs, for U users:
  ranked_ids  [U, k'] int32/int64: each user's recommended item ids, best first. Negative ids
              (-1 by convention, what `topk_scores` pads with) are padding: they never hit.
              An id repeated in a row counts only at its first position.
  relevant    the held-out relevant items per user, as CSR: a tuple (offsets [U+1], items [nnz])
              with user u's items at items[offsets[u]:offsets[u+1]] (see recsys_kernels.data).
              A Python list of U item sets/lists is accepted too and converted. Duplicates
              in a user's relevant items count once.
  k           the cut-off (default k'); a k larger than k' treats the missing positions as
              padding.

Relevance is binary. Position j (0-based) is discounted by 1 / log2(j + 2), i.e. log2(rank + 1)
with 1-based ranks. With R_u the user's relevant set:
  dcg@k      = sum_{j<k} hit_j / log2(j + 2)
  ndcg@k     = dcg@k / idcg@k, idcg@k = sum_{j < min(|R_u|, k)} 1 / log2(j + 2)
  recall@k   = (hits in the top k) / |R_u|
  hit_rate@k = 1 if any of the top k is relevant, else 0
  mrr        = 1 / (1-based rank of the first relevant item in the top k), 0 if none

Users with no relevant items have no defined value: with reduction="none" their entry is NaN,
and reduction="mean" (the default) averages over the other users only (NaN when there are
none). Results are float64 tensors, 0-d for "mean" and [U] for "none", on the CPU.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch
from torch import Tensor

from .data import check_csr, csr_contains, csr_from_lists

Relevant = Union[tuple[Tensor, Tensor], Sequence[Iterable[int]]]

__all__ = ["dcg_at_k", "ndcg_at_k", "recall_at_k", "hit_rate_at_k", "mrr"]


def _prepare(ranked_ids: Tensor, relevant: Relevant, k: int | None, reduction: str):
    """-> (hits [U, k] float64 with duplicates and padding removed, num_relevant [U] int64)."""
    if not isinstance(ranked_ids, Tensor):
        raise TypeError(f"ranked_ids must be a tensor, got {type(ranked_ids).__name__}")
    if ranked_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ranked_ids must be int32 or int64, got {ranked_ids.dtype}")
    if ranked_ids.dim() != 2:
        raise ValueError(f"ranked_ids must be 2-D [users, k], got shape {tuple(ranked_ids.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    num_users, width = ranked_ids.shape
    if k is None:
        k = width
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")

    if isinstance(relevant, tuple) and len(relevant) == 2 and all(isinstance(t, Tensor) for t in relevant):
        offsets, items = relevant
    elif isinstance(relevant, Tensor):
        raise TypeError("relevant must be a CSR tuple (offsets, items) or a list of item sets, got a tensor")
    else:
        offsets, items = csr_from_lists(relevant)
    check_csr(offsets, items, "relevant", num_rows=num_users)
    offsets, items = offsets.cpu().long(), items.cpu().long()
    if bool((items < 0).any()):
        raise ValueError("relevant: item ids must be >= 0")

    ranked = ranked_ids.cpu().long()[:, :k]
    if ranked.shape[1] < k:  # a short list: the missing positions are padding
        ranked = torch.cat([ranked, ranked.new_full((num_users, k - ranked.shape[1]), -1)], dim=1)
    ranked = torch.where(ranked < 0, -1, ranked)

    # an id repeated in a row counts at its first position only: a stable sort keeps equal ids
    # in position order, so every equal id after the first is a repeat
    sorted_ids, perm = torch.sort(ranked, dim=1, stable=True)
    repeat_sorted = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    repeat = torch.zeros_like(repeat_sorted).scatter_(1, perm, repeat_sorted)

    rows = torch.arange(num_users)[:, None].expand_as(ranked)
    hits = csr_contains(offsets, items, rows, ranked) & ~repeat

    # distinct relevant items per user
    if items.numel():
        width_ = int(items.max()) + 1
        row_of = torch.repeat_interleave(torch.arange(num_users), offsets.diff(), output_size=items.numel())
        uniq = torch.unique(row_of * width_ + items)
        num_rel = torch.bincount(uniq // width_, minlength=num_users)
    else:
        num_rel = torch.zeros(num_users, dtype=torch.int64)
    return hits.double(), num_rel, k


def _discounts(k: int) -> Tensor:
    return 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)


def _reduce(values: Tensor, num_rel: Tensor, reduction: str) -> Tensor:
    values = torch.where(num_rel > 0, values, torch.full_like(values, float("nan")))
    if reduction == "none":
        return values
    return torch.nanmean(values) if bool((num_rel > 0).any()) else torch.tensor(float("nan"), dtype=torch.float64)


def dcg_at_k(ranked_ids: Tensor, relevant: Relevant, k: int | None = None, *, reduction: str = "mean") -> Tensor:
    """Discounted cumulative gain at k (binary relevance, 1/log2(rank+1) discount)."""
    hits, num_rel, k = _prepare(ranked_ids, relevant, k, reduction)
    return _reduce(hits @ _discounts(k), num_rel, reduction)


def ndcg_at_k(ranked_ids: Tensor, relevant: Relevant, k: int | None = None, *, reduction: str = "mean") -> Tensor:
    """DCG@k normalised by the ideal DCG@k of min(|relevant|, k) hits at the top."""
    hits, num_rel, k = _prepare(ranked_ids, relevant, k, reduction)
    disc = _discounts(k)
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(disc, 0)])[num_rel.clamp(max=k)]
    dcg = hits @ disc
    return _reduce(dcg / torch.where(ideal > 0, ideal, torch.ones_like(ideal)), num_rel, reduction)


def recall_at_k(ranked_ids: Tensor, relevant: Relevant, k: int | None = None, *, reduction: str = "mean") -> Tensor:
    """Fraction of the user's relevant items that are in the top k (denominator |relevant|)."""
    hits, num_rel, k = _prepare(ranked_ids, relevant, k, reduction)
    return _reduce(hits.sum(1) / num_rel.clamp(min=1).double(), num_rel, reduction)


def hit_rate_at_k(ranked_ids: Tensor, relevant: Relevant, k: int | None = None, *, reduction: str = "mean") -> Tensor:
    """1 where at least one of the top k is relevant, else 0."""
    hits, num_rel, k = _prepare(ranked_ids, relevant, k, reduction)
    return _reduce((hits.sum(1) > 0).double(), num_rel, reduction)


def mrr(ranked_ids: Tensor, relevant: Relevant, k: int | None = None, *, reduction: str = "mean") -> Tensor:
    """Reciprocal 1-based rank of the first relevant item in the top k (0 when there is none)."""
    hits, num_rel, k = _prepare(ranked_ids, relevant, k, reduction)
    any_hit = hits.sum(1) > 0
    first = torch.argmax(hits, dim=1).double()  # first maximum = first hit when there is one
    return _reduce(torch.where(any_hit, 1.0 / (first + 1.0), torch.zeros_like(first)), num_rel, reduction)
