"""Ranking metrics: hand-computed cases (numbers written out), a brute-force Python check on
random lists, and bad input."""
import math
import random

import pytest
import torch

from recsys_kernels import metrics
from recsys_kernels.data import csr_from_lists

ALL = (metrics.dcg_at_k, metrics.ndcg_at_k, metrics.recall_at_k, metrics.hit_rate_at_k, metrics.mrr)

# 1 / log2(j + 2) for positions j = 0, 1, 2, 3
D0, D1, D2, D3 = 1.0, 0.6309297535714575, 0.5, 0.43067655807339306

# four users, lists of length 4
RANKED = torch.tensor([
    [3, 1, 7, -1],   # relevant {1, 7, 9}: hits at positions 1 and 2, one padding slot
    [5, 5, 2, 0],    # relevant {5}: hit at position 0; the repeated 5 must not count again
    [4, 6, 8, 2],    # relevant {}: excluded from the mean
    [-1, -1, -1, -1],  # relevant {0}: nothing recommended
])
RELEVANT = [{1, 7, 9}, {5}, set(), {0}]


def test_hand_computed_full_list():
    rel = csr_from_lists(RELEVANT)
    nan = float("nan")
    # user 0: dcg = 1/log2(3) + 1/log2(4) = 0.63093 + 0.5 = 1.13093
    #         idcg over min(3, 4) = 3 hits = 1 + 0.63093 + 0.5 = 2.13093 -> ndcg 0.53072
    expected = {
        metrics.dcg_at_k: [1.1309297535714575, 1.0, nan, 0.0],
        metrics.ndcg_at_k: [1.1309297535714575 / 2.1309297535714575, 1.0, nan, 0.0],
        metrics.recall_at_k: [2 / 3, 1.0, nan, 0.0],
        metrics.hit_rate_at_k: [1.0, 1.0, nan, 0.0],
        metrics.mrr: [0.5, 1.0, nan, 0.0],
    }
    assert D1 + D2 == pytest.approx(1.1309297535714575)
    assert 1.1309297535714575 / 2.1309297535714575 == pytest.approx(0.5307212739772434)
    for fn, values in expected.items():
        got = fn(RANKED, rel, reduction="none")
        assert got.dtype == torch.float64 and got.shape == (4,)
        torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), equal_nan=True)
        # the mean skips user 2 (no relevant items)
        mean = fn(RANKED, rel)
        assert mean.dim() == 0
        assert float(mean) == pytest.approx((values[0] + values[1] + values[3]) / 3)


def test_hand_computed_cutoff():
    rel = csr_from_lists(RELEVANT)
    # k = 2, user 0: only the hit at position 1 counts: dcg = 0.63093,
    # idcg over min(3, 2) = 2 hits = 1.63093 -> ndcg = 0.38685; recall 1/3; mrr 1/2
    ndcg = metrics.ndcg_at_k(RANKED, rel, 2, reduction="none")
    assert float(ndcg[0]) == pytest.approx(0.6309297535714575 / 1.6309297535714575)
    assert float(ndcg[0]) == pytest.approx(0.3868528072345416)
    assert float(metrics.recall_at_k(RANKED, rel, 2, reduction="none")[0]) == pytest.approx(1 / 3)
    assert float(metrics.mrr(RANKED, rel, 2, reduction="none")[0]) == pytest.approx(0.5)
    # k = 1: user 0 misses, user 1 hits
    torch.testing.assert_close(metrics.hit_rate_at_k(RANKED, rel, 1, reduction="none"),
                               torch.tensor([0.0, 1.0, float("nan"), 0.0], dtype=torch.float64), equal_nan=True)


def test_k_beyond_list_is_padding():
    # a list of 2 with k = 5: the 3 missing positions are padding, but idcg still uses
    # min(|R|, 5) = 3 positions: dcg = 1 (hit at 0), idcg = 1 + 0.63093 + 0.5 -> 0.46928
    ranked = torch.tensor([[2, 9]])
    rel = csr_from_lists([[2, 3, 4]])
    assert float(metrics.ndcg_at_k(ranked, rel, 5)) == pytest.approx(1 / (D0 + D1 + D2))
    assert float(metrics.ndcg_at_k(ranked, rel, 5)) == pytest.approx(0.46927872602275644)
    assert float(metrics.recall_at_k(ranked, rel, 5)) == pytest.approx(1 / 3)


def test_perfect_ranking_has_ndcg_one():
    ranked = torch.tensor([[4, 2, 8, 1, 0]])
    rel = csr_from_lists([[2, 4, 8]])
    assert float(metrics.ndcg_at_k(ranked, rel, 5)) == pytest.approx(1.0)
    assert float(metrics.dcg_at_k(ranked, rel, 5)) == pytest.approx(D0 + D1 + D2)
    # more relevant items than k: idcg is capped at k positions, so a full top-2 is still 1
    assert float(metrics.ndcg_at_k(ranked, rel, 2)) == pytest.approx(1.0)
    assert float(metrics.recall_at_k(ranked, rel, 2)) == pytest.approx(2 / 3)


