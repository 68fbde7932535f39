"""The AVX-512 score tile and the AVX512-VNNI int8 prefilter of topk_scores
(csrc/scoring/scoring_cpu_avx512.cpp) on a CPU without them: compiled with -DRK_EMULATE_WIDE (SIMDe's
AVX-512, tests/emulation/wide_emulation.h) next to the native AVX2 kernels, and both driven through
C entry points (tests/emulation/scoring_harness.cpp) on the same arguments. The candidates (item,
lane, score) must be the AVX2 kernels', bit for bit and in the same order: every (query, item) is
the same fma chain, and the prefilter the same integer sums and bound. Where the CPU has the
instructions, test_scoring_cpu.py runs them through the op."""
import ctypes

import pytest
import torch

from helpers import build_emulated_library

SOURCES = ["tests/emulation/scoring_harness.cpp", "csrc/scoring/scoring_cpu_avx512.cpp",
           "csrc/scoring/scoring_cpu_avx2.cpp"]
LANES = 16


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = build_emulated_library(tmp_path_factory.mktemp("scoring_emulated"), SOURCES)
    i64, ptr, i32, u32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    so.rk_score_tile.argtypes = [i32, ptr, ptr, ptr, i64, i64, ptr, u32, ptr]
    so.rk_score_tile.restype = i64
    so.rk_score_tile_q8.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, u32, ptr, ptr, ptr, ptr]
    so.rk_score_tile_q8.restype = i64
    so.rk_q8_quantize_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr]
    so.rk_q8_quantize_rows.restype = i32
    return so


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _candidates(out, n):
    """(items, lanes, score bits) of the first n Candidate structs (int32, int32, float)."""
    c = out[:n]
    return c[:, 0].tolist(), c[:, 1].tolist(), c[:, 2].tolist()


def score_tile(lib, avx512, panel, items, bias, threshold, lane_mask):
    n_items, dim = items.shape
    out = torch.zeros(LANES * max(n_items, 1), 3, dtype=torch.int32)
    n = lib.rk_score_tile(int(avx512), _p(panel), _p(items), _p(bias), dim, n_items, _p(threshold), lane_mask,
                          _p(out))
    return _candidates(out, n)


def _thresholds(scores, g, quantile):
    """Per lane, a threshold at `quantile` of that lane's scores (some candidates, not all)."""
    thr = scores.quantile(quantile, dim=0)
    thr[3] = float("nan")        # a NaN threshold: every score of that lane is a candidate
    thr[5] = float("-inf")
    return thr.contiguous()


