"""Interaction data: synthetic generator (determinism, power law, latent structure), the
leave-last-n-out split, CSR helpers, negative sampling, the MovieLens reader."""
import random

import pytest
import torch

from recsys_kernels import data


@pytest.fixture(scope="module")
def synth():
    return data.synthetic_interactions(300, 200, seed=3, interactions_per_user=15)


def test_synthetic_shapes_and_ranges(synth):
    d = synth
    n = len(d)
    assert d.users.shape == d.items.shape == d.timestamps.shape == (n,)
    assert d.users.dtype == d.items.dtype == d.timestamps.dtype == torch.int64
    assert int(d.users.min()) >= 0 and int(d.users.max()) < d.num_users
    assert int(d.items.min()) >= 0 and int(d.items.max()) < d.num_items
    assert d.item_attr.shape == (d.num_items,) and d.item_attr.dtype == torch.int64
    assert int(d.item_attr.min()) >= 0 and int(d.item_attr.max()) < d.num_item_attrs
    assert d.item_feat.shape == (d.num_items, d.feat_dim) and d.item_feat.dtype == torch.float32
    assert torch.isfinite(d.item_feat).all()
    # every user has at least min_per_user (5) interactions, no (user, item) pair twice
    counts = torch.bincount(d.users, minlength=d.num_users)
    assert int(counts.min()) >= 5
    pairs = d.users * d.num_items + d.items
    assert torch.unique(pairs).numel() == n
    assert torch.unique(d.timestamps).numel() == n  # distinct: a total order


