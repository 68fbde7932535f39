"""The C++ CPU kernels of the scoring ops beyond test_scoring.py's shared matrix: every CPU path
(AVX-512 / AVX512-VNNI where the CPU has them, AVX2 and the forced scalar fallback, which must agree
bit for bit), shapes that cross the kernel's
register tiles, chunks, query slabs and item ranges, large k and k = I, ties, NaN, exclusion lists
longer than I - k, no queries, int8 recall on random data, the native ops called directly."""
import pytest
import torch

from helpers import has_avx2 as _has_avx2, has_cpu_feature, on_isa, on_threads
from recsys_kernels import _loader
from recsys_kernels.ops import scoring
from recsys_kernels.ops.rowwise import dequantize_rowwise, quantize_rowwise

pytestmark = pytest.mark.skipif(
    "_C" not in _loader.EXTENSIONS or not _loader.has_native_kernel("topk_scores", "CPU"),
    reason="the C++ CPU kernels of the scoring ops are not built")

OPS = torch.ops.recsys_kernels
def both_paths(fn):
    """(scalar result, avx2 result); avx2 = scalar when the CPU has no AVX2. Where the CPU has
    AVX-512 (the score tile) and AVX512-VNNI (the int8 prefilter), those paths' results must be the
    AVX2 result, bit for bit."""
    scalar = on_isa("scalar", fn)
    avx2 = on_isa("avx2", fn) if _has_avx2() else scalar
    for isa, feature in (("avx512", "avx512"), ("avx512_vnni", "avx512_vnni")):
        if has_cpu_feature(feature):
            assert_same(on_isa(isa, fn), avx2)
    return scalar, avx2


