"""Scoring ops (pair_scores, candidate_scores, candidate_topk, topk_scores) against dense references:
the full score matrix and a Python sort implementing the ranking rule (higher score, then lower
item id; NaN after every number; padding -inf / -1 last)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import backend_params
from recsys_kernels.ops import scoring
from recsys_kernels.ops.rowwise import dequantize_rowwise, quantize_rowwise

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------- dense references
def exact(*shape, lo=-3, hi=3):
    """Quarter-integers: exact in fp32/bf16/fp16 and in every dot product of the small shapes
    here, so blocking cannot change a score and equal scores (ties) are common."""
    return torch.randint(lo, hi + 1, shape).float() / 4


def dense_scores(queries, items_f, bias=None):
    s = queries.float() @ items_f.float().t()
    return s if bias is None else s + bias.float()


def rank(entries, k):
    """entries: [(score, item id)] -> the top k by the ranking rule, padded with (-inf, -1)."""
    ordered = sorted(entries, key=lambda e: (math.isnan(e[0]), -e[0] if not math.isnan(e[0]) else 0.0, e[1]))[:k]
    ordered += [(float("-inf"), -1)] * (k - len(ordered))
    return ordered


def split(rows, n_users, k):
    values = torch.tensor([[v for v, _ in r] for r in rows], dtype=torch.float32).reshape(n_users, k)
    ids = torch.tensor([[i for _, i in r] for r in rows], dtype=torch.int64).reshape(n_users, k)
    return values, ids


def dense_topk(queries, items_f, k, bias=None, exclude=None):
    s = dense_scores(queries, items_f, bias)
    rows = []
    for u in range(s.shape[0]):
        banned = set() if exclude is None else set(exclude[u])
        rows.append(rank([(s[u, i].item(), i) for i in range(s.shape[1]) if i not in banned], k))
    return split(rows, s.shape[0], k)


def dense_candidate_topk(queries, items_f, lists, k, bias=None):
    s = dense_scores(queries, items_f, bias)
    return split([rank([(s[u, i].item(), i) for i in lst], k) for u, lst in enumerate(lists)], len(lists), k)


def csr(lists, dtype=torch.int64):
    offsets = [0]
    for lst in lists:
        offsets.append(offsets[-1] + len(lst))
    return (torch.tensor(offsets, dtype=dtype),
            torch.tensor([i for lst in lists for i in lst], dtype=dtype))


def random_lists(n_users, n_items, max_len):
    return [torch.randint(0, n_items, (int(torch.randint(0, max_len + 1, ())),)).tolist() for _ in range(n_users)]


def assert_topk_equal(got, expected):
    values, ids = (t.cpu() for t in got)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    assert values.is_contiguous() and ids.is_contiguous()
    torch.testing.assert_close(values, expected[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ids, expected[1]), f"ids {ids} != {expected[1]}"


# ----------------------------------------------------------------------------- topk_scores
@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
@pytest.mark.parametrize("chunk", [7, 16384])
@pytest.mark.parametrize("k", [0, 1, 5, 23])
@pytest.mark.parametrize("with_exclude,with_bias", [(False, False), (True, False), (True, True), (False, True)])
def test_topk_matches_dense(device, backend, chunk, k, with_exclude, with_bias, monkeypatch):
    monkeypatch.setattr(scoring, "TOPK_CHUNK", chunk)
    n_users, n_items, dim = 6, 23, 5
    q, items = exact(n_users, dim), exact(n_items, dim)
    bias = exact(n_items) if with_bias else None
    exclude = random_lists(n_users, n_items, 8) if with_exclude else None
    kw = {}
    if with_exclude:
        kw["exclude_offsets"], kw["exclude_items"] = (t.to(device) for t in csr(exclude))
    got = scoring.topk_scores(q.to(device), items.to(device), k, item_bias=None if bias is None else bias.to(device),
                              backend=backend, **kw)
    assert_topk_equal(got, dense_topk(q, items, k, bias, exclude))


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
@pytest.mark.parametrize("items_dtype", FLOATS)
@pytest.mark.parametrize("query_dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_topk_dtypes(device, backend, items_dtype, query_dtype, index_dtype, monkeypatch):
    monkeypatch.setattr(scoring, "TOPK_CHUNK", 5)
    q, items, bias = exact(4, 3), exact(17, 3), exact(17)
    exclude = random_lists(4, 17, 5)
    off, ex = (t.to(device) for t in csr(exclude, index_dtype))
    got = scoring.topk_scores(q.to(device, query_dtype), items.to(device, items_dtype), 6, exclude_offsets=off,
                              exclude_items=ex, item_bias=bias.to(device, items_dtype), backend=backend)
    assert_topk_equal(got, dense_topk(q, items, 6, bias, exclude))


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_ties_lower_id_first(device, backend, monkeypatch):
    monkeypatch.setattr(scoring, "TOPK_CHUNK", 7)
    # every item scores the same: the answer is the k lowest ids, across chunk boundaries
    q, items = torch.ones(3, 4), torch.ones(30, 4)
    values, ids = scoring.topk_scores(q.to(device), items.to(device), 12, backend=backend)
    assert torch.equal(ids.cpu(), torch.arange(12).expand(3, 12))
    assert (values == 4).all()
    # two score levels interleaved over chunks: the high level by id, then the low level by id
    items = torch.zeros(30, 4)
    items[[25, 3, 17, 8]] = 1.0
    values, ids = scoring.topk_scores(q.to(device), items.to(device), 7, backend=backend)
    assert torch.equal(ids[0].cpu(), torch.tensor([3, 8, 17, 25, 0, 1, 2]))
    # a tie that the running top-k holds and a later chunk offers again keeps the earlier id
    items = exact(40, 4, lo=0, hi=1)
    assert_topk_equal(scoring.topk_scores(q.to(device), items.to(device), 9, backend=backend),
                      dense_topk(q, items, 9))


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_random_floats(device, backend, monkeypatch):
    monkeypatch.setattr(scoring, "TOPK_CHUNK", 11)
    q, items = torch.randn(5, 16), torch.randn(50, 16)
    values, ids = (t.cpu() for t in scoring.topk_scores(q.to(device), items.to(device), 10, backend=backend))
    s = dense_scores(q, items)
    ref_values, _ = s.sort(dim=1, descending=True)
    torch.testing.assert_close(values, ref_values[:, :10], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.gather(1, ids), values, rtol=1e-5, atol=1e-5)  # the ids carry those scores
    assert all(len(set(r.tolist())) == 10 for r in ids)


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_exclusions(device, backend, monkeypatch):
    monkeypatch.setattr(scoring, "TOPK_CHUNK", 4)
    n_items = 10
    q, items = exact(4, 3), exact(n_items, 3)
    exclude = [list(range(n_items)),            # everything: all padding
               [2, 2, 2, 5, 5],                 # duplicates
               [],                              # nothing
               list(range(0, n_items, 2)) * 2]  # half, listed twice: 5 left for k = 7
    off, ex = (t.to(device) for t in csr(exclude))
    got = scoring.topk_scores(q.to(device), items.to(device), 7, exclude_offsets=off, exclude_items=ex,
                              backend=backend)
    expected = dense_topk(q, items, 7, exclude=exclude)
    assert_topk_equal(got, expected)
    assert (got[1][0] == -1).all() and (got[0][0] == float("-inf")).all()
    assert (got[1][3, 5:] == -1).all() and (got[1][3, :5] % 2 == 1).all()


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_user_blocks(device, backend, monkeypatch):
    # users processed a few at a time: the exclusion lists must follow their users
    monkeypatch.setattr(scoring, "TOPK_CHUNK", 6)
    monkeypatch.setattr(scoring, "TOPK_USER_CHUNK", 3)
    q, items = exact(8, 4), exact(20, 4)
    exclude = random_lists(8, 20, 10)
    off, ex = (t.to(device) for t in csr(exclude))
    got = scoring.topk_scores(q.to(device), items.to(device), 8, exclude_offsets=off, exclude_items=ex,
                              backend=backend)
    assert_topk_equal(got, dense_topk(q, items, 8, exclude=exclude))


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_k_bounds_and_empty(device, backend):
    q, items = exact(3, 4).to(device), exact(9, 4).to(device)
    values, ids = scoring.topk_scores(q, items, 0, backend=backend)
    assert values.shape == (3, 0) and ids.shape == (3, 0)
    assert_topk_equal(scoring.topk_scores(q, items, 9, backend=backend), dense_topk(q.cpu(), items.cpu(), 9))
    with pytest.raises(ValueError, match="k"):
        scoring.topk_scores(q, items, 10, backend=backend)
    values, ids = scoring.topk_scores(q[:0], items, 4, backend=backend)  # no users
    assert values.shape == (0, 4) and ids.shape == (0, 4)
    values, ids = scoring.topk_scores(q, items[:0], 0, backend=backend)  # no items
    assert values.shape == (3, 0)
    # D = 0: every score is 0, so the lowest ids win
    values, ids = scoring.topk_scores(q[:, :0], items[:, :0], 3, backend=backend)
    assert torch.equal(ids.cpu(), torch.arange(3).expand(3, 3)) and (values == 0).all()


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_large_k(device, backend, monkeypatch):
    monkeypatch.setattr(scoring, "TOPK_CHUNK", 1500)
    q, items = exact(2, 3), exact(5000, 3)
    assert_topk_equal(scoring.topk_scores(q.to(device), items.to(device), 4096, backend=backend),
                      dense_topk(q, items, 4096))


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_nan_and_inf_rule(device, backend, monkeypatch):
    monkeypatch.setattr(scoring, "TOPK_CHUNK", 3)
    items = exact(8, 2)
    items[1] = float("nan")              # item 1 scores NaN for everyone
    bias = torch.zeros(8)
    bias[6] = float("-inf")              # item 6 scores -inf
    q = exact(2, 2)
    exclude = [[0, 2, 3, 4, 5, 7], []]   # user 0 keeps only items 1 (NaN) and 6 (-inf)
    off, ex = csr(exclude)
    values, ids = scoring.topk_scores(q.to(device), items.to(device), 4, exclude_offsets=off.to(device),
                                      exclude_items=ex.to(device), item_bias=bias.to(device), backend=backend)
    # -inf (a real item) before NaN, then padding
    assert ids[0].tolist() == [6, 1, -1, -1]
    assert values[0, 0] == float("-inf") and math.isnan(values[0, 1].item())
    assert_topk_equal((values, ids), dense_topk(q, items, 4, bias, exclude))
    # a NaN query: every score is NaN, ranked by id
    values, ids = scoring.topk_scores(torch.full((1, 2), float("nan")).to(device), items.to(device), 3,
                                      backend=backend)
    assert ids.tolist() == [[0, 1, 2]] and torch.isnan(values).all()


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_int8_table_equals_dequantized(device, backend, monkeypatch):
    monkeypatch.setattr(scoring, "TOPK_CHUNK", 7)
    q, w, bias = torch.randn(5, 12), torch.randn(31, 12), torch.randn(31)
    packed = quantize_rowwise(w, 8)
    deq = dequantize_rowwise(packed, 8)
    off, ex = csr(random_lists(5, 31, 6))
    args = dict(exclude_offsets=off.to(device), exclude_items=ex.to(device), item_bias=bias.to(device),
                backend=backend)
    got = scoring.topk_scores(q.to(device), packed.to(device), 9, **args)
    expected = scoring.topk_scores(q.to(device), deq.to(device), 9, **args)
    assert_topk_equal(got, tuple(t.cpu() for t in expected))


# ----------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("device,backend", backend_params("candidate_scores"))
@pytest.mark.parametrize("items_dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_candidate_scores(device, backend, items_dtype, index_dtype, with_bias):
    q, items = torch.randn(6, 7), torch.randn(13, 7).to(items_dtype)
    bias = torch.randn(13).to(items_dtype) if with_bias else None
    lists = random_lists(6, 13, 5) + [[]]
    q = torch.cat([q, torch.randn(1, 7)])
    off, cand = csr(lists, index_dtype)
    got = scoring.candidate_scores(q.to(device), items.to(device), off.to(device), cand.to(device),
                                   None if bias is None else bias.to(device), backend=backend).cpu()
    s = dense_scores(q, items.float(), bias)
    expected = torch.tensor([s[u, i].item() for u, lst in enumerate(lists) for i in lst])
    assert got.dtype == torch.float32 and got.shape == (len(cand),)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("candidate_topk"))
@pytest.mark.parametrize("k", [0, 1, 3, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_candidate_topk_matches_dense(device, backend, k, with_bias):
    n_users, n_items = 7, 15
    q, items = exact(n_users, 4), exact(n_items, 4)
    bias = exact(n_items) if with_bias else None
    # shuffled lists with duplicates and ties; one empty user; one list longer than k
    lists = random_lists(n_users - 2, n_items, 8) + [[], [14, 3, 3, 0, 9, 2, 11, 5, 1, 7, 6]]
    off, cand = csr(lists)
    got = scoring.candidate_topk(q.to(device), items.to(device), off.to(device), cand.to(device), k,
                                 None if bias is None else bias.to(device), backend=backend)
    assert_topk_equal(got, dense_candidate_topk(q, items, lists, k, bias))


@pytest.mark.parametrize("device,backend", backend_params("candidate_topk"))
def test_candidate_topk_ties_and_padding(device, backend):
    q, items = torch.ones(2, 3), torch.ones(10, 3)
    lists = [[9, 4, 7, 1, 8], [5]]
    off, cand = csr(lists)
    values, ids = scoring.candidate_topk(q.to(device), items.to(device), off.to(device), cand.to(device), 3,
                                         backend=backend)
    assert ids.tolist() == [[1, 4, 7], [5, -1, -1]]
    assert values[1].tolist() == [3.0, float("-inf"), float("-inf")]


@pytest.mark.parametrize("device,backend", backend_params("candidate_topk"))
def test_candidate_int8_table_equals_dequantized(device, backend):
    q, w = torch.randn(4, 10), torch.randn(20, 10)
    packed = quantize_rowwise(w, 8)
    deq = dequantize_rowwise(packed, 8)
    off, cand = (t.to(device) for t in csr(random_lists(4, 20, 9)))
    q = q.to(device)
    torch.testing.assert_close(scoring.candidate_scores(q, packed.to(device), off, cand, backend=backend),
                               scoring.candidate_scores(q, deq.to(device), off, cand, backend=backend),
                               rtol=1e-5, atol=1e-6)
    got = scoring.candidate_topk(q, packed.to(device), off, cand, 5, backend=backend)
    expected = scoring.candidate_topk(q, deq.to(device), off, cand, 5, backend=backend)
    assert_topk_equal(got, tuple(t.cpu() for t in expected))


@pytest.mark.parametrize("device,backend", backend_params("candidate_scores"))
def test_candidate_empty(device, backend):
    q, items = torch.randn(3, 4).to(device), torch.randn(5, 4).to(device)
    off, cand = torch.zeros(4, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    assert scoring.candidate_scores(q, items, off, cand, backend=backend).shape == (0,)
    values, ids = scoring.candidate_topk(q, items, off, cand, 2, backend=backend)
    assert (ids == -1).all() and (values == float("-inf")).all() and ids.shape == (3, 2)


# ----------------------------------------------------------------------------- pair_scores
def gather_dot(u, v, ui, ii, bias=None):
    s = (u[ui.long()].float() * v[ii.long()].float()).sum(1)
    return s if bias is None else s + bias[ii.long()].float()


@pytest.mark.parametrize("device,backend", backend_params("pair_scores"))
@pytest.mark.parametrize("user_dtype", FLOATS)
@pytest.mark.parametrize("item_dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_pair_scores(device, backend, user_dtype, item_dtype, index_dtype, with_bias):
    u, v = torch.randn(9, 5).to(user_dtype), torch.randn(11, 5).to(item_dtype)
    bias = torch.randn(11).to(item_dtype) if with_bias else None
    ui, ii = torch.randint(0, 9, (40,), dtype=index_dtype), torch.randint(0, 11, (40,), dtype=index_dtype)
    got = scoring.pair_scores(u.to(device), v.to(device), ui.to(device), ii.to(device),
                              None if bias is None else bias.to(device), backend=backend).cpu()
    assert got.dtype == torch.float32 and got.shape == (40,)
    torch.testing.assert_close(got, gather_dot(u, v, ui, ii, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("pair_scores"))
def test_pair_scores_int8_and_edges(device, backend):
    u, w = torch.randn(4, 6), torch.randn(7, 6)
    packed = quantize_rowwise(w, 8)
    deq = dequantize_rowwise(packed, 8)
    ui, ii = torch.randint(0, 4, (15,)), torch.randint(0, 7, (15,))
    args = (ui.to(device), ii.to(device))
    torch.testing.assert_close(scoring.pair_scores(u.to(device), packed.to(device), *args, backend=backend),
                               scoring.pair_scores(u.to(device), deq.to(device), *args, backend=backend),
                               rtol=1e-5, atol=1e-6)
    # P = 0 and mixed index dtypes
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    assert scoring.pair_scores(u.to(device), w.to(device), empty, empty.long(), backend=backend).shape == (0,)
    got = scoring.pair_scores(u.to(device), w.to(device), ui.int().to(device), ii.to(device), backend=backend)
    torch.testing.assert_close(got.cpu(), gather_dot(u, w, ui, ii), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("pair_scores"))
@pytest.mark.parametrize("dtype", FLOATS)
def test_pair_scores_grads_match_torch_autograd(device, backend, dtype):
    u, v, bias = torch.randn(5, 4).to(dtype), torch.randn(6, 4).to(dtype), torch.randn(6).to(dtype)
    ui = torch.tensor([0, 0, 3, 4, 4, 4, 1])  # duplicates accumulate
    ii = torch.tensor([5, 5, 2, 0, 1, 5, 5])
    grad_out = torch.randn(7)
    leaves = [t.to(device).clone().requires_grad_() for t in (u, v, bias)]
    scoring.pair_scores(leaves[0], leaves[1], ui.to(device), ii.to(device), leaves[2],
                        backend=backend).backward(grad_out.to(device))
    # torch autograd of the same formula, in fp32 (the op accumulates in fp32)
    ref = [t.detach().float().requires_grad_() for t in (u, v, bias)]
    gather_dot(ref[0], ref[1], ui, ii, ref[2]).backward(grad_out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for leaf, r in zip(leaves, ref):
        assert leaf.grad.dtype == dtype and leaf.grad.layout == torch.strided
        torch.testing.assert_close(leaf.grad.cpu().float(), r.grad.to(dtype).float(), **tol)


@pytest.mark.parametrize("device,backend", backend_params("pair_scores"))
def test_pair_scores_gradcheck(device, backend):
    # the score is bilinear, so fp32 central differences are accurate to rounding
    u = torch.randn(3, 4, device=device, requires_grad=True)
    v = torch.randn(5, 4, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    ui = torch.tensor([0, 2, 2, 1], device=device)
    ii = torch.tensor([4, 4, 0, 3], device=device)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: scoring.pair_scores(a, b, ui, ii, c, backend=backend), (u, v, bias),
            eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device,backend", backend_params("pair_scores"))
def test_pair_scores_grad_int8_table(device, backend):
    u = torch.randn(3, 8, device=device, requires_grad=True)
    w = torch.randn(5, 8)
    packed = quantize_rowwise(w, 8).to(device)
    bias = torch.randn(5, device=device, requires_grad=True)
    ui, ii = torch.tensor([0, 1, 1], device=device), torch.tensor([4, 4, 2], device=device)
    scoring.pair_scores(u, packed, ui, ii, bias, backend=backend).sum().backward()
    deq = dequantize_rowwise(packed.cpu(), 8)
    expected = torch.zeros(3, 8).index_add_(0, ui.cpu(), deq[ii.cpu()])
    torch.testing.assert_close(u.grad.cpu(), expected, rtol=1e-5, atol=1e-6)
    assert bias.grad.cpu().tolist() == [0.0, 0.0, 1.0, 0.0, 2.0]


def _pair_grads(q, items, bias, users, picks, grad_out):
    """(grad q, grad items, grad bias) of sum(grad_out * score(users[p], picks[p])) by torch
    autograd of the dense formula, in fp32."""
    leaves = [t.detach().float().requires_grad_() for t in (q, items, bias)]
    (gather_dot(leaves[0], leaves[1], users, picks, leaves[2]) * grad_out).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("device,backend", backend_params("candidate_scores"))
@pytest.mark.parametrize("dtype", FLOATS)
def test_candidate_and_topk_grads_match_torch_autograd(device, backend, dtype):
    """candidate_scores and the values of candidate_topk / topk_scores are scores of (user, item)
    pairs: their gradients are those pairs' (padding slots none), whatever the backend."""
    q, items, bias = torch.randn(4, 6).to(dtype), torch.randn(12, 6).to(dtype), torch.randn(12).to(dtype)
    lists = [[1, 2, 2], [], [11, 0, 3, 3, 7], [5]]  # a user without candidates, duplicates
    off, cand = csr(lists)
    users_of = torch.repeat_interleave(torch.arange(4), off[1:] - off[:-1])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    def check(run, users, picks, grad_out, valid):
        leaves = [t.to(device).clone().requires_grad_() for t in (q, items, bias)]
        out = run(*leaves)
        out.backward(grad_out.to(device))
        expected = _pair_grads(q, items, bias, users[valid], picks[valid], grad_out[valid])
        for leaf, e in zip(leaves, expected):
            assert leaf.grad.dtype == dtype
            torch.testing.assert_close(leaf.grad.cpu().float(), e.to(dtype).float(), **tol)

    check(lambda a, b, c: scoring.candidate_scores(a, b, off.to(device), cand.to(device), c, backend=backend),
          users_of, cand, torch.randn(cand.numel()), torch.ones(cand.numel(), dtype=torch.bool))
    k = 4  # more than users 1 and 3 have: padding slots, whose gradient (even a NaN) goes nowhere
    grad_out = torch.randn(4, k).index_put_((torch.tensor([1, 3]), torch.tensor([0, 2])), torch.tensor(float("nan")))
    _, ids = scoring.candidate_topk(q, items, off, cand, k, bias, backend="reference")
    rows = torch.arange(4)[:, None].expand(4, k)
    check(lambda a, b, c: scoring.candidate_topk(a, b, off.to(device), cand.to(device), k, c, backend=backend)[0],
          rows, ids.clamp(min=0), grad_out, ids >= 0)
    ex_off, ex_items = csr([list(range(10)), [], [3], []])  # user 0 keeps 2 items of 12: 2 padding slots
    _, ids = scoring.topk_scores(q, items, k, exclude_offsets=ex_off, exclude_items=ex_items, item_bias=bias,
                                 backend="reference")
    grad_out = torch.randn(4, k).index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("nan")))
    check(lambda a, b, c: scoring.topk_scores(a, b, k, exclude_offsets=ex_off.to(device),
                                              exclude_items=ex_items.to(device), item_bias=c, backend=backend)[0],
          rows, ids.clamp(min=0), grad_out, ids >= 0)


