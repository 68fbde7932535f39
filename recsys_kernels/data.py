"""Interaction data for the recommender: a seeded synthetic generator (the embedded default), a
MovieLens-100K reader, a leave-last-n-out split, CSR user histories and negative sampling.

Everything is plain torch and deterministic for a given seed (an explicit torch.Generator, never
the global RNG).

CSR ("compressed sparse rows") is the one list-of-lists form used across the package: a list of
item lists, one per row (user), is `offsets [R+1]` int64 (offsets[0] = 0, non-decreasing,
offsets[R] = nnz) and `items [nnz]` int64; row r is items[offsets[r]:offsets[r+1]]. It is what
an embedding bag takes as (indices, offsets) and what `topk_scores` takes as exclude lists.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

# MovieLens-100K's 19 genre flags, in u.item column order (u.genre lists the same names).
MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)


@dataclass
class InteractionData:
    """Implicit-feedback interactions, one (user, item, timestamp) triple per entry.

    users, items, timestamps: [n] int64. Timestamps only order a user's interactions (the split
    holds out each user's latest ones); ties are broken by position.
    item_attr: [num_items] int64, one categorical attribute per item in [0, num_item_attrs).
    item_feat: [num_items, feat_dim] float32 item feature vectors.
    """

    users: Tensor
    items: Tensor
    timestamps: Tensor
    num_users: int
    num_items: int
    item_attr: Tensor
    item_feat: Tensor
    num_item_attrs: int
    attr_names: Optional[Sequence[str]] = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.users.numel())

    @property
    def feat_dim(self) -> int:
        return int(self.item_feat.shape[1])

    def user_history(self) -> tuple[Tensor, Tensor]:
        """Every user's items as CSR (offsets [num_users+1], items), each row in time order."""
        order = _user_time_order(self)
        return to_csr(self.users[order], self.items[order], self.num_users)

    def item_counts(self) -> Tensor:
        """Interactions per item, [num_items] int64."""
        return torch.bincount(self.items, minlength=self.num_items)

    def subset(self, mask: Tensor) -> "InteractionData":
        """The interactions where `mask` is true (same users, items, attributes)."""
        return replace(self, users=self.users[mask], items=self.items[mask], timestamps=self.timestamps[mask])


