"""Embedding-row pruning: a smaller table plus an id remap applied inside the lookup.

`prune_embedding_rows(weight, amount, by=...)` keeps the rows that matter most, by access
frequency (the rows looked up most often in the training data) or by row norm, and returns the
compact table with a remap `[num_embeddings] -> [0, kept]`. Pruned ids all map to ONE shared
default row, the table's last row, which is (default=...):

  "mean"  the mean of the pruned rows (the default: an unseen/rare id gets the average rare-id
          vector, which is what the model would predict without knowing which rare id it is)
  "zero"  zeros
  "drop"  bags only: the shared row is the bag's padding_idx, so pruned ids are skipped and not
          counted by mode="mean" (the pooled history is the mean of the kept items)

`RemappedEmbedding` (an nn.Embedding drop-in) and `RemappedEmbeddingBag` (an nn.EmbeddingBag
drop-in) apply the remap and look up through `FusedEmbeddingBag`, so the compact table can be
quantized to int8/int4 row-wise with `.quantize(bits)`. Without a remap they are simply
quantizable embeddings.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..nn.embedding import FusedEmbeddingBag
from ..ops.rowwise import dequantize_rowwise

DEFAULTS = ("mean", "zero", "drop")


def _row_scores(weight: Tensor, by: str, counts: Optional[Tensor]) -> Tensor:
    if by == "frequency":
        if counts is None:
            raise ValueError("by='frequency' needs counts (how often each row is looked up)")
        if counts.shape != (weight.shape[0],):
            raise ValueError(f"counts must have shape [{weight.shape[0]}], got {tuple(counts.shape)}")
        return counts.double()
    if by == "norm":
        return weight.detach().double().norm(dim=1)
    raise ValueError(f"by must be 'frequency' or 'norm', got {by!r}")


@torch.no_grad()
def prune_embedding_rows(weight: Tensor, amount: float, *, by: str = "frequency", counts: Optional[Tensor] = None,
                         default: str = "mean") -> tuple[Tensor, Tensor]:
    """(compact table [kept + 1, D], remap int64 [N]) keeping all but round(amount * N) rows
    (at least one); the highest `by` scores stay, ties to the lower id. Kept rows keep their
    relative order; remap[pruned id] = kept (the shared default row, see the module doc).
    With default="drop" the last row is zeros and is meant to be a bag's padding_idx."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a float [N, D] table")
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a fraction in [0, 1], got {amount!r}")
    if default not in DEFAULTS:
        raise ValueError(f"default must be one of {DEFAULTS}, got {default!r}")
    n = weight.shape[0]
    drop_count = min(round(amount * n), n - 1)
    scores = _row_scores(weight, by, counts)
    # ascending by score, ties: the higher id first, so that the lower id is the one kept
    order = torch.arange(n - 1, -1, -1, device=scores.device)
    order = order[torch.sort(scores[order], stable=True).indices]
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[:drop_count]] = False
    kept = keep.nonzero().flatten()
    remap = torch.full((n,), kept.numel(), dtype=torch.int64)
    remap[kept] = torch.arange(kept.numel())
    w = weight.detach()
    if default == "mean" and drop_count:
        extra = w[~keep.to(w.device)].float().mean(0, keepdim=True).to(w.dtype)
    else:
        extra = torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device)
    return torch.cat([w[kept.to(w.device)], extra]), remap.to(w.device)


def _check_embedding(emb: nn.Embedding) -> None:
    """Refuse what RemappedEmbedding does not do: max_norm (renormalizes rows in forward),
    scale_grad_by_freq (scales gradients)."""
    if emb.max_norm is not None:
        raise NotImplementedError("nn.Embedding with max_norm is not supported (it renormalizes rows in forward); "
                                  "renormalize the weight yourself")
    if emb.scale_grad_by_freq:
        raise NotImplementedError("nn.Embedding with scale_grad_by_freq=True is not supported")


class RemappedEmbedding(nn.Module):
    """nn.Embedding drop-in over a (possibly compact, possibly quantized) table: forward(ids)
    -> [*ids.shape, D] = table[remap[ids]]. `weight` is the logical [num_embeddings, D] float
    table (dequantized and expanded through the remap: computed on access; it is the Parameter
    itself when the table is float and there is no remap). Float tables train."""

    def __init__(self, table: Tensor, remap: Optional[Tensor] = None, *, num_embeddings: Optional[int] = None):
        super().__init__()
        self.table = FusedEmbeddingBag(table.shape[0], table.shape[1], mode="sum", include_last_offset=True,
                                       _weight=table)
        self.register_buffer("remap", None if remap is None else remap.long())
        self.num_embeddings = num_embeddings if num_embeddings is not None else (
            table.shape[0] if remap is None else remap.numel())
        self.embedding_dim = table.shape[1]

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "RemappedEmbedding":
        """Same table (shared Parameter), no remap."""
        _check_embedding(emb)
        module = cls(torch.empty(emb.num_embeddings, emb.embedding_dim, device="meta"))
        module.table.weight = emb.weight
        return module

    @property
    def bits(self) -> Optional[int]:
        return self.table.bits

    def quantize(self, bits: int = 8) -> "RemappedEmbedding":
        self.table.quantize(bits)
        return self

    @property
    def weight(self) -> Tensor:
        w = self.table.weight
        if self.table.bits is not None:
            w = dequantize_rowwise(w, self.table.bits)
        return w if self.remap is None else w[self.remap]

    def forward(self, input: Tensor) -> Tensor:  # nn.Embedding's argument name
        ids = input
        flat = ids.reshape(-1)
        if self.remap is not None:
            flat = self.remap[flat]
        offsets = torch.arange(flat.numel() + 1, device=flat.device, dtype=torch.int64)
        return self.table(flat, offsets).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} ids -> {self.table.num_embeddings} rows, dim {self.embedding_dim}"
                + (f", int{self.bits}" if self.bits else ""))