@pytest.mark.parametrize("device,backend", backend_params("candidate_scores"))
def test_candidate_and_topk_grads_int8_catalog(device, backend):
    """With an int8 row-wise catalog the queries and the bias get gradients (the table has none)."""
    q, bias = torch.randn(3, 8, device=device, requires_grad=True), torch.randn(5, device=device, requires_grad=True)
    packed = quantize_rowwise(torch.randn(5, 8), 8).to(device)
    deq = dequantize_rowwise(packed.cpu(), 8)
    off, cand = csr([[4, 4], [2], []])
    scoring.candidate_scores(q, packed, off.to(device), cand.to(device), bias, backend=backend).sum().backward()
    torch.testing.assert_close(q.grad.cpu(), torch.stack([2 * deq[4], deq[2], torch.zeros(8)]), rtol=1e-5, atol=1e-6)
    assert bias.grad.cpu().tolist() == [0.0, 0.0, 1.0, 0.0, 2.0]
    q.grad = bias.grad = None
    values, ids = scoring.topk_scores(q, packed, 2, item_bias=bias, backend=backend)
    values.sum().backward()
    ids = ids.cpu()
    torch.testing.assert_close(q.grad.cpu(), deq[ids].sum(1), rtol=1e-5, atol=1e-6)
    assert bias.grad.cpu().tolist() == torch.bincount(ids.reshape(-1), minlength=5).float().tolist()