def test_synthetic_deterministic():
    a = data.synthetic_interactions(120, 80, seed=7)
    b = data.synthetic_interactions(120, 80, seed=7)
    c = data.synthetic_interactions(120, 80, seed=8)
    for f in ("users", "items", "timestamps", "item_attr", "item_feat"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not (len(a) == len(c) and torch.equal(a.items, c.items))
    # the global RNG is neither used nor disturbed
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    data.synthetic_interactions(50, 40, seed=1)
    assert torch.equal(torch.rand(3), x)


def test_power_law_popularity():
    d = data.synthetic_interactions(2000, 1000, seed=0, interactions_per_user=20)
    counts = d.item_counts().sort(descending=True).values.double()
    # uniform popularity would give the top 1% of items ~1% of interactions and top/median ~1
    top1 = counts[:10].sum() / counts.sum()
    assert top1 > 0.04
    assert counts[:10].mean() > 8 * counts[500]
    # heavy head, long tail: the top 10% of items outweigh the bottom 50%
    assert counts[:100].sum() > counts[500:].sum()


def test_latent_structure(synth):
    """Items picked by the same user are closer in feature space than random item pairs: the
    features and the choices share the hidden factors."""
    d = synth
    f = torch.nn.functional.normalize(d.item_feat, dim=1)
    off, items = d.user_history()
    same = []
    for u in range(d.num_users):
        row = f[items[off[u]:off[u + 1]]]
        sim = row @ row.T
        n = row.shape[0]
        same.append((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(d.num_items, (5000,), generator=g), torch.randint(d.num_items, (5000,), generator=g)
    rand = (f[a] * f[b]).sum(1).mean()
    assert torch.stack(same).mean() > rand + 0.1
    # the attribute is informative too: same-attribute items have closer features
    same_attr = d.item_attr[a] == d.item_attr[b]
    assert (f[a] * f[b]).sum(1)[same_attr].mean() > (f[a] * f[b]).sum(1)[~same_attr].mean() + 0.2


def test_user_history_csr_time_ordered(synth):
    off, items = synth.user_history()
    assert off.shape == (synth.num_users + 1,) and int(off[0]) == 0 and int(off[-1]) == len(synth)
    for u in (0, 17, synth.num_users - 1):
        mask = synth.users == u
        order = torch.argsort(synth.timestamps[mask])
        assert torch.equal(items[off[u]:off[u + 1]], synth.items[mask][order])


@pytest.mark.parametrize("num_test", [1, 3])
def test_leave_last_n_out(synth, num_test):
    train, test = data.train_test_split(synth, num_test, min_train=2)
    assert len(train) + len(test) == len(synth)
    # same multiset of (user, item, t) triples
    key = lambda d: torch.sort(d.users * 10**12 + d.items * 10**6 + d.timestamps).values  # noqa: E731
    both = data.InteractionData(torch.cat([train.users, test.users]), torch.cat([train.items, test.items]),
                                torch.cat([train.timestamps, test.timestamps]), synth.num_users,
                                synth.num_items, synth.item_attr, synth.item_feat, synth.num_item_attrs)
    assert torch.equal(key(both), key(synth))
    counts = torch.bincount(synth.users, minlength=synth.num_users)
    test_counts = torch.bincount(test.users, minlength=synth.num_users)
    eligible = counts >= num_test + 2
    assert torch.equal(test_counts, torch.where(eligible, num_test, 0))
    for u in range(0, synth.num_users, 7):
        tr_t = train.timestamps[train.users == u]
        te_t = test.timestamps[test.users == u]
        if te_t.numel():
            assert int(tr_t.max()) < int(te_t.min())  # held-out = the latest
            assert tr_t.numel() >= 2
    assert train.num_items == test.num_items == synth.num_items
    assert train.item_attr is synth.item_attr


def test_split_small_users_stay_in_train():
    d = data.InteractionData(torch.tensor([0, 0, 0, 1]), torch.tensor([5, 6, 7, 8]), torch.tensor([3, 1, 2, 0]),
                             2, 10, torch.zeros(10, dtype=torch.int64), torch.zeros(10, 1), 1)
    train, test = data.train_test_split(d, 1)
    assert test.users.tolist() == [0] and test.items.tolist() == [5]  # user 0's latest (t=3)
    assert sorted(train.items.tolist()) == [6, 7, 8]  # user 1 has 1 interaction: all train
    with pytest.raises(ValueError, match="num_test"):
        data.train_test_split(d, 0)


def test_csr_helpers_brute_force():
    rng = random.Random(0)
    lists = [[rng.randrange(30) for _ in range(rng.randrange(0, 6))] for _ in range(23)]
    off, items = data.csr_from_lists(lists)
    rows = torch.tensor([4, 0, 22, 4, 7])
    s_off, s_items = data.csr_rows(off, items, rows)
    assert data.csr_from_lists([lists[r] for r in rows.tolist()])[1].tolist() == s_items.tolist()
    assert torch.equal(s_off, data.csr_from_lists([lists[r] for r in rows.tolist()])[0])
    r = torch.randint(23, (200,))
    c = torch.randint(-1, 32, (200,))
    got = data.csr_contains(off, items, r, c)
    assert got.tolist() == [cc >= 0 and cc in lists[rr] for rr, cc in zip(r.tolist(), c.tolist())]
    # to_csr keeps the input order inside a row
    t_off, t_items = data.to_csr(torch.tensor([2, 0, 2, 0]), torch.tensor([9, 8, 7, 6]), 3)
    assert t_off.tolist() == [0, 2, 2, 4] and t_items.tolist() == [8, 6, 9, 7]
    with pytest.raises(IndexError, match="rows"):
        data.to_csr(torch.tensor([0, 3]), torch.tensor([1, 1]), 3)
    # empty selections
    e_off, e_items = data.csr_rows(off, items, torch.tensor([], dtype=torch.int64))
    assert e_off.tolist() == [0] and e_items.numel() == 0


def test_sample_negatives_excludes_positives():
    lists = [list(range(0, 40, 3)), [1, 2, 2], []]  # user 1 lists item 2 twice
    pos = data.csr_from_lists(lists)
    users = torch.tensor([0, 1, 2, 0, 0] * 40)
    g = torch.Generator().manual_seed(0)
    neg = data.sample_negatives(users, 50, 6, exclude=pos, generator=g)
    assert neg.shape == (200, 6) and neg.dtype == torch.int64
    assert int(neg.min()) >= 0 and int(neg.max()) < 50
    for u, row in zip(users.tolist(), neg.tolist()):
        assert not set(row) & set(lists[u])
    # seeded and deterministic
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(neg, data.sample_negatives(users, 50, 6, exclude=pos, generator=g2))
    # without exclusion every item can come up
    free = data.sample_negatives(torch.zeros(500, dtype=torch.int64), 5, 4, generator=g)
    assert set(free.flatten().tolist()) == set(range(5))


def test_sample_negatives_uniform_over_the_complement():
    lists = [[0, 3, 4, 9], list(range(10))]  # user 1 has seen everything
    pos = data.csr_from_lists(lists)
    g = torch.Generator().manual_seed(0)
    neg = data.sample_negatives(torch.zeros(6000, dtype=torch.int64), 10, 1, exclude=pos, generator=g)
    counts = torch.bincount(neg.flatten(), minlength=10)
    assert counts[[0, 3, 4, 9]].sum() == 0
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 2, 5, 6, 7, 8}
    assert int(counts.max()) < 1.15 * 1000 and int(counts[counts > 0].min()) > 0.85 * 1000
    # no item left: plain uniform draws instead of a hang or an error
    full = data.sample_negatives(torch.ones(300, dtype=torch.int64), 10, 1, exclude=pos, generator=g)
    assert set(full.flatten().tolist()) == set(range(10))
    with pytest.raises(ValueError, match="exclude"):
        data.sample_negatives(torch.zeros(3, dtype=torch.int64), 5, 1, exclude=pos)  # item 9 >= 5


def _write_movielens(path, with_items=True):
    # raw ids are 1-based and sparse (user 10 and 42, items 3, 7, 50)
    (path / "u.data").write_text("42\t7\t5\t881250949\n10\t3\t3\t891717742\n"
                                 "42\t3\t1\t878887116\n10\t50\t4\t880606923\n\n")
    if with_items:
        flags = {3: [0, 1, 0] + [0] * 16,               # Action
                 7: [0, 0, 0, 0, 0, 1, 0, 0, 1] + [0] * 10,  # Comedy, Drama
                 50: [0] * 19,                          # none
                 99: [0, 0, 1] + [0] * 16}              # only in u.item
        lines = [f"{i}|Title {i} (1995)|01-Jan-1995||http://x|" + "|".join(map(str, f)) for i, f in flags.items()]
        (path / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def test_load_movielens(tmp_path):
    _write_movielens(tmp_path)
    d = data.load_movielens(tmp_path)
    assert d.num_users == 2 and d.num_items == 4  # items 3, 7, 50, 99 -> 0, 1, 2, 3
    assert d.users.tolist() == [1, 0, 1, 0]  # users 10 -> 0, 42 -> 1
    assert d.items.tolist() == [1, 0, 0, 2]
    assert d.timestamps.tolist() == [881250949, 891717742, 878887116, 880606923]
    assert d.item_feat.shape == (4, 19) and d.num_item_attrs == 19
    assert d.item_feat[1, 5] == 1 and d.item_feat[1, 8] == 1 and d.item_feat[1].sum() == 2
    assert d.item_attr.tolist() == [1, 5, 0, 2]  # first flagged genre, 0 ("unknown") when none
    assert d.attr_names[5] == "Comedy"
    # leave-last-one-out on it: user 42's latest is item 7 (t=881250949)
    train, test = data.train_test_split(d, 1)
    assert sorted(zip(test.users.tolist(), test.items.tolist())) == [(0, 0), (1, 1)]

    liked = data.load_movielens(tmp_path, min_rating=4)
    assert liked.items.tolist() == [1, 2] and liked.num_users == 2


def test_load_movielens_without_items_and_errors(tmp_path):
    _write_movielens(tmp_path, with_items=False)
    d = data.load_movielens(str(tmp_path))
    assert d.num_items == 3 and d.item_feat.shape == (3, 1) and d.num_item_attrs == 1
    assert d.item_attr.tolist() == [0, 0, 0]
    with pytest.raises(FileNotFoundError, match="u.data"):
        data.load_movielens(tmp_path / "missing")
    (tmp_path / "u.data").write_text("1 2 3 4\n")  # spaces, not tabs
    with pytest.raises(ValueError, match="u.data:1"):
        data.load_movielens(tmp_path)
    for bad in ("1\t2\t3\t4\n5\tabc\t3\t4\n", "user\titem\trating\ttime\n"):  # a non-integer id, a header
        (tmp_path / "u.data").write_text(bad)
        with pytest.raises(ValueError, match=r"u.data:\d+: expected integer user and item ids"):
            data.load_movielens(tmp_path)
    (tmp_path / "u.data").write_text("\n")
    with pytest.raises(ValueError, match="no interactions"):
        data.load_movielens(tmp_path)


def test_load_movielens_rerated_items_count_once(tmp_path):
    """A re-rated item is one interaction at its latest rating: as two, the older could stay in
    the user's training history while the newer was held out (and masked from its own ranking)."""
    (tmp_path / "u.data").write_text("1\t10\t4\t100\n1\t11\t3\t101\n1\t12\t5\t102\n1\t10\t2\t103\n"
                                     "2\t10\t4\t100\n2\t11\t3\t101\n")
    d = data.load_movielens(tmp_path)
    assert len(d) == 5 and sorted(zip(d.users.tolist(), d.items.tolist(), d.timestamps.tolist())) == [
        (0, 0, 103), (0, 1, 101), (0, 2, 102), (1, 0, 100), (1, 1, 101)]
    train, test = data.train_test_split(d, 1)
    assert not set(zip(train.users.tolist(), train.items.tolist())) & set(zip(test.users.tolist(), test.items.tolist()))
    assert len(data.load_movielens(tmp_path, min_rating=3)) == 4  # user 1's item 10: latest rating 2


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError):
        data.synthetic_interactions(0, 10)
    with pytest.raises(ValueError):
        data.synthetic_interactions(10, 10, interactions_per_user=3, min_per_user=5)