@pytest.mark.parametrize("dim", [1, 7, 64, 100])
@pytest.mark.parametrize("n_items", [1, 5, 12, 13, 30, 100, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_score_tile_is_the_avx2_tile(lib, dim, n_items, with_bias):
    g = torch.Generator().manual_seed(dim * 1000 + n_items)
    panel = torch.randn(dim, LANES, generator=g)
    items = torch.randn(n_items, dim, generator=g)
    items[0, 0] = float("nan") if n_items > 3 else items[0, 0]  # NaN scores are candidates
    bias = torch.randn(n_items, generator=g) if with_bias else None
    scores = items @ panel + (bias[:, None] if with_bias else 0)
    thr = _thresholds(scores.nan_to_num(0.0), g, 0.8)
    for lane_mask in (0xFFFF, 0x7FF5):
        exp = score_tile(lib, False, panel, items, bias, thr, lane_mask)
        got = score_tile(lib, True, panel, items, bias, thr, lane_mask)
        assert got == exp
        assert 0 < len(exp[0]) < n_items * LANES or n_items * LANES <= 16
    # at most 4 queries: the few-query tile (items in the lanes) emits lane by lane, so compare
    # each lane's (item, score) sequence
    for lane_mask in (0x1, 0x8008, 0x1248, 0x0028):
        exp = _per_lane(score_tile(lib, False, panel, items, bias, thr, lane_mask))
        got = _per_lane(score_tile(lib, True, panel, items, bias, thr, lane_mask))
        assert got == exp and len(exp) > 0


def _per_lane(candidates):
    items, lanes, scores = candidates
    out = {}
    for i, lane, s in zip(items, lanes, scores):
        out.setdefault(lane, []).append((i, s))
    return out


def _q8_quads(dim):
    return ((dim + 7) // 8) * 2


def score_tile_q8(lib, vnni, args, exact_rows=None):
    """(candidates, the kernel's `passed` scratch): the items the prefilter let through, in order,
    then what the last items wrote past them (both kernels write the same sequence). exact_rows:
    a float catalog's rows, which `rows` quantizes (the bound's residual term, their rescoring)."""
    (qpanel, q, panel, rows, row_info, dim, bias, thr, lane_mask) = args
    n_items, row_bytes = rows.shape
    passed = torch.full((max(n_items, 1),), -1, dtype=torch.int32)
    scratch = torch.zeros(6, max(dim, 1))
    out = torch.zeros(LANES * max(n_items, 1), 3, dtype=torch.int32)
    n = lib.rk_score_tile_q8(int(vnni), _p(qpanel), _p(q), _p(panel), _p(rows), _p(row_info), row_bytes, dim,
                             n_items, _p(bias), _p(thr), lane_mask, _p(passed), _p(scratch), _p(exact_rows),
                             _p(out))
    return _candidates(out, n), passed.tolist()


def _q8_args(dim, n_items, g, with_bias):
    """A chunk of int8 rows and a group's quantized queries with the bound's terms: the kernels
    are compared on the same inputs, so the terms only need the right shapes and plausible sizes."""
    quads = _q8_quads(dim)
    row_bytes = dim + 8
    rows = torch.randint(0, 256, (n_items, row_bytes), dtype=torch.uint8, generator=g)
    q8 = torch.randint(-32, 33, (quads * 4, LANES), dtype=torch.int8, generator=g)
    q8[dim:] = 0                                               # zero queries past D
    qpanel = q8.view(quads, 4, LANES).permute(0, 2, 1).contiguous()  # [quads][16][4]
    qscale = torch.rand(LANES, generator=g) * 0.01 + 0.001
    panel = (q8[:dim].float() * qscale).contiguous()          # the fp32 queries (exact rescoring)
    q = torch.cat([qscale, q8[:dim].float().sum(0) * qscale,  # qscale, qsum
                   torch.randn(LANES, generator=g) * 0.01,     # qcorr
                   torch.rand(LANES, generator=g) * 5,         # qerr
                   torch.rand(LANES, generator=g) * 0.5,       # qnorm
                   torch.rand(LANES, generator=g) * 1e-3,      # qslack (large: every term counts)
                   torch.rand(LANES, generator=g)]).contiguous()        # qnorm_full
    scale = torch.rand(n_items, generator=g) * 0.02 + 0.001
    row_bias = torch.randn(n_items, generator=g) * 0.5
    item_bias = torch.randn(n_items, generator=g) if with_bias else None
    bias_up = (item_bias + item_bias.abs() * 2 ** -20) if with_bias else torch.zeros(n_items)
    row_info = torch.stack([scale, row_bias, scale.abs(), 255 * scale.abs() + row_bias.abs(),
                            torch.rand(n_items, generator=g) * 10, bias_up,
                            torch.rand(n_items, generator=g) * 1e-3], dim=1).contiguous()  # res_norm
    values = rows[:, :dim].float() * scale[:, None] + row_bias[:, None]
    scores = values @ panel + (item_bias[:, None] if with_bias else 0)
    return qpanel, q, panel, rows, row_info, scores, item_bias


def _residual_rows(rows, row_info, dim, g):
    """Float rows near the int8 rows' values: a float catalog's rows for the residual's term."""
    scale, row_bias = row_info[:, 0], row_info[:, 1]
    values = rows[:, :dim].float() * scale[:, None] + row_bias[:, None]
    return (values + torch.randn(values.shape, generator=g) * scale[:, None] * 0.3).contiguous()


@pytest.mark.parametrize("dim", [1, 8, 13, 64, 100])
@pytest.mark.parametrize("n_items", [1, 7, 8, 9, 40, 101])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])  # int8 catalog, float catalog
def test_q8_prefilter_is_the_avx2_prefilter(lib, dim, n_items, with_bias, residual):
    g = torch.Generator().manual_seed(dim * 1000 + n_items + with_bias)
    qpanel, q, panel, rows, row_info, scores, bias = _q8_args(dim, n_items, g, with_bias)
    exact_rows = _residual_rows(rows, row_info, dim, g) if residual else None
    filtered = []
    for quantile in (0.5, 0.95):
        thr = _thresholds(scores, g, quantile)
        thr[3] = thr[5] = thr[0]      # no NaN / -inf lane here: let the prefilter reject items
        for lane_mask in (0xFFFF, 0x0FF0):
            args = (qpanel, q, panel, rows, row_info, dim, bias, thr, lane_mask)
            exp, exp_passed = score_tile_q8(lib, False, args, exact_rows)
            got, got_passed = score_tile_q8(lib, True, args, exact_rows)
            assert got == exp and got_passed == exp_passed
            filtered.append(len(set(exp_passed) - {-1}) < n_items)
    assert n_items < 40 or any(filtered)  # the bound did reject items somewhere


def test_q8_prefilter_agrees_near_the_thresholds(lib):
    # many items and thresholds at many quantiles: items whose bound sits near a threshold, where
    # any difference in a term of the bound would flip the prefilter's decision
    g = torch.Generator().manual_seed(7)
    qpanel, q, panel, rows, row_info, scores, bias = _q8_args(64, 2000, g, True)
    with_residual = row_info.clone()
    with_residual[:, 6] *= 300  # a residual's term as large as the others
    for info, exact_rows in ((row_info, None), (with_residual, _residual_rows(rows, row_info, 64, g))):
        for quantile in (0.3, 0.6, 0.8, 0.9, 0.97, 0.995):
            thr = scores.quantile(quantile, dim=0).contiguous()
            args = (qpanel, q, panel, rows, info, 64, bias, thr, 0xFFFF)
            exp, exp_passed = score_tile_q8(lib, False, args, exact_rows)
            got, got_passed = score_tile_q8(lib, True, args, exact_rows)
            assert got == exp and got_passed == exp_passed, quantile


def _q8_query_terms(queries, qmax):
    """16 fp32 queries quantized to |q8| <= qmax, with the bound's terms computed as
    topk_scores_cpu.cpp does: (qpanel, q)."""
    dim = queries.shape[1]
    quads = _q8_quads(dim)
    qs = queries.abs().amax(1) / qmax
    q8 = torch.round(queries / qs[:, None]).clamp(-qmax, qmax)  # round half to even, as nearbyint
    e = queries.double() - qs.double()[:, None] * q8.double()
    qpanel = torch.zeros(quads * 4, LANES, dtype=torch.int8)
    qpanel[:dim] = q8.t().to(torch.int8)
    qpanel = qpanel.view(quads, 4, LANES).permute(0, 2, 1).contiguous()
    q = torch.cat([qs, queries.double().sum(1).float(), (127.5 * e.sum(1)).float(),
                   (127.5 * e.abs().sum(1) * (1 + 2 ** -10)).float(),
                   (e.pow(2).sum(1).sqrt() * (1 + 2 ** -10)).float(),
                   ((2 * dim + 48) * 2 ** -24 * queries.double().abs().sum(1) * 1.25).float(),
                   (queries.double().pow(2).sum(1).sqrt() * (1 + 2 ** -10)).float()]).contiguous()
    return qpanel, q


def _row_norms(codes):
    """||code - 127.5||_2 of each row, rounded up, as topk_scores_cpu.cpp's q8_row."""
    return (0.5 * (2 * codes.double() - 255).pow(2).sum(1).sqrt() * (1 + 2 ** -20)).float()


def _q8_real_args(queries, n_items, qmax, g):
    """A chunk of int8 rows and 16 fp32 queries with the bound's real terms, so the bound must
    hold: the prefilter may only drop (item, lane) pairs whose exact score is below the threshold."""
    dim = queries.shape[1]
    qpanel, q = _q8_query_terms(queries, qmax)
    codes = torch.randint(0, 256, (n_items, dim), dtype=torch.uint8, generator=g)
    scale = torch.rand(n_items, generator=g) * 0.02 + 0.001
    row_bias = torch.randn(n_items, generator=g) * 0.5 - 2.0
    rows = torch.cat([codes, torch.stack([scale, row_bias], 1).view(torch.uint8)], 1).contiguous()
    row_info = torch.stack([scale, row_bias, scale.abs(), 255 * scale.abs() + row_bias.abs(),
                            _row_norms(codes), torch.zeros(n_items), torch.zeros(n_items)], 1).contiguous()
    values = codes.float() * scale[:, None] + row_bias[:, None]  # the two roundings of the reference
    return qpanel, q, queries.t().contiguous(), rows, row_info, values


@pytest.mark.parametrize("vnni,qmax", [(False, 32), (True, 32), (True, 127)])
def test_q8_prefilter_keeps_every_candidate(lib, vnni, qmax):
    # Real query terms (127 is the VNNI path's query range, whose int16 sums would saturate on
    # AVX2): the candidates equal the fp32 tile's on the dequantized rows, while the bound rejects
    # most items.
    g = torch.Generator().manual_seed(qmax + vnni)
    dim, n_items = 64, 3000
    qpanel, q, panel, rows, row_info, values = _q8_real_args(torch.randn(LANES, dim, generator=g), n_items, qmax, g)
    scores = values @ panel
    for quantile in (0.9, 0.99, 0.999):
        thr = scores.quantile(quantile, dim=0).contiguous()
        (got, passed) = score_tile_q8(lib, vnni, (qpanel, q, panel, rows, row_info, dim, None, thr, 0xFFFF))
        exp = score_tile(lib, False, panel, values, None, thr, 0xFFFF)
        assert sorted(zip(*got)) == sorted(zip(*exp))
        n_passed = len(set(passed[:n_items]) - {-1})
        assert len(set(exp[0])) <= n_passed
    assert n_passed < n_items / 10  # measured: 89 passed for 42 true at |q8| <= 32, 63 for 41 at 127


def q8_quantize_rows(lib, x):
    """(ok, packed rows [n][D + 8], norm, res_norm, abs_max) from the AVX2 quantizer of float
    catalogs."""
    n, dim = x.shape
    rows = torch.zeros(n, dim + 8, dtype=torch.uint8)
    norm, res_norm, abs_max = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    ok = lib.rk_q8_quantize_rows(_p(x), n, dim, _p(rows), _p(norm), _p(res_norm), _p(abs_max))
    return bool(ok), rows, norm, res_norm, abs_max


@pytest.mark.parametrize("dim", [1, 7, 8, 64, 100])
def test_q8_quantize_rows(lib, dim):
    # the nearest step of [min, max] / 255, values code * scale + bias in two roundings, and
    # res_norm an upper bound of ||x - value||_2, by no more than its (D + 10) 2^-23 inflation
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(50, dim, generator=g) * torch.logspace(-15, 25, 50)[:, None]
    x[3] = 0.0
    x[4] = -2.5  # constant: scale 0, every code 0, the value is the bias
    ok, rows, norm, res_norm, abs_max = q8_quantize_rows(lib, x)
    assert ok
    assert_same = torch.testing.assert_close
    assert_same(norm, _row_norms(rows[:, :dim]), rtol=0, atol=0)
    codes = rows[:, :dim].float()
    scale, bias = rows[:, dim:].contiguous().view(torch.float32).unbind(1)
    assert_same(bias, x.amin(1), rtol=0, atol=0)
    assert_same(abs_max, x.abs().amax(1), rtol=0, atol=0)
    assert scale[3] == 0 and scale[4] == 0 and (codes[3:5] == 0).all()
    values = codes * scale[:, None] + bias[:, None]
    assert ((x - values).abs() <= scale[:, None] * (0.5 + 1e-5)).all()
    exact = (x.double() - values.double()).pow(2).sum(1).sqrt()
    upper = exact * (1 + (dim + 16) * 2 ** -23) + 2 ** -149
    assert (res_norm.double() >= exact).all() and (res_norm.double() <= upper).all()
    for bad in (float("nan"), float("inf"), 2.0 ** 97, 2.0 ** -61):  # outside the bound's range
        y = x.clone()
        y[7, dim - 1] = bad
        if abs(bad) < 1:
            y[7] = bad
        assert not q8_quantize_rows(lib, y)[0]


@pytest.mark.parametrize("vnni,qmax", [(False, 32), (True, 32), (True, 127)])
def test_q8_prefilter_keeps_every_candidate_of_float_rows(lib, vnni, qmax):
    # A float catalog's chunk quantized by the quantizer above, with the bound's real terms
    # (topk_scores_cpu.cpp's q8_row_of_floats): the candidates equal the fp32 tile's on the float
    # rows themselves, while the bound rejects most items.
    g = torch.Generator().manual_seed(qmax + vnni)
    dim, n_items = 64, 3000
    queries = torch.randn(LANES, dim, generator=g)
    qpanel, q = _q8_query_terms(queries, qmax)
    x = torch.randn(n_items, dim, generator=g) * (torch.rand(n_items, 1, generator=g) + 0.5)
    ok, rows, norm, res_norm, abs_max = q8_quantize_rows(lib, x)
    assert ok
    scale, row_bias = rows[:, dim:].contiguous().view(torch.float32).unbind(1)
    value_max = (255 * scale.abs() + row_bias.abs() + abs_max + res_norm) * (1 + 2 ** -20)
    row_info = torch.stack([scale, row_bias, scale.abs(), value_max, norm,
                            torch.zeros(n_items), res_norm], 1).contiguous()
    panel = queries.t().contiguous()
    scores = x @ panel
    for quantile in (0.9, 0.99, 0.999):
        thr = scores.quantile(quantile, dim=0).contiguous()
        got, passed = score_tile_q8(lib, vnni, (qpanel, q, panel, rows, row_info, dim, None, thr, 0xFFFF), x)
        exp = score_tile(lib, False, panel, x, None, thr, 0xFFFF)
        assert sorted(zip(*got)) == sorted(zip(*exp))
        n_passed = len(set(passed[:n_items]) - {-1})
        assert len(set(exp[0])) <= n_passed
    assert n_passed < n_items / 10