@pytest.mark.parametrize("device,backend", backend_params("candidate_topk"))
def test_topk_grads_with_an_empty_catalog(device, backend):
    """Every slot is padding: zero gradients (there is no item to point the padding pairs at)."""
    q = torch.randn(2, 4, device=device, requires_grad=True)
    items = torch.randn(0, 4, device=device, requires_grad=True)
    bias = torch.randn(0, device=device, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    values, ids = scoring.candidate_topk(q, items, torch.zeros(3, dtype=torch.long, device=device), empty, 3, bias,
                                         backend=backend)
    assert (ids == -1).all()
    values.masked_fill(ids < 0, 0).sum().backward()
    assert q.grad.abs().sum() == 0 and items.grad.shape == (0, 4) and bias.grad.shape == (0,)


# ----------------------------------------------------------------------------- hypothesis
@settings(max_examples=40, deadline=None)
@given(data=st.data(), n_users=st.integers(0, 4), n_items=st.integers(0, 12), dim=st.integers(0, 3),
       chunk=st.integers(1, 13), user_chunk=st.integers(1, 5))
def test_hypothesis_topk_and_candidates(data, n_users, n_items, dim, chunk, user_chunk):
    # the index space: any exclusion / candidate lists (duplicates, empty users), any k, any chunking
    saved = scoring.TOPK_CHUNK, scoring.TOPK_USER_CHUNK  # (monkeypatch does not mix with @given)
    scoring.TOPK_CHUNK, scoring.TOPK_USER_CHUNK = chunk, user_chunk
    try:
        q, items = exact(n_users, dim, lo=-1, hi=1), exact(n_items, dim, lo=-1, hi=1)
        item_id = st.integers(0, n_items - 1) if n_items else st.nothing()
        lists = data.draw(st.lists(st.lists(item_id, max_size=6 if n_items else 0), min_size=n_users,
                                   max_size=n_users))
        off, ids = csr(lists)
        k = data.draw(st.integers(0, n_items))
        assert_topk_equal(scoring.topk_scores(q, items, k, exclude_offsets=off, exclude_items=ids,
                                              backend="reference"),
                          dense_topk(q, items, k, exclude=lists))
        k = data.draw(st.integers(0, 8))
        assert_topk_equal(scoring.candidate_topk(q, items, off, ids, k, backend="reference"),
                          dense_candidate_topk(q, items, lists, k))
    finally:
        scoring.TOPK_CHUNK, scoring.TOPK_USER_CHUNK = saved


# ----------------------------------------------------------------------------- op checks, compile
def _opcheck_cases():
    q, items, bias = torch.randn(4, 6), torch.randn(9, 6), torch.randn(9)
    packed = quantize_rowwise(items, 8)
    off, cand = csr([[1, 2], [], [8, 0, 0], [5]])
    ui, ii = torch.tensor([0, 3, 3, 1]), torch.tensor([2, 8, 8, 0], dtype=torch.int32)
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    ops = torch.ops.recsys_kernels
    return [
        (ops.pair_scores_reference, (grad(q), grad(items), ui, ii, grad(bias))),
        (ops.pair_scores_reference, (grad(q), packed, ui, ii, None)),
        (ops.pair_scores_backward_reference, (torch.randn(4), q, items, ui, ii, bias)),
        (ops.pair_scores_backward_reference, (torch.randn(4), q, packed, ui, ii, None)),
        (ops.candidate_scores_reference, (q, items, off, cand, bias)),
        (ops.candidate_scores_reference, (q, packed, off, cand, None)),
        (ops.candidate_topk_reference, (q, items, off, cand, 2, bias)),
        (ops.topk_scores_reference, (q, items, 3, off, cand, None)),
        (ops.topk_scores_reference, (q, packed, 0, None, None, bias)),
        (ops.candidate_scores_reference, (grad(q), grad(items), off, cand, grad(bias))),
        (ops.candidate_topk_reference, (grad(q), packed, off, cand, 4, grad(bias))),
        (ops.topk_scores_reference, (grad(q), grad(items), 3, off, cand, grad(bias))),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck_reference(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    # every public function in one fullgraph trace (inductor), against eager
    q, items, bias = exact(4, 6), exact(9, 6), exact(9)
    off, cand = csr([[1, 2], [], [8, 0, 0], [5]])
    ui, ii = torch.tensor([0, 3, 3, 1]), torch.tensor([2, 8, 8, 0])

    def fn(q, items, bias):
        return (scoring.pair_scores(q, items, ui, ii, bias, backend="reference"),
                scoring.candidate_scores(q, items, off, cand, bias, backend="reference"),
                *scoring.candidate_topk(q, items, off, cand, 2, bias, backend="reference"),
                *scoring.topk_scores(q, items, 3, exclude_offsets=off, exclude_items=cand, item_bias=bias,
                                     backend="reference"))

    expected = fn(q, items, bias)
    got = torch.compile(fn, fullgraph=True)(q, items, bias)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_compiled_k_does_not_recompile_per_value(device, backend):
    # k is a SymInt in the schemas: like torch.topk's, it goes dynamic after the second value.
    # As `int k` every new k compiled a new graph, and the 9th hit torch's recompile limit
    # (FailOnRecompileLimitHit with fullgraph=True).
    from torch._dynamo.utils import counters

    q, items, bias = exact(4, 6).to(device), exact(30, 6).to(device), exact(30).to(device)
    off, cand = (t.to(device) for t in csr([[1, 2, 3, 4], [], [8, 0, 0, 5, 9, 10, 11, 12, 13, 14], [5]]))

    def fn(q, k):
        return (scoring.topk_scores(q, items, k, item_bias=bias, backend=backend),
                scoring.candidate_topk(q, items, off, cand, k, bias, backend=backend))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for k in range(1, 12):
        for got, expected in zip(compiled(q, k), fn(q, k)):
            for g, e in zip(got, expected):
                assert torch.equal(g.cpu(), e.cpu()), k
    assert counters["stats"]["unique_graphs"] <= 2


def test_compile_fullgraph_backward():
    u = torch.randn(4, 3, requires_grad=True)
    v = torch.randn(6, 3, requires_grad=True)
    ui, ii = torch.tensor([0, 1, 1]), torch.tensor([5, 5, 2])
    torch.compile(lambda a, b: scoring.pair_scores(a, b, ui, ii, backend="reference").sum(),
                  fullgraph=True, backend="aot_eager")(u, v).backward()
    torch.testing.assert_close(u.grad, torch.zeros(4, 3).index_add_(0, ui, v.detach()[ii]))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_backward_of_candidate_and_topk_ops(compile_backend):
    """Training through the candidate and top-k ops under torch.compile, dynamic sizes: the
    gradients are eager mode's."""
    q0, v0, b0 = torch.randn(3, 4), torch.randn(7, 4), torch.randn(7)

    def loss(q, v, b, off, cand):
        values, _ = scoring.topk_scores(q, v, 2, item_bias=b, backend="reference")
        cand_values, _ = scoring.candidate_topk(q, v, off, cand, 2, item_bias=b, backend="reference")
        scores = scoring.candidate_scores(q, v, off, cand, item_bias=b, backend="reference")
        return values.sum() + cand_values.masked_fill(cand_values == float("-inf"), 0).sum() + scores.square().sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=compile_backend)
    for lists in ([[1, 2], [], [6, 0, 0]], [[3], [4, 5, 6, 1], [2], ]):
        off, cand = csr(lists)
        grads = []
        for fn in (loss, compiled):
            leaves = [t.clone().requires_grad_() for t in (q0, v0, b0)]
            fn(*leaves, off, cand).backward()
            grads.append([t.grad for t in leaves])
        for e, g in zip(*grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
Q, IT, B = torch.randn(3, 4), torch.randn(6, 4), torch.randn(6)
OFF, CAND = torch.tensor([0, 1, 1, 3]), torch.tensor([2, 0, 5])
UI, II = torch.tensor([0, 2]), torch.tensor([1, 5])
PACKED = quantize_rowwise(IT, 8)
ps, cs, ct, tk = scoring.pair_scores, scoring.candidate_scores, scoring.candidate_topk, scoring.topk_scores


@pytest.mark.parametrize("bad,exc,match", [
    # pair_scores: every argument
    (lambda: ps(Q.double(), IT, UI, II), TypeError, "user_emb"),
    (lambda: ps(Q[0], IT, UI, II), ValueError, "user_emb"),
    (lambda: ps([[1.0]], IT, UI, II), TypeError, "user_emb"),
    (lambda: ps(Q, IT.int(), UI, II), TypeError, "item_emb"),
    (lambda: ps(Q, IT[0], UI, II), ValueError, "item_emb"),
    (lambda: ps(Q, torch.randn(6, 5), UI, II), ValueError, "dim"),
    (lambda: ps(Q, torch.zeros(6, 8, dtype=torch.uint8), UI, II), ValueError, "item_emb"),
    (lambda: ps(Q, torch.zeros(6, 13, dtype=torch.uint8), UI, II), ValueError, "dim"),
    (lambda: ps(Q, IT, UI.float(), II), TypeError, "user_idx"),
    (lambda: ps(Q, IT, UI[None], II), ValueError, "user_idx"),
    (lambda: ps(Q, IT, UI, II.to(torch.int16)), TypeError, "item_idx"),
    (lambda: ps(Q, IT, UI, II[:1]), ValueError, "same length"),
    (lambda: ps(Q, IT, torch.tensor([0, 3]), II), IndexError, "user_idx"),
    (lambda: ps(Q, IT, torch.tensor([-1, 0]), II), IndexError, "user_idx"),
    (lambda: ps(Q, IT, UI, torch.tensor([0, 6])), IndexError, "item_idx"),
    (lambda: ps(Q, PACKED, UI, torch.tensor([0, 6])), IndexError, "item_idx"),
    (lambda: ps(Q, IT, UI, II, B[:5]), ValueError, "item_bias"),
    (lambda: ps(Q, IT, UI, II, B.long()), TypeError, "item_bias"),
    (lambda: ps(Q, IT, UI, II, B[None]), ValueError, "item_bias"),
    (lambda: ps(Q, IT, UI, II, backend="nope"), ValueError, "backend"),
    (lambda: ps(Q, IT.to("meta"), UI, II), ValueError, "device"),
    # candidate_scores / candidate_topk
    (lambda: cs(Q.long(), IT, OFF, CAND), TypeError, "queries"),
    (lambda: cs(Q, IT.double(), OFF, CAND), TypeError, "items"),
    (lambda: cs(Q, IT[:, :3], OFF, CAND), ValueError, "dim"),
    (lambda: cs(Q, IT, OFF[:3], CAND), ValueError, "cand_offsets"),
    (lambda: cs(Q, IT, OFF.float(), CAND), TypeError, "cand_offsets"),
    (lambda: cs(Q, IT, OFF, CAND[None]), ValueError, "cand_items"),
    (lambda: cs(Q, IT, torch.tensor([1, 1, 1, 3]), CAND), ValueError, "cand_offsets"),
    (lambda: cs(Q, IT, torch.tensor([0, 2, 1, 3]), CAND), ValueError, "cand_offsets"),
    (lambda: cs(Q, IT, torch.tensor([0, 1, 1, 2]), CAND), ValueError, "cand_offsets"),
    (lambda: cs(Q, IT, torch.tensor([0, 1, 1, 4]), CAND), ValueError, "cand_offsets"),
    (lambda: cs(Q, IT, OFF, torch.tensor([2, 6, 0])), IndexError, "cand_items"),
    (lambda: cs(Q, IT, OFF, torch.tensor([2, -1, 0])), IndexError, "cand_items"),
    (lambda: cs(Q, IT, OFF, CAND, B[:2]), ValueError, "item_bias"),
    (lambda: ct(Q, IT, OFF, CAND, -1), ValueError, "k"),
    (lambda: ct(Q, IT, OFF, CAND, 2.0), TypeError, "k"),
    (lambda: ct(Q, IT, OFF, CAND, True), TypeError, "k"),
    (lambda: ct(Q, IT, torch.tensor([0, 0, 0, 2]), CAND, 2), ValueError, "cand_offsets"),
    (lambda: ct(Q, PACKED, OFF, torch.tensor([2, 9, 0]), 2), IndexError, "cand_items"),
    # topk_scores
    (lambda: tk(Q.long(), IT, 2), TypeError, "queries"),
    (lambda: tk(Q, IT.bool(), 2), TypeError, "items"),
    (lambda: tk(Q, IT[None], 2), ValueError, "items"),
    (lambda: tk(Q, torch.randn(6, 2), 2), ValueError, "dim"),
    (lambda: tk(Q, IT, 7), ValueError, "k"),
    (lambda: tk(Q, IT, -1), ValueError, "k"),
    (lambda: tk(Q, IT, None), TypeError, "k"),
    (lambda: tk(Q, IT, 2, exclude_offsets=OFF), ValueError, "exclude"),
    (lambda: tk(Q, IT, 2, exclude_items=CAND), ValueError, "exclude"),
    (lambda: tk(Q, IT, 2, exclude_offsets=OFF[:2], exclude_items=CAND), ValueError, "exclude_offsets"),
    (lambda: tk(Q, IT, 2, exclude_offsets=OFF.float(), exclude_items=CAND), TypeError, "exclude_offsets"),
    (lambda: tk(Q, IT, 2, exclude_offsets=OFF, exclude_items=CAND.float()), TypeError, "exclude_items"),
    (lambda: tk(Q, IT, 2, exclude_offsets=torch.tensor([0, 1, 1, 9]), exclude_items=CAND), ValueError,
     "exclude_offsets"),
    (lambda: tk(Q, IT, 2, exclude_offsets=torch.tensor([0, 2, 1, 3]), exclude_items=CAND), ValueError,
     "exclude_offsets"),
    (lambda: tk(Q, IT, 2, exclude_offsets=OFF, exclude_items=torch.tensor([0, 6, 1])), IndexError,
     "exclude_items"),
    (lambda: tk(Q, PACKED, 2, exclude_offsets=OFF, exclude_items=torch.tensor([0, -2, 1])), IndexError,
     "exclude_items"),
    (lambda: tk(Q, IT, 2, item_bias=B.int()), TypeError, "item_bias"),
    (lambda: tk(Q, IT, 2, item_bias=B[:1]), ValueError, "item_bias"),
    (lambda: tk(Q, PACKED[:, :8], 2), ValueError, "items"),
])
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_checks_the_bias_before_the_exclusion_values(device, backend):
    # one call with a bad bias and a bad exclusion list: every backend names the bias (the front
    # door's order: every argument's metadata, then values); the C++ ops checked the list first
    q, items = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    off, ex = torch.tensor([0, 2, 1, 2], device=device), torch.tensor([1, 9], device=device)
    for bias, exc in ((torch.zeros(5, dtype=torch.float64, device=device), TypeError),
                      (torch.zeros(4, device=device), ValueError)):
        for queries in (q, q.clone().requires_grad_()):  # the direct call and the checked one
            with pytest.raises(exc, match="item_bias"):
                scoring.topk_scores(queries, items, 2, exclude_offsets=off, exclude_items=ex, item_bias=bias,
                                    backend=backend)


def test_non_finite_packed_scale_raises():
    packed = PACKED.clone()
    packed[2, 4:8] = torch.tensor([float("nan")]).view(torch.uint8)
    with pytest.raises(ValueError, match="non-finite"):
        tk(Q, packed, 2)
    with pytest.raises(ValueError, match="non-finite"):
        ps(Q, packed, torch.tensor([0]), torch.tensor([2]))


def test_rank_key_orders_special_values():
    # the reference's ranking key: numbers by value (-0.0 ties +0.0), then -inf, then NaN, ties
    # by lower id; decoding gives the scores back
    scores = torch.tensor([[float("nan"), 1.0, -0.0, float("-inf"), 0.0, float("inf"), -1e-45, 1e-45,
                            -3.4e38, float("nan"), 1.0]])
    ids = torch.arange(scores.shape[1])
    values, top = scoring._decode(scoring._top_keys(scoring._rank_key(scores, ids, None), 13))
    assert top.tolist() == [[5, 1, 10, 7, 2, 4, 6, 8, 3, 0, 9, -1, -1]]
    expected = [float("inf"), 1.0, 1.0, 1e-45, 0.0, 0.0, -1e-45, -3.4e38, float("-inf"), float("nan"),
                float("nan"), float("-inf"), float("-inf")]
    torch.testing.assert_close(values, torch.tensor([expected]), rtol=0, atol=0, equal_nan=True)