def test_duplicate_relevant_items_count_once():
    ranked = torch.tensor([[7, 1]])
    rel = (torch.tensor([0, 3]), torch.tensor([7, 7, 3]))  # |R| = 2 distinct items
    assert float(metrics.recall_at_k(ranked, rel)) == pytest.approx(0.5)
    assert float(metrics.ndcg_at_k(ranked, rel)) == pytest.approx(1 / (D0 + D1))


def test_list_of_sets_equals_csr_and_int32():
    rel_csr = csr_from_lists(RELEVANT)
    rel32 = (rel_csr[0].int(), rel_csr[1].int())
    for fn in ALL:
        a = fn(RANKED, RELEVANT, reduction="none")
        b = fn(RANKED.int(), rel32, reduction="none")
        c = fn(RANKED, rel_csr, reduction="none")
        torch.testing.assert_close(a, c, equal_nan=True)
        torch.testing.assert_close(b, c, equal_nan=True)


def test_no_user_with_relevant_items_gives_nan_mean():
    ranked = torch.tensor([[0, 1], [1, 2]])
    for fn in ALL:
        assert math.isnan(float(fn(ranked, [set(), set()])))
    # zero users
    assert math.isnan(float(metrics.ndcg_at_k(torch.empty(0, 3, dtype=torch.int64), [])))


def _brute(ranked, relevant, k):
    """Straight from the definitions, one user at a time."""
    out = {"dcg": [], "ndcg": [], "recall": [], "hit": [], "mrr": []}
    for row, rel in zip(ranked, relevant):
        rel = set(rel)
        if not rel:
            for v in out.values():
                v.append(float("nan"))
            continue
        seen, hits = set(), []
        for j in range(k):
            item = row[j] if j < len(row) else -1
            hits.append(1 if item >= 0 and item in rel and item not in seen else 0)
            seen.add(item)
        dcg = sum(h / math.log2(j + 2) for j, h in enumerate(hits))
        idcg = sum(1 / math.log2(j + 2) for j in range(min(len(rel), k)))
        first = next((j for j, h in enumerate(hits) if h), None)
        out["dcg"].append(dcg)
        out["ndcg"].append(dcg / idcg)
        out["recall"].append(sum(hits) / len(rel))
        out["hit"].append(float(any(hits)))
        out["mrr"].append(0.0 if first is None else 1 / (first + 1))
    return out


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_brute_force_random(k):
    rng = random.Random(k)
    users, width, n_items = 37, 7, 15
    ranked = [[rng.randrange(-1, n_items) for _ in range(width)] for _ in range(users)]  # repeats, padding
    relevant = [[rng.randrange(n_items) for _ in range(rng.randrange(0, 6))] for _ in range(users)]
    expected = _brute(ranked, relevant, k)
    ranked_t = torch.tensor(ranked)
    rel = csr_from_lists(relevant)
    pairs = {"dcg": metrics.dcg_at_k, "ndcg": metrics.ndcg_at_k, "recall": metrics.recall_at_k,
             "hit": metrics.hit_rate_at_k, "mrr": metrics.mrr}
    for name, fn in pairs.items():
        exp = torch.tensor(expected[name], dtype=torch.float64)
        torch.testing.assert_close(fn(ranked_t, rel, k, reduction="none"), exp, equal_nan=True)
        torch.testing.assert_close(fn(ranked_t, rel, k), torch.nanmean(exp))


def test_bad_input():
    rel = csr_from_lists(RELEVANT)
    with pytest.raises(TypeError, match="ranked_ids"):
        metrics.ndcg_at_k(RANKED.float(), rel)
    with pytest.raises(TypeError, match="ranked_ids"):
        metrics.ndcg_at_k([[1, 2]], rel)
    with pytest.raises(ValueError, match="ranked_ids"):
        metrics.ndcg_at_k(RANKED[0], rel)
    with pytest.raises(ValueError, match="k must"):
        metrics.recall_at_k(RANKED, rel, 0)
    with pytest.raises(ValueError, match="reduction"):
        metrics.mrr(RANKED, rel, reduction="sum")
    with pytest.raises(ValueError, match="relevant.*entries"):
        metrics.ndcg_at_k(RANKED, csr_from_lists(RELEVANT[:3]))
    with pytest.raises(ValueError, match="relevant.*offsets"):
        metrics.ndcg_at_k(RANKED, (torch.tensor([0, 2, 1, 3, 4]), torch.tensor([1, 2, 3, 4])))
    with pytest.raises(ValueError, match="relevant.*>= 0"):
        metrics.ndcg_at_k(RANKED[:1], (torch.tensor([0, 1]), torch.tensor([-3])))
    with pytest.raises(TypeError, match="relevant"):
        metrics.ndcg_at_k(RANKED, (rel[0].float(), rel[1]))
    with pytest.raises(TypeError, match="relevant"):
        metrics.ndcg_at_k(RANKED, torch.tensor([1, 2]))