class RemappedEmbeddingBag(nn.Module):
    """nn.EmbeddingBag drop-in (same forward) that remaps ids before a FusedEmbeddingBag over a
    compact table. default="drop" tables have the shared row as padding_idx (skipped)."""

    def __init__(self, table: Tensor, remap: Optional[Tensor] = None, *, mode: str = "mean",
                 include_last_offset: bool = False, drop_pruned: bool = False):
        super().__init__()
        self.bag = FusedEmbeddingBag(table.shape[0], table.shape[1], mode=mode,
                                     include_last_offset=include_last_offset, _weight=table,
                                     padding_idx=table.shape[0] - 1 if drop_pruned else None)
        self.register_buffer("remap", None if remap is None else remap.long())
        self.num_embeddings = table.shape[0] if remap is None else remap.numel()
        self.embedding_dim = table.shape[1]
        self.mode = mode

    @classmethod
    def from_embedding_bag(cls, bag: Union[nn.EmbeddingBag, FusedEmbeddingBag]) -> "RemappedEmbeddingBag":
        """Same table (shared Parameter, or the packed buffer of a quantized bag) and options
        (padding_idx, sparse, bounds, backend), no remap."""
        module = cls(torch.empty(bag.num_embeddings, bag.embedding_dim, device="meta"), mode=bag.mode,
                     include_last_offset=bag.include_last_offset)
        if isinstance(bag, nn.EmbeddingBag):
            module.bag = FusedEmbeddingBag.from_embedding_bag(bag)  # (refuses max_norm, scale_grad_by_freq)
            return module
        target = module.bag
        target.padding_idx, target.sparse, target.bounds, target.backend = (bag.padding_idx, bag.sparse, bag.bounds,
                                                                            bag.backend)
        if bag.bits is not None:
            target._set_packed(bag.weight, bag.bits)
        else:
            target.weight = bag.weight
        return module

    @property
    def bits(self) -> Optional[int]:
        return self.bag.bits

    def quantize(self, bits: int = 8) -> "RemappedEmbeddingBag":
        self.bag.quantize(bits)
        return self

    @property
    def weight(self) -> Tensor:
        w = self.bag.weight
        if self.bag.bits is not None:
            w = dequantize_rowwise(w, self.bag.bits)
        return w if self.remap is None else w[self.remap]

    def forward(self, input: Tensor, offsets: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> Tensor:
        if self.remap is not None:
            input = self.remap[input]
        return self.bag(input, offsets, per_sample_weights)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} ids -> {self.bag.num_embeddings} rows, dim {self.embedding_dim}, "
                f"mode={self.mode!r}" + (f", int{self.bits}" if self.bits else ""))


def prune_embedding(module: Union[nn.Embedding, nn.EmbeddingBag, FusedEmbeddingBag], amount: float, *,
                    by: str = "frequency", counts: Optional[Tensor] = None, default: str = "mean"
                    ) -> Union[RemappedEmbedding, RemappedEmbeddingBag]:
    """The row-pruned replacement of an embedding module (a new module; `module` is
    untouched): RemappedEmbedding for nn.Embedding, RemappedEmbeddingBag for bags."""
    if isinstance(module, nn.Embedding):
        if default == "drop":
            raise ValueError("default='drop' is for bags; an embedding lookup must return a row")
        _check_embedding(module)
        if module.padding_idx is not None:
            raise ValueError("embeddings with a padding_idx are not supported (its zero row would be pruned first)")
        table, remap = prune_embedding_rows(module.weight, amount, by=by, counts=counts, default=default)
        return RemappedEmbedding(table, remap)
    if isinstance(module, (nn.EmbeddingBag, FusedEmbeddingBag)):
        if getattr(module, "bits", None) is not None:
            raise ValueError("prune the float table, then quantize the result")
        if module.padding_idx is not None:
            raise ValueError("bags with a padding_idx are not supported")
        if getattr(module, "max_norm", None) is not None:
            raise NotImplementedError("bags with max_norm are not supported (it renormalizes rows in forward)")
        table, remap = prune_embedding_rows(module.weight, amount, by=by, counts=counts, default=default)
        return RemappedEmbeddingBag(table, remap, mode=module.mode, include_last_offset=module.include_last_offset,
                                    drop_pruned=default == "drop")
    raise TypeError(f"module must be nn.Embedding, nn.EmbeddingBag or FusedEmbeddingBag, got {type(module).__name__}")
