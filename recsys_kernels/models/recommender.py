"""The seed article's recommender, made correct.

The article's sample multiplied a user vector with a scalar MLP output, trained under
`torch.no_grad()` (so nothing learned) and fed Python lists to BCE. What it means is

    score(u, i) = <f(u), v_i> + <a_attr(i), W x_i>

  f(u)    the user vector: an MLP (fc1 -> ReLU -> fc2, an nn.Sequential) over the concatenation
          [user embedding e_u, mean of the embeddings of u's history items] (an nn.EmbeddingBag
          in mode="mean" over the history CSR, so later passes can swap it for a fused kernel)
  v_i     the item embedding (the "item representation vector" V)
  a_c     the embedding of item attribute c (categorical), dim `dim`
  W x_i   the item feature vector x_i projected to dim `dim` by a bias-free nn.Linear

The attribute . feature term does not depend on the user: it is a learned, content-based item
bias b_i = <a_attr(i), W x_i> (a prior on how likely an item is to be picked at all, from its
side information). That makes retrieval an inner-product search with a per-item bias, which is
exactly what `topk_scores(..., item_bias=b)` computes.

Training is on implicit feedback with sampled negatives (BPR or BCE-with-logits), Adam with L2
weight decay, gradients on (see `train_model`). `evaluate` reports NDCG / recall / hit rate at k
on a held-out split, excluding each user's training items from the ranking.

Histories, exclusion lists and relevance lists are CSR (offsets [R+1], items), one row per
entry of the `users` tensor they go with (see recsys_kernels.data.csr_rows).
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data as _data
from .. import metrics as _metrics
from ..nn.retriever import Retriever

Csr = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------- optional fast ops
def _scoring_ops():
    """recsys_kernels.ops.scoring, or None while it is not there (fallback: mm + sort)."""
    try:
        from ..ops import scoring
    except ImportError:
        return None
    return scoring


def _topk_fallback(queries: Tensor, items: Tensor, k: int, exclude: Optional[Csr],
                   item_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Dense mm + sort with the same contract as topk_scores: ties go to the lower id (stable
    sort over ids in order), excluded or missing entries are -inf / -1."""
    if items.dtype == torch.uint8:
        from ..ops.rowwise import dequantize_rowwise

        items = dequantize_rowwise(items, 8)
    scores = queries.float() @ items.float().T
    if item_bias is not None:
        scores = scores + item_bias.float()
    return _rank_scores(scores, exclude, k)


def _rank_scores(scores: Tensor, exclude: Optional[Csr], k: int) -> tuple[Tensor, Tensor]:
    """Top-k of dense scores [B, I] with the topk_scores contract: `exclude` (CSR, one row per
    score row) masked to -inf, ties to the lower id (a stable sort keeps ids in order), entries
    that are -inf come back as id -1."""
    scores = scores.clone()
    if exclude is not None and exclude[1].numel():
        off = exclude[0].long()
        rows = torch.repeat_interleave(torch.arange(off.numel() - 1, device=off.device), off.diff(),
                                       output_size=exclude[1].numel())
        scores[rows, exclude[1].long()] = float("-inf")
    values, ids = torch.sort(scores, dim=1, descending=True, stable=True)
    values, ids = values[:, :k].contiguous(), ids[:, :k].contiguous()
    return values, torch.where(torch.isneginf(values), torch.full_like(ids, -1), ids)