# ----------------------------------------------------------------------------- CSR helpers
def to_csr(rows: Tensor, cols: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """CSR (offsets [num_rows+1], cols) of (row, col) pairs. Pairs keep their relative order
    within a row (stable sort), so pass them pre-sorted by time to get time-ordered rows."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    cols = torch.as_tensor(cols, dtype=torch.int64)
    if rows.shape != cols.shape or rows.dim() != 1:
        raise ValueError(f"rows and cols must be 1-D and of one length, got {tuple(rows.shape)}, {tuple(cols.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
        raise IndexError(f"rows: ids must be in [0, num_rows={num_rows})")
    order = torch.sort(rows, stable=True).indices
    counts = torch.bincount(rows, minlength=num_rows)
    offsets = torch.zeros(num_rows + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, cols[order].contiguous()


def csr_from_lists(lists: Iterable[Iterable[int]]) -> tuple[Tensor, Tensor]:
    """CSR of a Python list of item lists (or sets; a set's items are sorted)."""
    rows = [sorted(x) if isinstance(x, (set, frozenset)) else list(x) for x in lists]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    if rows:
        offsets[1:] = torch.cumsum(torch.tensor([len(r) for r in rows], dtype=torch.int64), 0)
    items = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    return offsets, items


def csr_rows(offsets: Tensor, items: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The sub-CSR of the selected `rows` (in that order, repeats allowed): one bag per entry
    of `rows`, the form an embedding bag over a batch of users takes."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64)
    new_offsets[1:] = torch.cumsum(lengths, 0)
    nnz = int(new_offsets[-1])
    # position of each output element inside its row, then back to the source index
    row_of = torch.repeat_interleave(torch.arange(rows.numel()), lengths, output_size=nnz)
    within = torch.arange(nnz) - new_offsets[:-1][row_of]
    return new_offsets, items[starts[row_of] + within]


def csr_contains(offsets: Tensor, items: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Whether cols[j] is in CSR row rows[j], for tensors of any (equal) shape -> bool tensor.
    Negative cols (padding) are never contained. Vectorised: one sort + searchsorted."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    cols = torch.as_tensor(cols, dtype=torch.int64)
    num_rows = offsets.numel() - 1
    if items.numel() == 0 or cols.numel() == 0:
        return torch.zeros(cols.shape, dtype=torch.bool)
    # key = row * width + col is unique per (row, col) pair and orders by row, then col
    width = int(max(int(items.max()), int(cols.max()), 0)) + 1
    row_of_item = torch.repeat_interleave(torch.arange(num_rows), offsets.diff(), output_size=items.numel())
    keys = torch.sort(row_of_item * width + items).values
    query = rows * width + cols.clamp(min=0)
    pos = torch.searchsorted(keys, query.reshape(-1)).clamp(max=keys.numel() - 1).reshape(cols.shape)
    return (keys[pos] == query) & (cols >= 0)


def check_csr(offsets: Tensor, items: Tensor, name: str, num_rows: Optional[int] = None) -> None:
    """Raise a clear error unless (offsets, items) is a valid CSR."""
    for t, what in ((offsets, "offsets"), (items, "items")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: {what} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: {what} must be 1-D, got shape {tuple(t.shape)}")
    if offsets.numel() < 1:
        raise ValueError(f"{name}: offsets needs at least one entry (offsets[0] = 0)")
    if num_rows is not None and offsets.numel() != num_rows + 1:
        raise ValueError(f"{name}: offsets must have {num_rows + 1} entries (rows + 1), got {offsets.numel()}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != items.numel() or bool((offsets.diff() < 0).any()):
        raise ValueError(f"{name}: offsets must start at 0, not decrease and end at len(items)={items.numel()}")


# ----------------------------------------------------------------------------- synthetic data
def synthetic_interactions(
    num_users: int = 2000,
    num_items: int = 1000,
    *,
    seed: int = 0,
    interactions_per_user: int = 20,
    min_per_user: int = 5,
    latent_dim: int = 8,
    affinity_scale: float = 2.5,
    zipf_exponent: float = 0.8,
    num_item_attrs: int = 8,
    feat_dim: int = 16,
    feat_noise: float = 0.3,
) -> InteractionData:
    """Seeded synthetic implicit feedback with both popularity and personal taste in it.

    Users and items get hidden factor vectors p_u, q_i ~ N(0, I/latent_dim). Item popularity is
    Zipf-like: the item of popularity rank r (a random permutation of the ids) gets the log-prior
    -zipf_exponent * log(r + 1). User u picks items without replacement with probability
    proportional to exp(affinity_scale * sqrt(latent_dim) * <p_u, q_i> + log-prior_i) (Gumbel top-k),
    so a few items collect most interactions, yet who takes which item is decided by the factors:
    a popularity ranking helps, a model that learns the factors does clearly better.

    Items' side information is consistent with the factors: the categorical attribute is the
    nearest of `num_item_attrs` random directions in factor space (argmax of q_i . a_c), and the
    feature vector is a fixed random linear map of q_i plus Gaussian noise (std `feat_noise`
    relative to the signal).

    The number of interactions per user is drawn from a geometric-like law with mean
    ~interactions_per_user, at least `min_per_user` and at most num_items. Timestamps are
    distinct random integers, so the order of a user's items is random.
    """
    if num_users < 1 or num_items < 1:
        raise ValueError(f"num_users and num_items must be >= 1, got {num_users}, {num_items}")
    if not 1 <= min_per_user <= interactions_per_user:
        raise ValueError(f"need 1 <= min_per_user <= interactions_per_user, got {min_per_user}, "
                         f"{interactions_per_user}")
    if num_item_attrs < 1 or feat_dim < 1 or latent_dim < 1:
        raise ValueError("num_item_attrs, feat_dim and latent_dim must be >= 1")
    g = torch.Generator().manual_seed(seed)
    scale = latent_dim ** -0.5
    user_f = torch.randn(num_users, latent_dim, generator=g) * scale
    item_f = torch.randn(num_items, latent_dim, generator=g) * scale

    pop_rank = torch.randperm(num_items, generator=g)  # pop_rank[i] = popularity rank of item i
    log_prior = -zipf_exponent * torch.log1p(pop_rank.double()).float()

    # per-user counts: min + exponential tail, so a few users are heavy, as in real logs
    extra = torch.empty(num_users).exponential_(generator=g) * (interactions_per_user - min_per_user)
    counts = (min_per_user + extra.floor().long()).clamp(max=num_items)
    max_count = int(counts.max())

    # Gumbel top-k == sampling without replacement from softmax(logits), row by row; done in
    # blocks of users so the [block, num_items] logits stay small
    users_out, items_out = [], []
    block = max(1, (1 << 22) // num_items)
    for start in range(0, num_users, block):
        stop = min(start + block, num_users)
        logits = affinity_scale * latent_dim ** 0.5 * (user_f[start:stop] @ item_f.T) + log_prior
        u01 = torch.rand(logits.shape, generator=g).clamp_(min=1e-12)
        gumbel = -torch.log(-torch.log(u01))
        picked = torch.topk(logits + gumbel, max_count, dim=1).indices  # in sampling order
        keep = torch.arange(max_count) < counts[start:stop, None]
        users_out.append(torch.arange(start, stop)[:, None].expand_as(picked)[keep])
        items_out.append(picked[keep])
    users = torch.cat(users_out)
    items = torch.cat(items_out)
    timestamps = torch.randperm(users.numel(), generator=g).to(torch.int64)

    directions = torch.randn(latent_dim, num_item_attrs, generator=g)
    item_attr = torch.argmax(item_f @ directions, dim=1)
    proj = torch.randn(latent_dim, feat_dim, generator=g)
    signal = item_f @ proj
    noise = torch.randn(num_items, feat_dim, generator=g) * feat_noise * signal.std()
    item_feat = (signal + noise) / signal.std()  # ~unit scale

    return InteractionData(users=users, items=items, timestamps=timestamps, num_users=num_users,
                           num_items=num_items, item_attr=item_attr, item_feat=item_feat.float(),
                           num_item_attrs=num_item_attrs)


# ----------------------------------------------------------------------------- split
def _user_time_order(data: InteractionData) -> Tensor:
    """Permutation sorting interactions by (user, timestamp, position)."""
    by_time = torch.sort(data.timestamps, stable=True).indices
    return by_time[torch.sort(data.users[by_time], stable=True).indices]


def train_test_split(data: InteractionData, num_test: int = 1, *, min_train: int = 1
                     ) -> tuple[InteractionData, InteractionData]:
    """Leave-last-n-out: each user's latest `num_test` interactions (by timestamp) go to the test
    split, the rest to train. Users with fewer than num_test + min_train interactions stay
    wholly in train, so every test user has at least `min_train` training items to build a
    history from. Both splits keep the full user and item id spaces and the item attributes."""
    if num_test < 1 or min_train < 0:
        raise ValueError(f"need num_test >= 1 and min_train >= 0, got {num_test}, {min_train}")
    order = _user_time_order(data)
    users = data.users[order]
    counts = torch.bincount(data.users, minlength=data.num_users)
    starts = torch.cumsum(counts, 0) - counts
    rank_from_end = counts[users] - 1 - (torch.arange(users.numel()) - starts[users])
    is_test_sorted = (rank_from_end < num_test) & (counts[users] >= num_test + min_train)
    is_test = torch.empty_like(is_test_sorted)
    is_test[order] = is_test_sorted
    return data.subset(~is_test), data.subset(is_test)


# ----------------------------------------------------------------------------- negatives
def sample_negatives(users: Tensor, num_items: int, num_negatives: int, *,
                     exclude: Optional[tuple[Tensor, Tensor]] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform negative items [len(users), num_negatives] int64 (with replacement).

    With `exclude` (a CSR of positives with one row per user id, e.g. the full training
    history), each draw is uniform over the items NOT in the user's row, exactly and without
    rejection loops: draw r uniform in [0, num_items - |positives|) and map it to the r-th item
    that is not a positive. A user whose positives cover the whole catalog gets uniform draws."""
    users = torch.as_tensor(users, dtype=torch.int64)
    shape = (users.numel(), num_negatives)
    if exclude is None:
        return torch.randint(num_items, shape, generator=generator)
    offsets, items = exclude[0].long(), exclude[1].long()
    num_rows = offsets.numel() - 1
    if items.numel() and (int(items.min()) < 0 or int(items.max()) >= num_items):
        raise ValueError(f"exclude: item ids must be in [0, num_items={num_items})")
    # distinct positives of every row, sorted by (row, item), as keys row * num_items + item
    row_of = torch.repeat_interleave(torch.arange(num_rows), offsets.diff(), output_size=items.numel())
    keys = torch.unique(row_of * num_items + items)  # sorted
    key_row = keys // num_items
    n_pos = torch.bincount(key_row, minlength=num_rows)
    row_start = torch.cumsum(n_pos, 0) - n_pos
    # p_j - j (j = rank inside the row) counts the non-positives below the j-th positive p_j,
    # so the r-th non-positive is r + #{j : p_j - j <= r}; the adjusted keys stay sorted
    rank = torch.arange(keys.numel()) - row_start[key_row]
    adjusted = keys - rank
    free = (num_items - n_pos[users])[:, None]  # non-positives per user
    u01 = torch.rand(shape, generator=generator, dtype=torch.float64)
    r = torch.minimum((u01 * free.clamp(min=1)).long(), free.clamp(min=1) - 1)
    base = users[:, None] * num_items
    below = torch.searchsorted(adjusted, base + r, right=True) - row_start[users][:, None]
    neg = r + below
    # rows without any non-positive item: plain uniform
    return torch.where(free > 0, neg, (u01 * num_items).long().clamp(max=num_items - 1))


# ----------------------------------------------------------------------------- MovieLens
def load_movielens(path: str | os.PathLike, *, min_rating: Optional[float] = None) -> InteractionData:
    """Read a MovieLens-100K style directory: `u.data` (tab-separated `user item rating
    timestamp`, required) and `u.item` (pipe-separated, latin-1; column 0 the item id, the last
    19 columns the genre flags; optional).

    Raw user and item ids are remapped to 0-based ids in ascending raw-id order; the catalog is
    the items of u.item and u.data together. Every rating counts as an implicit interaction, or
    only ratings >= `min_rating` when given; an item a user rated more than once counts once, at
    its latest rating (by timestamp, then line). item_feat is the multi-hot genre vector [I, 19];
    item_attr the first genre flagged (0 "unknown" when none). Without u.item every item has
    attribute 0 and a single all-zero feature.
    """
    path = os.fspath(path)
    data_file = os.path.join(path, "u.data")
    if not os.path.isfile(data_file):
        raise FileNotFoundError(f"load_movielens: no u.data in {path!r} (MovieLens-100K layout expected)")
    latest: dict[tuple[int, int], tuple[int, int, float]] = {}  # (user, item) -> (timestamp, line, rating)
    with open(data_file, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 4:
                raise ValueError(f"{data_file}:{lineno}: expected 4 tab-separated fields, got {line!r}")
            try:
                u, i, r, t = int(parts[0]), int(parts[1]), float(parts[2]), int(parts[3])
            except ValueError:
                raise ValueError(f"{data_file}:{lineno}: expected integer user and item ids, a numeric rating and an "
                                 f"integer timestamp, got {line!r}") from None
            if (u, i) not in latest or (t, lineno) > latest[u, i][:2]:
                latest[u, i] = (t, lineno, r)
    # a re-rated item is one interaction, its latest rating (a pair in both the training history
    # and the held-out items would be masked out of the ranking it is meant to test)
    raw = [(u, i, t) for (u, i), (t, _, r) in sorted(latest.items(), key=lambda kv: kv[1][1])
           if min_rating is None or r >= min_rating]
    if not raw:
        raise ValueError(f"{data_file}: no interactions" + ("" if min_rating is None else f" rated >= {min_rating}"))

    genres: dict[int, list[int]] = {}
    item_file = os.path.join(path, "u.item")
    if os.path.isfile(item_file):
        with open(item_file, encoding="latin-1") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("|")
                if len(parts) < 1 + len(MOVIELENS_GENRES):
                    raise ValueError(f"{item_file}:{lineno}: expected an id and {len(MOVIELENS_GENRES)} "
                                     f"genre flags, got {len(parts)} fields")
                try:
                    genres[int(parts[0])] = [int(x) for x in parts[-len(MOVIELENS_GENRES):]]
                except ValueError:
                    raise ValueError(f"{item_file}:{lineno}: expected an integer id first and 0/1 genre flags last, "
                                     f"got {line.rstrip()!r}") from None

    user_ids = sorted({u for u, _, _ in raw})
    item_ids = sorted({i for _, i, _ in raw} | set(genres))
    umap = {u: k for k, u in enumerate(user_ids)}
    imap = {i: k for k, i in enumerate(item_ids)}
    users = torch.tensor([umap[u] for u, _, _ in raw], dtype=torch.int64)
    items = torch.tensor([imap[i] for _, i, _ in raw], dtype=torch.int64)
    timestamps = torch.tensor([t for _, _, t in raw], dtype=torch.int64)

    if genres:
        feat = torch.tensor([genres.get(i, [0] * len(MOVIELENS_GENRES)) for i in item_ids],
                            dtype=torch.float32).reshape(len(item_ids), len(MOVIELENS_GENRES))
        has_any = feat.sum(1) > 0
        attr = torch.where(has_any, torch.argmax(feat, dim=1), torch.zeros((), dtype=torch.int64))
        num_attrs, names = len(MOVIELENS_GENRES), MOVIELENS_GENRES
    else:
        feat = torch.zeros(len(item_ids), 1)
        attr = torch.zeros(len(item_ids), dtype=torch.int64)
        num_attrs, names = 1, None
    return InteractionData(users=users, items=items, timestamps=timestamps, num_users=len(user_ids),
                           num_items=len(item_ids), item_attr=attr, item_feat=feat,
                           num_item_attrs=num_attrs, attr_names=names)
