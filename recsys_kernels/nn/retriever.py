"""Retriever: an item catalog built once, searched many times (an index, like FAISS's
IndexFlatIP, but with an item bias, per-query exclusions and deterministic ties).

    retriever = Retriever(item_vectors, item_bias, bits=8)    # int8 row-wise catalog: 4x fewer bytes
    scores, ids = retriever.search(queries, k=100, exclude=(offsets, seen_items))
    scores, ids = retriever.rank(queries, cand_offsets, cand_items, k=10)   # candidate lists
    scores = retriever.score(queries, cand_offsets, cand_items)            # every candidate

Every search is one fused op (recsys_kernels.ops.scoring: topk_scores, candidate_topk,
candidate_scores), so it never materialises the [queries, items] score matrix, and its answer
follows the scoring ops' ranking rule: higher score first, ties to the lower item id, NaN last,
-inf / -1 padding when fewer than k items are left. An exact search: an int8 catalog is ranked
by the scores of its dequantized rows (recall against the fp32 catalog is what int8 costs).

The catalog is a pair of buffers (`items`, `item_bias`), so `state_dict`, `.to(device)` and
`torch.save` carry it; the Recommender's `recommend()` searches through one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

Csr = tuple[Tensor, Tensor]


def _csr(pair, name: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(offsets, items) from a CSR pair given as a tuple or list of two tensors, or (None, None)."""
    if pair is None:
        return None, None
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
        raise TypeError(f"{name} must be a CSR pair of integer tensors (offsets [U + 1], item ids), e.g. "
                        f"(torch.tensor([0, 2, 2]), torch.tensor([5, 9])) for 2 users, the first of whom has seen "
                        f"items 5 and 9; got {type(pair).__name__}"
                        + (f" of {len(pair)} {', '.join(sorted({type(t).__name__ for t in pair}))}"
                           if isinstance(pair, (tuple, list)) else ""))
    return pair[0], pair[1]


class Retriever(nn.Module):
    """Exact top-k inner-product search over a fixed item catalog.

    Args:
      items: [I, D] item vectors (fp32 / fp16 / bf16), or an int8 row-wise table uint8 [I, D + 8]
        (recsys_kernels.quantize_rowwise(x, 8)) used as it is.
      item_bias: optional [I] per-item score offset (kept in fp32).
      bits: None keeps float items as they are (made contiguous, not copied when they already
        are); 8 quantizes them to an int8 row-wise table (fp32 scale and bias per row).
    """

    def __init__(self, items: Tensor, item_bias: Optional[Tensor] = None, *, bits: Optional[int] = None):
        super().__init__()
        if not isinstance(items, Tensor) or items.dim() != 2:
            raise ValueError(f"items must be a 2-D tensor, got {getattr(items, 'shape', type(items))}")
        if bits not in (None, 8):
            raise ValueError(f"bits must be None (keep the dtype) or 8 (int8 row-wise), got {bits!r}")
        packed = items.dtype == torch.uint8
        if packed and bits is None:
            bits = 8
        elif not packed and items.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"items must be fp32/fp16/bf16 or an int8 row-wise uint8 table, got {items.dtype}")
        elif not packed and bits == 8:
            from ..ops.rowwise import quantize_rowwise

            items = quantize_rowwise(items.detach().float(), 8)
        n_items = items.shape[0]
        if item_bias is not None:
            if item_bias.shape != (n_items,):
                raise ValueError(f"item_bias must be [{n_items}], got {tuple(item_bias.shape)}")
            if item_bias.device != items.device:
                raise ValueError(f"item_bias is on {item_bias.device} but items on {items.device}")
            item_bias = item_bias.detach().float().contiguous()
        self.bits = bits
        self.register_buffer("items", items.detach().contiguous())
        self.register_buffer("item_bias", item_bias)

    def _apply(self, *args, **kwargs):
        # the item bias stays fp32 through a model's .half() / .bfloat16() / .double() (rounded to
        # 16 bits it moved scores by up to 0.5; the ops take no fp64): only its device follows
        bias = self.item_bias
        module = super()._apply(*args, **kwargs)
        if bias is not None and self.item_bias.dtype != torch.float32:
            self.item_bias = bias.to(self.item_bias.device)
        return module

    @property
    def num_items(self) -> int:
        return self.items.shape[0]

    @property
    def dim(self) -> int:
        return self.items.shape[1] - 8 if self.bits == 8 else self.items.shape[1]

    def nbytes(self) -> int:
        """Bytes of the catalog (item rows and biases)."""
        bias = 0 if self.item_bias is None else self.item_bias.numel() * 4
        return self.items.numel() * self.items.element_size() + bias

    def extra_repr(self) -> str:
        kind = "int8 row-wise" if self.bits == 8 else str(self.items.dtype).replace("torch.", "")
        return f"{self.num_items} items, dim {self.dim}, {kind}, bias={self.item_bias is not None}"

    # (search, rank and score need no torch.no_grad(): the queries are detached and the catalog is
    # buffers, so nothing is recorded; a decorated method of a Retriever built inside a compiled
    # function, as Recommender.recommend does, failed torch.compile(fullgraph=True))
    def _queries(self, queries: Tensor) -> Tensor:
        if not isinstance(queries, Tensor) or queries.dim() != 2:
            raise ValueError(f"queries must be [U, {self.dim}], got {getattr(queries, 'shape', type(queries))}")
        return queries.detach()

    def search(self, queries: Tensor, k: int, *, exclude: Optional[Csr] = None,
               backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
        """Top-k of the whole catalog for queries [U, D] -> (scores fp32 [U, k], ids int64 [U, k]).
        exclude: CSR (offsets [U + 1], item ids) of items to leave out per query (already seen)."""
        from ..ops.scoring import topk_scores

        ex_off, ex_items = _csr(exclude, "exclude")
        return topk_scores(self._queries(queries), self.items, k, exclude_offsets=ex_off, exclude_items=ex_items,
                           item_bias=self.item_bias, backend=backend)

    def rank(self, queries: Tensor, cand_offsets: Tensor, cand_items: Tensor, k: int, *,
             backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
        """Per-query top-k of a candidate list (CSR: query u's candidates are
        cand_items[cand_offsets[u]:cand_offsets[u + 1]]) -> (scores [U, k], ids [U, k])."""
        from ..ops.scoring import candidate_topk

        return candidate_topk(self._queries(queries), self.items, cand_offsets, cand_items, k,
                              item_bias=self.item_bias, backend=backend)

    def score(self, queries: Tensor, cand_offsets: Tensor, cand_items: Tensor, *,
              backend: Optional[str] = None) -> Tensor:
        """Score of every candidate of a CSR list -> fp32 [nnz], aligned with cand_items."""
        from ..ops.scoring import candidate_scores

        return candidate_scores(self._queries(queries), self.items, cand_offsets, cand_items,
                                item_bias=self.item_bias, backend=backend)

    forward = search