# ----------------------------------------------------------------------------- model
class Recommender(nn.Module):
    """Two-tower-style recommender with a history-pooling user tower and a content item bias.

    Args:
      num_users, num_items: id space sizes.
      dim: embedding / user-vector dimension.
      num_item_attrs: number of categorical item attribute values.
      feat_dim: item feature vector width.
      hidden: width of the fusion MLP's hidden layer.
      item_attr [num_items] int64, item_feat [num_items, feat_dim]: the item side information,
        stored as buffers (default: attribute 0 and zero features, i.e. no content bias).
    """

    def __init__(self, num_users: int, num_items: int, dim: int = 64, num_item_attrs: int = 1,
                 feat_dim: int = 1, hidden: int = 128, *, item_attr: Optional[Tensor] = None,
                 item_feat: Optional[Tensor] = None, init_std: float = 0.1):
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.user_emb = nn.Embedding(num_users, dim)
        self.item_emb = nn.Embedding(num_items, dim)
        self.attr_emb = nn.Embedding(num_item_attrs, dim)
        self.feat_proj = nn.Linear(feat_dim, dim, bias=False)
        # mean of the history items' embeddings; offsets are bag starts (include_last_offset
        # False), the layout every EmbeddingBag drop-in accepts
        self.history = nn.EmbeddingBag(num_items, dim, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        for emb in (self.user_emb.weight, self.item_emb.weight, self.attr_emb.weight, self.history.weight):
            nn.init.normal_(emb, std=init_std)  # N(0, 1) embeddings make dot products explode

        if item_attr is None:
            item_attr = torch.zeros(num_items, dtype=torch.int64)
        if item_feat is None:
            item_feat = torch.zeros(num_items, feat_dim)
        if item_attr.shape != (num_items,) or item_feat.shape != (num_items, feat_dim):
            raise ValueError(f"item_attr must be [{num_items}] and item_feat [{num_items}, {feat_dim}], "
                             f"got {tuple(item_attr.shape)} and {tuple(item_feat.shape)}")
        # (values are unknown on the meta device, where a model is built to be loaded later)
        if item_attr.numel() and not item_attr.is_meta and not (
                0 <= int(item_attr.min()) and int(item_attr.max()) < num_item_attrs):
            raise IndexError(f"item_attr values must be in [0, {num_item_attrs})")
        self.register_buffer("item_attr", item_attr.long().clone())
        self.register_buffer("item_feat", item_feat.float().clone())
        # frozen retrieval catalog (see freeze_catalog); None = compute from the parameters
        self.register_buffer("catalog", None)
        self.register_buffer("catalog_bias", None)
        # the content bias folded into a constant (see fold_item_bias); None = compute it
        self.register_buffer("folded_bias", None)

    @classmethod
    def for_data(cls, data: "_data.InteractionData", **kwargs) -> "Recommender":
        """A model sized for `data`, with its item attributes and features."""
        return cls(data.num_users, data.num_items, num_item_attrs=data.num_item_attrs,
                   feat_dim=data.feat_dim, item_attr=data.item_attr, item_feat=data.item_feat, **kwargs)

    # -- towers
    def user_vectors(self, users: Tensor, hist_offsets: Tensor, hist_items: Tensor) -> Tensor:
        """f(u) [B, dim] for users [B]; (hist_offsets [B+1], hist_items) is each user's history."""
        # (skipped under torch.fx symbolic tracing, where sizes are proxies: the graph passes
        # trace this model to swap its EmbeddingBag / Linear layers)
        if not isinstance(users, torch.fx.Proxy) and hist_offsets.numel() != users.numel() + 1:
            raise ValueError(f"hist_offsets must have len(users) + 1 = {users.numel() + 1} entries, "
                             f"got {hist_offsets.numel()}")
        pooled = self.history(hist_items, hist_offsets[:-1])  # empty history -> zeros
        return self.mlp(torch.cat([self.user_emb(users), pooled], dim=1))

    def item_vectors(self) -> Tensor:
        """v_i for the whole catalog, [num_items, dim]."""
        return self.item_emb.weight

    def item_bias(self, items: Optional[Tensor] = None) -> Tensor:
        """The content bias b_i = <a_attr(i), W x_i> of `items` (default: all), [len(items)]."""
        if self.folded_bias is not None:
            return self.folded_bias if items is None else self.folded_bias[items]
        attr = self.item_attr if items is None else self.item_attr[items]
        feat = self.item_feat if items is None else self.item_feat[items]
        return (self.attr_emb(attr) * self.feat_proj(feat)).sum(-1)

    @torch.no_grad()
    def fold_item_bias(self) -> "Recommender":
        """Constant-fold the content bias for serving: b = <a_attr(i), W x_i> depends on no
        input, so it becomes one fp32 buffer `folded_bias` [num_items], and the branch that
        computed it (attr_emb, feat_proj, item_attr, item_feat) is dropped. The bias is frozen
        from then on (training the folded model leaves it as it is)."""
        if self.folded_bias is None:
            self.folded_bias = self.item_bias().detach().float().contiguous()
            self.attr_emb = self.feat_proj = None
            self.item_attr = self.item_feat = None
        return self

    def score(self, users: Tensor, items: Tensor, hist_offsets: Tensor, hist_items: Tensor) -> Tensor:
        """Scores [P] of pairs (users[p], items[p]); the history CSR has one row per pair.
        Differentiable; without autograd (inference) it runs the fused `pair_scores` op.
        Traceable by torch.fx (the plain-PyTorch formula is what gets traced)."""
        u = self.user_vectors(users, hist_offsets, hist_items)
        scoring = _scoring_ops()
        if scoring is not None and not torch.is_grad_enabled() and not isinstance(u, torch.fx.Proxy):
            rows = torch.arange(users.numel(), device=users.device)
            bias = self.catalog_bias if self.catalog_bias is not None else self.item_bias()
            # a frozen catalog (fp32 or int8 row-wise) is what a served model scores against
            table = self.catalog if self.catalog is not None else self.item_vectors().float().contiguous()
            return scoring.pair_scores(u.float().contiguous(), table, rows,
                                       items, item_bias=bias.float().contiguous())
        return (u * self.item_emb(items)).sum(-1) + self.item_bias(items)

    forward = score

    # -- retrieval
    @torch.no_grad()
    def freeze_catalog(self, bits: Optional[int] = None) -> "Recommender":
        """Snapshot the retrieval catalog (item vectors and content biases) for `recommend`;
        bits=8 stores the item vectors as an int8 row-wise table (fp32 scale + bias per row),
        which `topk_scores` reads directly. Training a frozen model is refused (the snapshot
        would go stale); `unfreeze_catalog()` drops it."""
        if bits not in (None, 8):
            raise ValueError(f"bits must be None (fp32) or 8, got {bits!r}")
        table = self.item_vectors().detach().float().contiguous()
        if bits == 8:
            from ..ops.rowwise import quantize_rowwise

            table = quantize_rowwise(table, 8)
        self.catalog = table
        self.catalog_bias = self.item_bias().detach().float().contiguous()
        return self

    def unfreeze_catalog(self) -> "Recommender":
        self.catalog = None
        self.catalog_bias = None
        return self

    @torch.no_grad()
    def recommend(self, users: Tensor, k: int, hist_offsets: Tensor, hist_items: Tensor, *,
                  exclude: Union[bool, Csr, None] = True) -> tuple[Tensor, Tensor]:
        """Top-k items for users [B] -> (scores [B, k], item ids [B, k]), best first; ties go to
        the lower id; when fewer than k items are left, the tail is -inf / -1.

        exclude: True (default) masks each user's history items (already seen); a CSR
        (offsets [B+1], items) masks those items instead; None/False masks nothing."""
        if not 1 <= k <= self.num_items:
            raise ValueError(f"k must be in [1, num_items={self.num_items}], got {k}")
        q = self.user_vectors(users, hist_offsets, hist_items).float().contiguous()
        if exclude is True:
            exclude = (hist_offsets, hist_items)
        elif exclude is False:
            exclude = None
        if _scoring_ops() is None:
            r = self.retriever()
            return _topk_fallback(q, r.items, k, exclude, r.item_bias)
        return self.retriever().search(q, k, exclude=exclude)

    @torch.no_grad()
    def retriever(self) -> Retriever:
        """The index `recommend` searches: the frozen catalog (freeze_catalog) when there is one,
        else the live item vectors and content biases (fp32, not copied when contiguous)."""
        if self.catalog is not None:
            return Retriever(self.catalog, self.catalog_bias)
        return Retriever(self.item_vectors().detach().float(), self.item_bias().detach())


# ----------------------------------------------------------------------------- training
class _ProgressBar:
    """A minimal text progress bar on stderr (no tqdm: not a dependency of the package)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, width: int = 24):
        self.total, self.desc, self.enabled, self.width = max(total, 1), desc, enabled, width
        self.n, self.start, self.postfix, self._last = 0, time.perf_counter(), "", 0.0

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.n += n
        self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.n >= self.total):  # at most 10 redraws/s
            self._last = now
            filled = self.width * self.n // self.total
            bar = "#" * filled + "." * (self.width - filled)
            sys.stderr.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {now - self.start:5.1f}s {postfix}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def train_model(model: Recommender, train_data: "_data.InteractionData", epochs: int = 5,
                batch_size: int = 1024, lr: float = 1e-2, weight_decay: float = 1e-6,
                num_negatives: int = 4, seed: int = 0, progress: bool = True,
                loss: str = "bpr", leave_target_out: bool = True) -> list[float]:
    """Train on implicit feedback; returns the mean loss of every epoch.

    Each training interaction (u, i) is a positive; its negatives are `num_negatives` items
    drawn uniformly from the items u has no training interaction with. The history pooled into
    the user vector is u's training items, without i itself when `leave_target_out` (otherwise
    the model learns "an item in the history scores high", which never helps on held-out items,
    and overfits faster). loss="bpr": -log sigmoid(s_ui - s_uj) averaged over the negatives;
    loss="bce": BCE-with-logits, label 1 for positives and 0 for negatives. Adam with
    `weight_decay` as L2. Batches go to the model's device. Seeded: the same seed (and the same
    initial model) gives the same model."""
    if loss not in ("bpr", "bce"):
        raise ValueError(f"loss must be 'bpr' or 'bce', got {loss!r}")
    if model.catalog is not None:
        raise ValueError("model has a frozen catalog (freeze_catalog); call unfreeze_catalog() before training")
    if len(train_data) == 0:
        raise ValueError("train_data has no interactions")
    g = torch.Generator().manual_seed(seed)
    device = model.item_emb.weight.device
    hist_off, hist_items = train_data.user_history()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    n = len(train_data)
    num_batches = (n + batch_size - 1) // batch_size
    epoch_losses = []
    for epoch in range(epochs):
        bar = _ProgressBar(num_batches, f"epoch {epoch + 1}/{epochs}", progress)
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for b in range(num_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            users, pos = train_data.users[idx], train_data.items[idx]
            neg = _data.sample_negatives(users, model.num_items, num_negatives,
                                         exclude=(hist_off, hist_items), generator=g)
            h_off, h_items = _data.csr_rows(hist_off, hist_items, users)
            if leave_target_out:
                h_off, h_items = _drop_items(h_off, h_items, pos)
            users, h_off, h_items = users.to(device), h_off.to(device), h_items.to(device)
            item_ids = torch.cat([pos[:, None], neg], dim=1).to(device)  # [B, 1 + negatives]
            # one user vector per positive, shared by its negatives
            u = model.user_vectors(users, h_off, h_items)
            s = torch.einsum("bd,bnd->bn", u, model.item_emb(item_ids)) + model.item_bias(item_ids)
            if loss == "bpr":
                batch_loss = -F.logsigmoid(s[:, :1] - s[:, 1:]).mean()
            else:
                labels = torch.zeros_like(s)
                labels[:, 0] = 1.0
                batch_loss = F.binary_cross_entropy_with_logits(s, labels)
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            total += float(batch_loss.detach()) * idx.numel()
            bar.update(1, f"loss {total / min(n, (b + 1) * batch_size):.4f}")
        bar.close()
        epoch_losses.append(total / n)
    model.eval()
    return epoch_losses


def _drop_items(offsets: Tensor, items: Tensor, drop: Tensor) -> Csr:
    """The CSR without item drop[r] in row r."""
    rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff(), output_size=items.numel())
    keep = items != drop[rows]
    new_offsets = torch.zeros_like(offsets)
    new_offsets[1:] = torch.cumsum(torch.bincount(rows[keep], minlength=offsets.numel() - 1), 0)
    return new_offsets, items[keep]


# ----------------------------------------------------------------------------- evaluation
def held_out_users(train_data: "_data.InteractionData", test_data: "_data.InteractionData"
                   ) -> tuple[Tensor, Csr, Csr]:
    """The users with test items -> (users [B], their training history CSR, their test CSR)."""
    users = torch.unique(test_data.users)
    train_off, train_items = train_data.user_history()
    test_off, test_items = test_data.user_history()
    return (users, _data.csr_rows(train_off, train_items, users), _data.csr_rows(test_off, test_items, users))


def ranking_metrics(ranked: Tensor, relevant: Csr, k: int) -> dict[str, float]:
    """NDCG@k, recall@k, hit rate@k and MRR (means over users) as floats."""
    return {f"ndcg@{k}": float(_metrics.ndcg_at_k(ranked, relevant, k)),
            f"recall@{k}": float(_metrics.recall_at_k(ranked, relevant, k)),
            f"hit_rate@{k}": float(_metrics.hit_rate_at_k(ranked, relevant, k)),
            "mrr": float(_metrics.mrr(ranked, relevant, k))}


@torch.no_grad()
def evaluate(model: Recommender, train_data: "_data.InteractionData", test_data: "_data.InteractionData",
             k: int = 10, batch_size: int = 1024) -> dict[str, float]:
    """Ranking quality on the held-out split: for each user with test items, rank the whole
    catalog minus the user's training items (history = training items) and score the top k
    against the test items. Returns {"ndcg@k", "recall@k", "hit_rate@k", "mrr", "users"}."""
    model.eval()
    device = model.item_emb.weight.device
    users, (h_off, h_items), relevant = held_out_users(train_data, test_data)
    ranked = []
    for start in range(0, users.numel(), batch_size):
        rows = torch.arange(start, min(start + batch_size, users.numel()))
        b_off, b_items = _data.csr_rows(h_off, h_items, rows)
        ids = model.recommend(users[rows].to(device), k, b_off.to(device), b_items.to(device))[1]
        ranked.append(ids.cpu())
    ranked = torch.cat(ranked) if ranked else torch.empty(0, k, dtype=torch.int64)
    out = ranking_metrics(ranked, relevant, k)
    out["users"] = int(users.numel())
    return out


def baseline_rankings(train_data: "_data.InteractionData", users: Tensor, history: Csr, k: int,
                      seed: int = 0) -> dict[str, Tensor]:
    """Top-k lists of two reference rankers, excluding each user's history: "popularity" (most
    training interactions first, ties to the lower id) and "random" (a seeded shuffle)."""
    counts = train_data.item_counts().float()
    pop = counts[None, :].expand(users.numel(), -1)
    rnd = torch.rand(users.numel(), train_data.num_items, generator=torch.Generator().manual_seed(seed))
    return {"popularity": _rank_scores(pop, history, k)[1], "random": _rank_scores(rnd, history, k)[1]}