def assert_same(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def exact(*shape, lo=-3, hi=3, generator=None):
    return torch.randint(lo, hi + 1, shape, generator=generator).float() / 4


def csr(lists, dtype=torch.int64):
    offsets = [0]
    for lst in lists:
        offsets.append(offsets[-1] + len(lst))
    return torch.tensor(offsets, dtype=dtype), torch.tensor([i for lst in lists for i in lst], dtype=dtype)


def ref_topk(*args, **kw):
    return scoring.topk_scores(*args, backend="reference", **kw)


def cpu_topk(*args, **kw):
    return scoring.topk_scores(*args, backend="cpu", **kw)


# ----------------------------------------------------------------------------- topk_scores
@pytest.mark.parametrize("n_users,n_items,dim,k", [
    (1, 1, 1, 1), (15, 37, 3, 5), (16, 6, 8, 6), (17, 100, 64, 10), (40, 3000, 33, 77),
    (33, 5000, 7, 1), (1100, 300, 4, 20),  # > 1024 queries: several slabs
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_paths_agree_with_reference(n_users, n_items, dim, k, dtype):
    g = torch.Generator().manual_seed(n_users * 7 + n_items)
    q, items, bias = exact(n_users, dim, generator=g), exact(n_items, dim, generator=g), exact(n_items, generator=g)
    lists = [torch.randint(0, n_items, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n_users)]
    off, ex = csr(lists)
    args = (q.to(dtype), items.to(dtype), k)
    kw = dict(exclude_offsets=off, exclude_items=ex, item_bias=bias.to(dtype))
    scalar, avx2 = both_paths(lambda: cpu_topk(*args, **kw))
    assert_same(scalar, avx2)
    assert_same(avx2, ref_topk(*args, **kw))


# Groups of at most 4 queries take the few-query tile (items in the lanes, 64 a pass): chunks of
# 1020 (D = 1), 360 (D = 17), 180 (D = 33) and 60 (D = 100) rows end in passes of 1 to 4 blocks of
# 16, some partial; 18 and 20 queries leave a last group of 2 and 4.
@pytest.mark.parametrize("n_users", [1, 2, 4, 5, 18, 20])
@pytest.mark.parametrize("n_items,dim", [(2100, 1), (1000, 17), (500, 33), (250, 100), (64, 64), (7, 5)])
def test_topk_few_queries(n_users, n_items, dim):
    g = torch.Generator().manual_seed(n_users * 100 + dim)
    q, items, bias = exact(n_users, dim, generator=g), exact(n_items, dim, generator=g), exact(n_items, generator=g)
    items[n_items // 2] = float("nan")
    lists = [torch.randint(0, n_items, (3,), generator=g).tolist() for _ in range(n_users)]
    off, ex = csr(lists)
    k = min(n_items, 37)
    for kw in (dict(), dict(exclude_offsets=off, exclude_items=ex, item_bias=bias)):
        scalar, avx2 = both_paths(lambda: cpu_topk(q, items, k, **kw))
        assert_same(scalar, avx2)
        assert_same(avx2, ref_topk(q, items, k, **kw))


def test_topk_random_floats_both_paths():
    g = torch.Generator().manual_seed(0)
    q, items, bias = torch.randn(37, 64, generator=g), torch.randn(20000, 64, generator=g), torch.randn(20000, generator=g)
    scalar, avx2 = both_paths(lambda: cpu_topk(q, items, 50, item_bias=bias))
    assert_same(scalar, avx2)
    s = q @ items.t() + bias
    ref_values = s.topk(50, dim=1).values
    torch.testing.assert_close(avx2[0], ref_values, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s.gather(1, avx2[1]), avx2[0], rtol=1e-5, atol=1e-4)
    assert (avx2[0][:, :-1] >= avx2[0][:, 1:]).all()


@pytest.mark.parametrize("k", [4096, 5000])  # large k, and k = I
def test_topk_large_k_and_k_equals_items(k):
    q, items = exact(18, 5), exact(5000, 5)
    scalar, avx2 = both_paths(lambda: cpu_topk(q, items, k))
    assert_same(scalar, avx2)
    assert_same(avx2, ref_topk(q, items, k))
    if k == 5000:  # every item once per query
        assert all(sorted(r.tolist()) == list(range(5000)) for r in avx2[1])


def test_topk_all_ties_lower_ids_first_across_ranges():
    # 100k equal scores: the answer is the k lowest ids, whatever the split into ranges and chunks
    q, items = torch.ones(3, 8), torch.ones(100_000, 8)
    for isa in ("scalar", "avx2", "avx512"):  # the cap never enables a path the CPU lacks
        values, ids = on_isa(isa, lambda: cpu_topk(q, items, 300))
        assert torch.equal(ids, torch.arange(300).expand(3, 300)) and (values == 8).all()


def test_topk_nan_queries_and_items():
    items = exact(50, 4)
    items[[3, 17]] = float("nan")
    q = exact(20, 4)
    q[[2, 19]] = float("nan")  # every score NaN: ranked by id
    scalar, avx2 = both_paths(lambda: cpu_topk(q, items, 50))
    assert_same(scalar, avx2)
    assert_same(avx2, ref_topk(q, items, 50))
    assert avx2[1][2].tolist() == list(range(50)) and torch.isnan(avx2[0][2]).all()
    assert avx2[1][0, -2:].tolist() == [3, 17]  # NaN items last for a normal query


def test_topk_dense_exclusions_across_item_ranges():
    # each query excludes about half the catalog, unsorted with duplicates; on 2 threads the
    # catalog is split into item ranges, and each range starts its walk of the sorted lists midway
    g = torch.Generator().manual_seed(3)
    n_items = 6000
    q, items, bias = exact(21, 9, generator=g), exact(n_items, 9, generator=g), exact(n_items, generator=g)
    lists = [torch.randint(0, n_items, (n_items // 2,), generator=g).tolist() for _ in range(21)]
    off, ex = csr(lists)
    scalar, avx2 = on_threads(2, lambda: both_paths(
        lambda: cpu_topk(q, items, 40, exclude_offsets=off, exclude_items=ex, item_bias=bias)))
    assert_same(scalar, avx2)
    assert_same(avx2, ref_topk(q, items, 40, exclude_offsets=off, exclude_items=ex, item_bias=bias))


def test_topk_exclusions_longer_than_items_minus_k():
    n_items, k = 40, 10
    q, items = exact(5, 3), exact(n_items, 3)
    lists = [list(range(35)),                       # 5 left for k = 10: padding
             list(range(n_items)) * 2,              # everything, twice
             list(range(0, n_items, 2)) + [1, 1],   # 19 left
             [],
             list(range(n_items - 1, 0, -1))]       # only item 0 left
    off, ex = csr(lists, torch.int32)
    scalar, avx2 = both_paths(lambda: cpu_topk(q, items, k, exclude_offsets=off, exclude_items=ex))
    assert_same(scalar, avx2)
    assert_same(avx2, ref_topk(q, items, k, exclude_offsets=off, exclude_items=ex))
    assert (avx2[1][0, 5:] == -1).all() and (avx2[1][1] == -1).all() and avx2[1][4].tolist()[:2] == [0, -1]


def test_topk_no_queries_and_k_zero():
    items = exact(9, 4)
    v, i = cpu_topk(exact(0, 4), items, 4)
    assert v.shape == (0, 4) and i.shape == (0, 4)
    v, i = cpu_topk(exact(3, 4), items, 0)
    assert v.shape == (3, 0) and i.shape == (3, 0)


@pytest.mark.parametrize("dim", [1, 5, 32, 33])
def test_topk_int8_equals_dequantized_and_recall(dim):
    # the AVX2 path prefilters int8 rows with integer dot products and rescores exactly (on
    # catalogs of 65536 items and more): its answer must be the scalar path's (which dequantizes)
    # and the dequantized fp32 table's, bit for bit
    g = torch.Generator().manual_seed(dim)
    n_users, n_items = 37, 70000
    q, w = torch.randn(n_users, dim, generator=g), torch.randn(n_items, dim, generator=g)
    w[7] *= 1e6  # one row of a much larger scale
    bias = torch.randn(n_items, generator=g) * 0.1
    lists = [torch.randint(0, n_items, (50,), generator=g).tolist() for _ in range(n_users)]
    off, ex = csr(lists)
    packed = quantize_rowwise(w, 8)
    deq = dequantize_rowwise(packed, 8)
    kw = dict(exclude_offsets=off, exclude_items=ex, item_bias=bias)
    scalar, avx2 = both_paths(lambda: cpu_topk(q, packed, 100, **kw))
    assert_same(scalar, avx2)
    assert_same(avx2, cpu_topk(q, deq, 100, **kw))
    if dim >= 32:  # quantization keeps most of the exact top-100 of random data
        s = q @ w.t() + bias
        s[torch.repeat_interleave(torch.arange(n_users), 50), ex] = float("-inf")
        exact_ids = s.topk(100, dim=1).indices
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(avx2[1], exact_ids))
        assert hits / exact_ids.numel() >= 0.95


@pytest.mark.parametrize("query_max", [32, 127])
@pytest.mark.parametrize("k", [1, 4])
def test_topk_int8_prefilter_bound_is_tight_enough(k, query_max):
    # Data on which the prefilter's error bound is attained: every query value sits 0.49 of a
    # quantization step off its code in the direction of sign_d, and every row is +-m * sign_d
    # (codes 0 and 255), so the integer dot underestimates each score by the whole bound. The
    # best rows beat the rest by about 1% of the bound: a bound a few percent short of the true
    # error drops them (3% short fails k = 1), and the answer differs from the scalar path's.
    # query_max: the prefilter's query range, 32 on AVX2 and 127 on VNNI (both_paths runs VNNI
    # where the CPU has it): the data is built for the path of that range (at 127, VNNI's bound 5%
    # short fails k = 1, 3% short passes).
    g = torch.Generator().manual_seed(k)
    dim, n_items = 8, 70000  # >= 65536 items: the AVX2 path prefilters
    sign = torch.where(torch.rand(dim, generator=g) < 0.5, -1.0, 1.0)
    q = sign * (torch.randint(0, query_max, (dim,), generator=g).float() + 0.49)
    q[0] = query_max * sign[0]  # the largest |q|: step 1, no error in this column
    m = 1.0 + torch.rand(n_items, generator=g)  # scores m * sum|q|, the bound ~ 0.49 * 7 * m
    gap = 0.0005 * 32 / query_max  # sum|q| grows with query_max, the bound does not
    m[50000:50000 + k] = 2.0 + gap * torch.arange(1, k + 1)  # the best, in a later chunk
    packed = quantize_rowwise(m[:, None] * sign, 8)
    queries = q.expand(17, dim).contiguous()  # int8 catalogs take the prefilter from 17 queries
    scalar, avx2 = both_paths(lambda: cpu_topk(queries, packed, k))
    assert_same(scalar, avx2)
    assert all(sorted(ids.tolist()) == list(range(50000, 50000 + k)) for ids in avx2[1])


def test_topk_int8_nan_query_and_huge_rows():
    w = torch.randn(70000, 8)  # >= 65536 items: the AVX2 path prefilters
    w[5] = 1e36  # 255 * scale + |bias| beyond the prefilter's range: that chunk takes the fp32 path
    w[6, 0] = -1e36
    packed = quantize_rowwise(w, 8)
    q = torch.randn(20, 8)
    q[3, 2] = float("nan")
    q[4] = 0.0
    scalar, avx2 = both_paths(lambda: cpu_topk(q, packed, 40))
    assert_same(scalar, avx2)
    assert_same(avx2, cpu_topk(q, dequantize_rowwise(packed, 8), 40))


@pytest.mark.parametrize("query,best,rest", [
    ([63.5] + [0.5] * 7, [1, 3, 3, 3, 3, 3, 3, 3], [1, 3, 3, 3, 3, 3, 3, 2]),  # VNNI's query range
    ([8.0] + [0.25] * 7, [1, 6, 6, 6, 6, 6, 6, 6], [1, 6, 6, 6, 6, 6, 6, 5]),  # AVX2's
])
def test_topk_int8_prefilter_leaves_out_subnormal_rows(query, best, rest):
    # rows scaled by 2^-149: every score is a few units of the smallest subnormal, where the
    # prefilter's relative slack is less than one rounding; the gate sends such rows (as the
    # float path's quantizer does, below 2^-60) to the fp32 tile. It let them through, and the
    # best row (one unit above the others) was dropped on AVX2 / AVX-512 / VNNI.
    n_items, dim = 70000, 8  # >= 65536 items and 17 queries: the prefilter runs
    codes = torch.zeros(n_items, dim, dtype=torch.uint8)
    codes[:200] = torch.tensor(rest, dtype=torch.uint8)
    codes[5000] = torch.tensor(best, dtype=torch.uint8)
    scale_bias = torch.tensor([2.0 ** -149, 0.0]).expand(n_items, 2).contiguous().view(torch.uint8)
    packed = torch.cat([codes, scale_bias], 1)
    queries = torch.tensor(query).expand(17, dim).contiguous()
    scalar, avx2 = both_paths(lambda: cpu_topk(queries, packed, 1))
    assert_same(avx2, scalar)
    assert avx2[1].flatten().tolist() == [5000] * 17
    assert_same(avx2, ref_topk(queries, packed, 1))


@pytest.mark.parametrize("dim", [1, 5, 33, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_float_catalog_prefilter_equals_fp32_tile(dim, dtype):
    # Float catalogs of 65536 items and more, with 64 queries or more, take the int8 prefilter on
    # chunks quantized on the fly, rescoring their own rows: the answer must be the scalar path's
    # (the plain fp32 tile) and the reference's, bit for bit. Odd rows send their chunk to the
    # fp32 tile (beyond 2^96, tiny, NaN) or quantize with no step (constant, zero).
    g = torch.Generator().manual_seed(dim)
    n_users, n_items = 70, 70000
    q, w = torch.randn(n_users, dim, generator=g), torch.randn(n_items, dim, generator=g)
    w[3] = 1e30
    w[400] = 1e-25
    w[1000], w[2000] = 0.5, 0.0
    w[60000, 0] = float("nan")
    w[7] *= 1e6  # one row of a much larger scale
    q[5] = 0.0
    q[6] = 1e-20  # a tiny query: its group takes the fp32 tile
    bias = torch.randn(n_items, generator=g) * 0.1
    lists = [torch.randint(0, n_items, (30,), generator=g).tolist() for _ in range(n_users)]
    off, ex = csr(lists)
    args = (q.to(dtype), w.to(dtype), 100)
    kw = dict(exclude_offsets=off, exclude_items=ex, item_bias=bias)
    scalar, avx2 = both_paths(lambda: cpu_topk(*args, **kw))
    assert_same(scalar, avx2)
    assert_same(avx2, ref_topk(*args, **kw))


@pytest.mark.parametrize("query_max", [32, 127])
@pytest.mark.parametrize("k", [1, 4])
def test_topk_float_prefilter_residual_bound_is_tight_enough(k, query_max):
    # Data on which the residual's term of the float catalogs' bound, ||q|| * ||x - value||, is
    # attained: every row has min -1 and max +1 (columns 0 and 1, where the queries are 0), so
    # one step s = 2 / 255; the queries are +-query_max * sign_d (no quantization error on the path
    # of that range: 32 on AVX2, 127 on VNNI). Every 50th row sits two steps up in the direction
    # of sign (score base + 2 query_max s, no residual); the k best, in a later chunk, sit on the
    # base codes plus 0.3367 s * sign_d (their residual, parallel to the query): base + 2.02
    # query_max s, 1% of the residual's term above the early rows. A residual term 3% short drops
    # them (k = 1 and 4, both ranges), and the answer differs from the scalar path's.
    g = torch.Generator().manual_seed(k + query_max)
    dim, n_items, n_users = 8, 70000, 64  # >= 65536 items and >= 64 queries: the prefilter
    sign = torch.where(torch.rand(dim - 2, generator=g) < 0.5, -1.0, 1.0)
    q = torch.cat([torch.zeros(2), query_max * sign])
    s = torch.tensor(2.0) / 255
    t = torch.randint(-100, -10, (n_items, dim - 2), generator=g).float()  # code offsets along sign
    t[::50] = torch.tensor([1.0, 1.0, 0, 0, 0, 0])  # in every item range and most chunks
    best = torch.arange(50001, 50001 + k)
    t[best] = 0.0
    codes = 128 + sign * t
    w = torch.cat([torch.full((n_items, 1), -1.0), torch.ones(n_items, 1), codes * s - 1.0], 1)
    w[best, 2:] += (1 / 3 / 0.99) * s * sign
    scalar, avx2 = both_paths(lambda: cpu_topk(q.expand(n_users, dim).contiguous(), w, k))
    assert_same(scalar, avx2)
    assert (avx2[1] == best).all()


def test_topk_native_errors():
    q, items = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="k must be in"):
        OPS.topk_scores(q, items, 7, None, None, None)
    with pytest.raises(ValueError, match="exclude_offsets"):
        OPS.topk_scores(q, items, 2, torch.tensor([0, 1, 1, 4]), torch.tensor([0, 1, 2]), None)
    with pytest.raises(IndexError, match="exclude_items"):
        OPS.topk_scores(q, items, 2, torch.tensor([0, 1, 1, 3]), torch.tensor([0, 6, 2]), None)
    with pytest.raises(ValueError, match="together"):
        OPS.topk_scores(q, items, 2, torch.tensor([0, 1, 1, 3]), None, None)
    with pytest.raises(ValueError, match="dim"):
        OPS.topk_scores(q, torch.randn(6, 5), 2, None, None, None)
    with pytest.raises(ValueError, match="item_bias"):
        OPS.topk_scores(q, items, 2, None, None, torch.randn(5))


def test_opcheck_native():
    q, items, bias = torch.randn(4, 6), torch.randn(9, 6), torch.randn(9)
    off, cand = csr([[1, 2], [], [8, 0, 0], [5]])
    ui, ii = torch.tensor([0, 3, 3, 1]), torch.tensor([2, 8, 8, 0])
    for op, args in [(OPS.topk_scores, (q, items, 3, off, cand, bias)),
                     (OPS.topk_scores, (q, quantize_rowwise(items, 8), 2, None, None, None)),
                     (OPS.candidate_topk, (q, items, off, cand, 2, bias)),
                     (OPS.candidate_scores, (q, items, off, cand, None)),
                     (OPS.pair_scores, (q, items, ui, ii, bias)),
                     (OPS.pair_scores_backward, (torch.randn(4), q, items, ui, ii, bias))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- pair / candidates
# 8-column blocks 0-3, 5-8, 12, 17 (and scalar tails): every remainder of the loop unrolled by 8
@pytest.mark.parametrize("dim", [1, 7, 8, 16, 24, 40, 48, 56, 64, 70, 100, 136])
@pytest.mark.parametrize("item_kind", ["f32", "f16", "bf16", "int8"])
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_pair_scores_paths(dim, item_kind, query_dtype):
    g = torch.Generator().manual_seed(dim)
    u, w, bias = torch.randn(50, dim, generator=g), torch.randn(300, dim, generator=g), torch.randn(300, generator=g)
    table = {"f32": w, "f16": w.half(), "bf16": w.bfloat16(), "int8": quantize_rowwise(w, 8)}[item_kind]
    ui, ii = torch.randint(0, 50, (2000,), generator=g), torch.randint(0, 300, (2000,), generator=g).int()
    args = (u.to(query_dtype), table, ui, ii, bias)
    scalar, avx2 = both_paths(lambda: scoring.pair_scores(*args, backend="cpu"))
    assert_same(scalar, avx2)
    torch.testing.assert_close(avx2, scoring.pair_scores(*args, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("big", ["items", "users"])
def test_pair_scores_tables_that_prefetch_into_l2(big, monkeypatch):
    # tables beyond the last-level cache (set to 32 MiB here): the gather-dot's instances that
    # prefetch into L2
    monkeypatch.setenv("RECSYS_KERNELS_L2_PREFETCH_MIB", "32")
    g = torch.Generator().manual_seed(len(big))
    n_big, dim = (33 << 20) // (4 * 64) + 1000, 64
    u = torch.randn(n_big if big == "users" else 50, dim, generator=g)
    w = torch.randn(n_big if big == "items" else 300, dim, generator=g)
    ui = torch.randint(0, u.shape[0], (3000,), generator=g)
    ii = torch.randint(0, w.shape[0], (3000,), generator=g)
    args = (u, w, ui, ii)
    scalar, avx2 = both_paths(lambda: scoring.pair_scores(*args, backend="cpu"))
    assert_same(scalar, avx2)
    torch.testing.assert_close(avx2, scoring.pair_scores(*args, backend="reference"), rtol=1e-5, atol=1e-5)


def test_pair_scores_backward_matches_reference():
    g = torch.Generator().manual_seed(1)
    u, w, bias = torch.randn(20, 9, generator=g), torch.randn(30, 9, generator=g), torch.randn(30, generator=g)
    ui, ii = torch.randint(0, 20, (500,), generator=g), torch.randint(0, 30, (500,), generator=g)
    grad = torch.randn(500, generator=g)
    for table in (w, w.half(), quantize_rowwise(w, 8)):
        got = OPS.pair_scores_backward(grad, u, table, ui, ii, bias)
        expected = OPS.pair_scores_backward_reference(grad, u, table, ui, ii, bias)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    got = OPS.pair_scores_backward(grad, u, w, ui, ii, None)
    assert got[2].shape == (0,)


def test_candidate_topk_paths_and_long_lists():
    g = torch.Generator().manual_seed(2)
    n_users, n_items = 70, 500
    q, items, bias = exact(n_users, 12, generator=g), exact(n_items, 12, generator=g), exact(n_items, generator=g)
    lens = torch.randint(0, 300, (n_users,), generator=g)
    lens[5] = 0
    lists = [torch.randint(0, n_items, (int(n),), generator=g).tolist() for n in lens]
    off, cand = csr(lists)
    for k in (0, 1, 50, 400):
        args = (q, items, off, cand, k, bias)
        scalar, avx2 = both_paths(lambda: scoring.candidate_topk(*args, backend="cpu"))
        assert_same(scalar, avx2)
        assert_same(avx2, scoring.candidate_topk(*args, backend="reference"))
    scalar, avx2 = both_paths(lambda: scoring.candidate_scores(q, items, off, cand, bias, backend="cpu"))
    assert_same(scalar, avx2)
    assert_same(avx2, scoring.candidate_scores(q, items, off, cand, bias, backend="reference"))


def test_native_pair_and_candidate_errors():
    q, items = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(IndexError, match="user_idx"):
        OPS.pair_scores(q, items, torch.tensor([0, -1]), torch.tensor([0, 1]), None)
    with pytest.raises(ValueError, match="same length"):
        OPS.pair_scores(q, items, torch.tensor([0]), torch.tensor([0, 1]), None)
    with pytest.raises(ValueError, match="cand_offsets"):
        OPS.candidate_scores(q, items, torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]), None)
    with pytest.raises(IndexError, match="cand_items"):
        OPS.candidate_topk(q, items, torch.tensor([0, 1, 1, 3]), torch.tensor([0, 9, 2]), 2, None)
    packed = quantize_rowwise(items, 8)
    packed[1, 4:8] = torch.tensor([float("inf")]).view(torch.uint8)
    with pytest.raises(ValueError, match="non-finite"):
        OPS.candidate_scores(q, packed, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1]), None)


def test_front_doors_hand_plain_calls_to_the_cpu_ops(monkeypatch):
    """A plain eager call on CPU tensors goes from the front door straight to the C++ op, which
    repeats the front door's checks (_common.direct_cpu_op): the same results as through the
    checks (taken here by asking for a gradient), and none of the Python checks run."""
    g = torch.Generator().manual_seed(5)
    queries, items = torch.randn(3, 16, generator=g), quantize_rowwise(torch.randn(40, 16, generator=g))
    bias = torch.randn(40, generator=g)
    offsets, cand = torch.tensor([0, 4, 4, 9], dtype=torch.int32), torch.randint(0, 40, (9,), generator=g)
    users = torch.tensor([0, 2, 1, 1])
    calls = {
        "pair_scores": lambda q: scoring.pair_scores(q, items, users, cand[:4], bias),
        "candidate_scores": lambda q: scoring.candidate_scores(q, items, offsets, cand, bias),
        "candidate_topk": lambda q: scoring.candidate_topk(q, items, offsets, cand, 3, bias),
        "topk_scores": lambda q: scoring.topk_scores(q, items, 5, exclude_offsets=offsets, exclude_items=cand,
                                                     item_bias=bias),
    }
    checked = {name: fn(queries.clone().requires_grad_()) for name, fn in calls.items()}

    def fail(*args, **kwargs):
        raise AssertionError("a front door check ran")

    for check in ("check_pair_args", "check_candidate_args", "check_topk_args", "_check_k"):
        monkeypatch.setattr(scoring, check, fail)
    for name, fn in calls.items():
        direct = fn(queries)
        for a, b in zip(direct if isinstance(direct, tuple) else (direct,),
                        checked[name] if isinstance(checked[name], tuple) else (checked[name],)):
            assert torch.equal(a, b.detach()), name
