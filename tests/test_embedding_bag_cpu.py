"""The C++ CPU kernels of embedding_bag / embedding_bag_backward beyond the shared matrix of
test_embedding_bag.py: every CPU path (AVX-512 where the CPU has it, AVX2 and the forced scalar
fallback, which must agree bit for bit), wide and odd D, skewed bags, many bags with int32 offsets, quantized tables, the backward op
against the reference backward op, errors of the native op called directly, opcheck, compile."""
import os

import pytest
import torch

from helpers import EMBEDDING_ISAS as ISAS, has_avx2 as _has_avx2, has_cpu_feature, on_isa, on_threads
from recsys_kernels import _loader
from recsys_kernels.ops.embedding import embedding_bag
from recsys_kernels.ops.embedding_grouped import embedding_bag_grouped
from recsys_kernels.ops.rowwise import dequantize_rowwise, quantize_rowwise

pytestmark = pytest.mark.skipif(
    "_C" not in _loader.EXTENSIONS or not _loader.has_native_kernel("embedding_bag", "CPU"),
    reason="the C++ CPU kernel of embedding_bag is not built")

OPS = torch.ops.recsys_kernels
def bags(lengths, n_rows, lo=0, hi=None, dtype=torch.long, generator=None):
    lengths = torch.as_tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(lo, n_rows if hi is None else hi, (int(offsets[-1]),), generator=generator)
    return indices.to(dtype), offsets.to(dtype)


def both_paths(*args, **kwargs):
    """(scalar result, avx2 result or None), each via backend="cpu". Where the CPU has AVX-512, its
    kernel's result must be the AVX2 result, bit for bit; so must the VBMI build's (4-bit rows)."""
    kwargs.setdefault("backend", "cpu")
    scalar = on_isa("scalar", lambda: embedding_bag(*args, **kwargs))
    avx2 = on_isa("avx2", lambda: embedding_bag(*args, **kwargs)) if _has_avx2() else None
    if has_cpu_feature("avx512"):
        assert torch.equal(on_isa("avx512", lambda: embedding_bag(*args, **kwargs)), avx2)
    if has_cpu_feature("avx512_vbmi") and has_cpu_feature("avx512_vnni"):
        assert torch.equal(on_isa("avx512_vnni", lambda: embedding_bag(*args, **kwargs)), avx2)
    return scalar, avx2


def reference(*args, **kwargs):
    return embedding_bag(*args, backend="reference", **kwargs)


def tol(dtype):
    return {torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}.get(dtype, (1e-5, 1e-5))


# ----------------------------------------------------------------------------- forward, both paths
# 100 and 128: the AVX2 kernel's column blocks hold up to 16 vectors (100 = 12 + a tail of 4)
@pytest.mark.parametrize("d", [1, 3, 8, 64, 100, 128, 129, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
def test_paths_agree_with_reference(d, dtype, mode, weighted):
    g = torch.Generator().manual_seed(d)
    weight = torch.randn(50, d, generator=g).to(dtype)
    lengths = torch.randint(0, 20, (33,), generator=g)
    lengths[3] = 0
    indices, offsets = bags(lengths, 53, lo=-2, generator=g)  # a few out of range
    psw = torch.rand(indices.numel(), generator=g).to(dtype) if weighted else None
    kw = dict(per_sample_weights=psw, mode=mode, padding_idx=7, bounds="zero")
    scalar, avx2 = both_paths(weight, indices, offsets, **kw)
    expected = reference(weight, indices, offsets, **kw)
    rtol, atol = tol(dtype)
    torch.testing.assert_close(scalar, expected, rtol=rtol, atol=atol)
    if avx2 is not None:
        assert torch.equal(scalar, avx2)  # same operations in the same order
    if dtype == torch.float32:  # fp32: the same sums as index_add_, to rounding
        torch.testing.assert_close(scalar, expected, rtol=1e-5, atol=1e-6)


def _awkward_values():
    """fp32 values whose fp16 / bf16 roundings are edge cases: ties either way, subnormal halves,
    overflow, signed zeros and infinities, NaNs with payloads and signs."""
    f16_ulp1, bf16_ulp1 = 2.0 ** -10, 2.0 ** -7
    vals = [1 + f16_ulp1 / 2, 1 + 3 * f16_ulp1 / 2, 1 + bf16_ulp1 / 2, 1 + 3 * bf16_ulp1 / 2, -(1 + f16_ulp1 / 2),
            2.0 ** -20, 3 * 2.0 ** -25, 2.0 ** -25, 2.0 ** -26, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 3.4e38,
            -0.0, 0.0, float("inf"), float("-inf"), 1e-40, 0.1, -0.3]
    bits = torch.tensor(vals, dtype=torch.float32).view(torch.int32).tolist()
    bits += [0x7FC00000, 0x7FA00001, 0xFFC00000 - (1 << 32), 0x7F800001, 0xFFFFFFFF - (1 << 32), 0x7FE12345]  # NaNs
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 7, 8, 13, 64, 129])
def test_half_outputs_round_as_the_scalar_cast(out_dtype, d):
    """fp32 sums written as fp16 / bf16 (vector conversion on the AVX2 path): bit for bit the scalar
    path's c10 casts, on values that round awkwardly; one row per bag, so each output is a row value."""
    g = torch.Generator().manual_seed(d)
    vals = _awkward_values()
    n_rows = (vals.numel() + d - 1) // d + 3
    weight = torch.randn(n_rows * d, generator=g)
    weight[:vals.numel()] = vals
    weight = weight.view(n_rows, d)
    indices, offsets = torch.arange(n_rows), torch.arange(n_rows + 1)
    paths = ["scalar"] + [isa for isa in ("avx2", "avx512") if has_cpu_feature(isa)]
    for kw in (dict(output_dtype=out_dtype), dict(output_dtype=out_dtype, bounds="zero", padding_idx=n_rows - 1)):
        outs = [on_isa(isa, lambda: embedding_bag(weight, indices, offsets, backend="cpu", **kw)) for isa in paths]
        for out in outs[1:]:  # NaNs included: compare the bits
            assert torch.equal(out.view(torch.int16), outs[0].view(torch.int16))
        finite = ~weight.isnan()
        expected = reference(weight, indices, offsets, **kw)
        assert torch.equal(outs[0][finite], expected[finite]) and outs[0][~finite].isnan().all()


@pytest.mark.parametrize("d", [16, 100, 128, 200])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("aligned", [True, False])
def test_every_index_contributes(d, index_dtype, aligned):
    """bounds="raise" without padding: no compaction, int32 indices widened while they are checked;
    the prefetch look-ahead runs on into the next bags. A table that does not start on a 64-byte
    line (a view one float in) exercises the unaligned-row prefetch."""
    g = torch.Generator().manual_seed(d)
    base = torch.randn(300 * d + 1, generator=g)
    weight = base[:300 * d].view(300, d) if aligned else base[1:].view(300, d)
    indices, offsets = bags(torch.randint(0, 40, (70,), generator=g), 300, dtype=index_dtype, generator=g)
    psw = torch.rand(indices.numel(), generator=g)
    for kw in (dict(), dict(per_sample_weights=psw)):
        scalar, avx2 = both_paths(weight, indices, offsets, **kw)
        torch.testing.assert_close(scalar, reference(weight, indices, offsets, **kw), rtol=1e-5, atol=1e-5)
        if avx2 is not None:
            assert torch.equal(scalar, avx2)


# D = 24: 170 bags a staged block, not a divisor of the bag count; 5000: one bag a block
@pytest.mark.parametrize("d,n_bags", [(1, 9000), (24, 1000), (64, 300), (5000, 5)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_over_many_staged_blocks(d, n_bags, dtype):
    """fp16 / bf16 outputs of the vector kernels are pooled in fp32 a block of bags at a time (4,096
    floats) and converted: many blocks, a partial last one, into a whole output and into a
    column slice of a wider one (embedding_bag_grouped's layout), and a bad index in a later block."""
    g = torch.Generator().manual_seed(d)
    weight = torch.randn(200, d, generator=g).to(dtype)
    indices, offsets = bags(torch.randint(0, 9, (n_bags,), generator=g), 200, dtype=torch.int32, generator=g)
    psw = torch.rand(indices.numel(), generator=g).to(dtype)
    for kw in (dict(mode="max"), dict(per_sample_weights=psw), dict()):
        scalar, avx2 = both_paths(weight, indices, offsets, **kw)
        torch.testing.assert_close(scalar, reference(weight, indices, offsets, **kw), rtol=tol(dtype)[0],
                                   atol=tol(dtype)[1])
        if avx2 is not None:
            assert torch.equal(scalar, avx2)
    other = torch.randn(200, 3, generator=g).to(dtype)
    for isa in ["scalar"] + [i for i in ("avx2", "avx512") if has_cpu_feature(i)]:
        both = on_isa(isa, lambda: embedding_bag_grouped([other, weight], [indices, indices], [offsets, offsets],
                                                         backend="cpu"))
        assert torch.equal(both[:, 3:], scalar)  # the sums, the last case above
    bad = indices.clone()
    bad[-1] = 200
    with pytest.raises(IndexError, match="index 200 "):
        on_isa("avx2", lambda: embedding_bag(weight, bad, offsets, backend="cpu"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bounds", ["zero", "clamp"])
def test_huge_int64_indices(isa, bounds):
    """Indices far outside int32 (the prefetch reads only their low 32 bits) pool as the reference."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(1000, 64, generator=g)
    indices, offsets = bags(torch.full((50,), 30), 1000, generator=g)
    indices[::7] = torch.tensor([2**40 + 5, -2**40, 2**32 + 1, 2**31, -1])[torch.arange(len(indices[::7])) % 5]
    got = on_isa(isa, lambda: embedding_bag(weight, indices, offsets, bounds=bounds, backend="cpu"))
    torch.testing.assert_close(got, reference(weight, indices, offsets, bounds=bounds), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_skewed_bags(isa, mode):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (300,), generator=g)
    lengths[137] = 10_000  # one huge bag among tiny ones
    weight = torch.randn(5_000, 64, generator=g)
    indices, offsets = bags(lengths, 5_000, generator=g)
    got = on_isa(isa, lambda: embedding_bag(weight, indices, offsets, mode=mode, backend="cpu"))
    torch.testing.assert_close(got, reference(weight, indices, offsets, mode=mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_many_bags_int32(isa):
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(0, 6, (20_000,), generator=g)
    weight = torch.randn(1_000, 24, generator=g)
    indices, offsets = bags(lengths, 1_000, dtype=torch.int32, generator=g)
    psw = torch.rand(indices.numel(), generator=g)
    got = on_isa(isa, lambda: embedding_bag(weight, indices, offsets, per_sample_weights=psw, backend="cpu"))
    expected = reference(weight, indices, offsets, per_sample_weights=psw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# 4-bit D = 48 and 104: blocks whose last group of 4 vectors is partial
@pytest.mark.parametrize(
    "bits,d", [(8, 5), (8, 8), (8, 64), (8, 129), (8, 256), (4, 2), (4, 16), (4, 48), (4, 104), (4, 128), (4, 130), (4, 256)]
)
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
def test_quantized_paths(bits, d, mode, weighted):
    g = torch.Generator().manual_seed(bits * 1000 + d)
    weight = torch.randn(40, d, generator=g) * torch.rand(40, 1, generator=g) * 3
    packed = quantize_rowwise(weight, bits)
    table = dequantize_rowwise(packed, bits)
    indices, offsets = bags(torch.randint(0, 12, (17,), generator=g), 40, generator=g)
    psw = torch.rand(indices.numel(), generator=g) if weighted else None
    kw = dict(per_sample_weights=psw, mode=mode, padding_idx=5)
    scalar, avx2 = both_paths(packed, indices, offsets, bits=bits, **kw)
    expected = reference(table, indices, offsets, **kw)
    assert scalar.dtype == torch.float32
    torch.testing.assert_close(scalar, expected, rtol=1e-5, atol=1e-5)
    if avx2 is not None:
        assert torch.equal(scalar, avx2)
    # and the reference reading the packed table itself
    torch.testing.assert_close(scalar, reference(packed, indices, offsets, bits=bits, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("length", [32, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_int8_sums_as_accurate_as_the_reference(isa, length, weighted):
    """int8 sums take code * scale in one fma and fold the biases in every 4 rows (kBiasFoldRows):
    their error against the exact sum (fp64) stays within 3x the reference's own (1.1-1.9x
    measured). Summing the biases apart for a whole bag of 32 measured 15x: the accumulators grow
    with the codes' sum, ~half a row's range per row, instead of staying the size of the result."""
    g = torch.Generator().manual_seed(length + weighted)
    n, d, n_bags = 500, 64, 32_768 // length
    weight = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 3 + torch.randn(n, 1, generator=g)
    packed = quantize_rowwise(weight, 8)
    scale_bias = packed[:, d:].contiguous().view(torch.float32).double()
    exact_rows = packed[:, :d].double() * scale_bias[:, :1] + scale_bias[:, 1:]  # no rounding in fp64
    indices, offsets = bags(torch.full((n_bags,), length), n, generator=g)
    psw = torch.rand(indices.numel(), generator=g) if weighted else None
    exact = embedding_bag(exact_rows, indices, offsets, per_sample_weights=None if psw is None else psw.double(),
                          backend="reference")
    ours = on_isa(isa, lambda: embedding_bag(packed, indices, offsets, per_sample_weights=psw, bits=8, backend="cpu"))
    ref = reference(packed, indices, offsets, per_sample_weights=psw, bits=8)
    assert (ours.double() - exact).abs().mean() <= 3 * (ref.double() - exact).abs().mean()


@pytest.mark.parametrize("bits,d", [(8, 8), (8, 128), (4, 8), (4, 128)])
@pytest.mark.parametrize("field", ["scale", "bias"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_quantized_non_finite_scale_raises(bits, d, field, value):
    packed = quantize_rowwise(torch.randn(4, d), bits)
    code_bytes = d if bits == 8 else d // 2
    width = 4 if bits == 8 else 2  # fp32 or fp16 scale and bias
    start = code_bytes + (0 if field == "scale" else width)
    packed[2, start:start + width] = torch.tensor([value], dtype=torch.float32 if bits == 8 else torch.float16).view(
        torch.uint8)
    idx, off = torch.tensor([0, 2]), torch.tensor([0, 2])
    for isa in ("scalar", "avx2", "avx512", "avx512_vnni"):  # the cap never enables a path the CPU lacks
        with pytest.raises(ValueError, match="non-finite"):
            on_isa(isa, lambda: embedding_bag(packed, idx, off, bits=bits, backend="cpu"))
    with pytest.raises(ValueError, match="non-finite"):
        reference(packed, idx, off, bits=bits)
    # a table whose bad row is not gathered is fine
    embedding_bag(packed, torch.tensor([0, 1]), off, bits=bits, backend="cpu")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [11, 32])
def test_max_propagates_nan_and_keeps_neg_inf(isa, d):
    weight = torch.randn(4, d)
    weight[1, 2] = float("nan")
    weight[2, :] = float("-inf")
    idx, off = torch.tensor([0, 1, 3, 2, 2]), torch.tensor([0, 3, 5])
    got = on_isa(isa, lambda: embedding_bag(weight, idx, off, mode="max", backend="cpu"))
    expected = reference(weight, idx, off, mode="max")
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.isnan(got[0, 2]) and (got[1] == float("-inf")).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_output_dtypes(dtype, out_dtype):
    weight = torch.randn(30, 20).to(dtype)
    idx, off = bags([3, 0, 5, 9], 30)
    got = embedding_bag(weight, idx, off, mode="mean", output_dtype=out_dtype, backend="cpu")
    expected = reference(weight, idx, off, mode="mean", output_dtype=out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _packed_table(bits, n_rows, d, g):
    """A row-wise packed table of random codes with moderate scales and biases, built directly
    (quantizing a float table of this size would take seconds)."""
    codes = torch.randint(0, 256, (n_rows, d if bits == 8 else d // 2), dtype=torch.uint8, generator=g)
    scale_bias = torch.stack([torch.rand(n_rows, generator=g) * 0.01 + 1e-3, torch.randn(n_rows, generator=g)], 1)
    tail = scale_bias.view(torch.uint8) if bits == 8 else scale_bias.half().view(torch.uint8)
    return torch.cat([codes, tail], 1)


@pytest.mark.parametrize("bits,d", [(None, 128), (None, 129), (8, 128), (4, 128)])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("max", False)])
def test_tables_that_prefetch_into_l2(bits, d, mode, weighted, monkeypatch):
    """Tables beyond the last-level cache (their rows come from DRAM; the threshold set to 32 MiB
    here, whatever L3 this machine has) prefetch the rows ahead into L2 only, in instances of the
    kernels of their own: every path against the reference. d = 129: the scalar tail's prefetch;
    quantized rows: their scale and bias lines."""
    monkeypatch.setenv("RECSYS_KERNELS_L2_PREFETCH_MIB", "32")
    g = torch.Generator().manual_seed(d + (bits or 0))
    row_bytes = {None: 4 * d, 8: d + 8, 4: d // 2 + 4}[bits]
    n_rows = (33 << 20) // row_bytes + 1000
    weight = torch.randn(n_rows, d, generator=g) if bits is None else _packed_table(bits, n_rows, d, g)
    indices, offsets = bags(torch.randint(0, 40, (300,), generator=g), n_rows, generator=g)
    kw = dict(mode=mode, bits=bits) if bits is not None else dict(mode=mode)
    if weighted:
        kw["per_sample_weights"] = torch.rand(indices.numel(), generator=g)
    scalar, avx2 = both_paths(weight, indices, offsets, **kw)
    expected = reference(weight, indices, offsets, **kw)
    torch.testing.assert_close(scalar, expected, rtol=1e-5, atol=1e-5)
    if avx2 is not None:
        torch.testing.assert_close(avx2, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- native op, value checks
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,d", [(None, 64), (None, 128), (8, 128), (4, 128), (8, 24)])
@pytest.mark.parametrize("bad", [2**63 - 1, -2**63, 2**62 + 3, -2**40])
def test_wild_index_ahead_raises(isa, bits, d, bad):
    """The kernel prefetches the row 16 indices ahead without checking that index (a prefetch
    cannot fault): a wild index there must neither crash nor change anything before it is reached,
    and then raises with its position's value. Float and quantized rows, whole-row and split blocks."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(300, d, generator=g)
    if bits is not None:
        weight = quantize_rowwise(weight, bits)
    indices, offsets = bags(torch.full((40,), 20), 300, generator=g)
    indices[500] = bad
    kwargs = {} if bits is None else {"bits": bits}
    with pytest.raises(IndexError, match=f"index {bad} is out of range for a table of 300 rows"):
        on_isa(isa, lambda: embedding_bag(weight, indices, offsets, backend="cpu", **kwargs))
    indices[500] = 7  # and the same call without it pools as the reference
    got = on_isa(isa, lambda: embedding_bag(weight, indices, offsets, backend="cpu", **kwargs))
    torch.testing.assert_close(got, reference(weight, indices, offsets, **kwargs), rtol=1e-5, atol=1e-5)


def _native(weight, idx, off, bounds="raise"):
    return OPS.embedding_bag(weight, idx, off, None, "sum", None, bounds, 8, None, False)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_native_op_value_checks(index_dtype):
    weight = torch.randn(5, 3)
    idx = torch.tensor([0, 1, 2, 3], dtype=index_dtype)
    for offsets, match in [([1, 2, 4], r"offsets\[0\] must be 0, got 1"),
                           ([0, 3, 2, 4], r"non-decreasing .*offsets\[1\]=3 > offsets\[2\]=2"),
                           ([0, 5, 4], r"end at the number of indices 4, got offsets\[1\]=5"),
                           ([0, 2, 5], r"offsets\[-1\].*indices 4, got 5")]:
        with pytest.raises(ValueError, match=match):
            _native(weight, idx, torch.tensor(offsets, dtype=index_dtype))
    with pytest.raises(ValueError, match="offsets"):
        _native(weight, idx, torch.zeros(0, dtype=index_dtype))
    off = torch.tensor([0, 2, 4], dtype=index_dtype)
    bad = torch.tensor([0, 7, -1, 9], dtype=index_dtype)
    with pytest.raises(IndexError, match=r"index 7 is out of range for a table of 5 rows"):
        _native(weight, bad, off)
    with pytest.raises(IndexError, match="empty table"):
        _native(torch.randn(0, 3), idx, off, bounds="clamp")
    with pytest.raises(ValueError, match="mode"):
        OPS.embedding_bag(weight, idx, off, None, "median", None, "raise", 8, None, False)
    with pytest.raises(ValueError, match="bounds"):
        OPS.embedding_bag(weight, idx, off, None, "sum", None, "wrap", 8, None, False)
    with pytest.raises(TypeError, match="weight"):
        _native(weight.int(), idx, off)


def test_native_op_first_bad_index_in_a_large_batch():
    weight = torch.randn(100, 4)
    idx = torch.randint(0, 100, (200_000,))
    idx[150_001] = 100
    idx[170_000] = -5
    off = torch.tensor([0, 100_000, 200_000])
    with pytest.raises(IndexError, match="index 100 "):
        _native(weight, idx, off)


# ----------------------------------------------------------------------------- backward
def _backward_both(grad, weight, idx, off, psw, mode, padding_idx, bounds, sparse):
    args = (grad, weight, idx, off, psw, mode, padding_idx, bounds, sparse)
    return OPS.embedding_bag_backward(*args), OPS.embedding_bag_backward_reference(*args)


@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False),
                                           ("mean", True), ("max", True)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bounds,padding_idx", [("raise", None), ("zero", 3), ("clamp", 0)])
def test_backward_matches_reference_backward(mode, weighted, sparse, dtype, bounds, padding_idx):
    g = torch.Generator().manual_seed(5)
    n, d = 23, 13
    weight = torch.randn(n, d, generator=g).to(dtype)
    lo, hi = (0, n) if bounds == "raise" else (-3, n + 3)
    idx, off = bags(torch.randint(0, 7, (9,), generator=g), n, lo=lo, hi=hi, generator=g)
    idx[:3] = 3 if idx.numel() >= 3 else idx[:3]  # repeated and padding rows
    psw = torch.rand(idx.numel(), generator=g).to(dtype) if weighted else None
    grad = torch.randn(off.numel() - 1, d, generator=g)
    (gw, gp), (gw_ref, gp_ref) = _backward_both(grad, weight, idx, off, psw, mode, padding_idx, bounds, sparse)
    assert gw.dtype == gw_ref.dtype and gw.shape == gw_ref.shape
    assert gp.dtype == gp_ref.dtype and gp.shape == gp_ref.shape
    rtol, atol = tol(dtype)
    torch.testing.assert_close(gw, gw_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(gp, gp_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n_rows", [3_000, 400_000], ids=["most_rows_read", "few_rows_read"])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
def test_dense_backward_large_and_deterministic(mode, weighted, n_rows):
    """Enough work for several threads, each owning consecutive rows; a hot row gets thousands of
    contributions. Each row's sum is the reference's index_add_ (index order): the same bits, on
    any number of threads, through either reduction (most rows read: each row written once; few
    read: zeros, then the indices added in place)."""
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(n_rows, 64, generator=g)
    lengths = torch.randint(0, 40, (2_000,), generator=g)
    lengths[10] = 10_000
    idx, off = bags(lengths, n_rows, generator=g)
    idx[::7] = 11
    psw = torch.randn(idx.numel(), generator=g) if weighted else None
    grad = torch.randn(off.numel() - 1, 64, generator=g)
    (gw, _), (gw_ref, _) = _backward_both(grad, weight, idx, off, psw, mode, None, "raise", False)
    assert torch.equal(gw, gw_ref)
    for threads in (1, 2, 3):
        again, _ = on_threads(threads, lambda: OPS.embedding_bag_backward(grad, weight, idx, off, psw, mode, None,
                                                                          "raise", False))
        assert torch.equal(gw, again)


def _vm_flags_at(address):
    """The VmFlags of the mapping that holds address (/proc/self/smaps)."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="this kernel has no transparent huge pages")
@pytest.mark.parametrize("n_indices", [5_000, 100_000], ids=["few_rows_read", "most_rows_read"])
def test_large_gradient_asks_for_huge_pages(monkeypatch, n_indices):
    """A dense gradient of 32 MiB or more (which glibc maps afresh on every call) is advised to the
    kernel for 2 MiB pages, unless RECSYS_KERNELS_HUGE_PAGES=0; the values are the reference's
    either way, through both reductions."""
    g = torch.Generator().manual_seed(12)
    weight = torch.randn(150_000, 64, generator=g)  # a 38.4 MB gradient
    idx, off = bags(torch.full((n_indices // 20,), 20), 150_000, generator=g)
    grad = torch.randn(off.numel() - 1, 64, generator=g)
    huge = 2 << 20
    got = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("RECSYS_KERNELS_HUGE_PAGES", setting)
        gw, _ = OPS.embedding_bag_backward(grad, weight, idx, off, None, "sum", None, "raise", False)
        first_huge_page = (gw.data_ptr() + huge - 1) // huge * huge
        assert ("hg" in _vm_flags_at(first_huge_page)) == (setting == "1")
        got[setting] = gw
    gw_ref, _ = OPS.embedding_bag_backward_reference(grad, weight, idx, off, None, "sum", None, "raise", False)
    assert torch.equal(got["1"], gw_ref) and torch.equal(got["0"], gw_ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_half_dense_backward_has_the_references_bits(isa, dtype, mode, weighted):
    """fp16 / bf16 tables: each gradient row is summed in fp32 and rounded once into the table's
    dtype as it is written (F16C / AVX2 on the avx2 path, the scalar cast on the scalar one): the
    reference's bits, index_add_ in fp32 then .to(dtype)."""
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(500, 24, generator=g).to(dtype)
    idx, off = bags(torch.randint(0, 30, (300,), generator=g), 500, generator=g)
    idx[::5] = 7
    psw = torch.randn(idx.numel(), generator=g).to(dtype) if weighted else None
    grad = torch.randn(off.numel() - 1, 24, generator=g).to(dtype)
    (gw, _), (gw_ref, _) = on_isa(isa, lambda: _backward_both(grad, weight, idx, off, psw, mode, None, "raise", False))
    assert gw.dtype == dtype and torch.equal(gw, gw_ref)


def test_backward_max_ties_and_nan():
    weight = torch.tensor([[1.0, 5.0], [3.0, float("nan")], [3.0, 2.0]])
    idx, off = torch.tensor([0, 2, 1, 1]), torch.tensor([0, 3, 4])
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (gw, _), (gw_ref, _) = _backward_both(grad, weight, idx, off, None, "max", None, "raise", True)
    torch.testing.assert_close(gw, gw_ref)
    assert gw[1, 0] == 1.0 and gw[2, 0] == 0.0  # tie: the first index attaining the max


def test_backward_autograd_uses_native_op():
    weight = torch.randn(10, 6, requires_grad=True)
    psw = torch.rand(7, requires_grad=True)
    idx, off = torch.tensor([1, 2, 2, 9, 0, 1, 5]), torch.tensor([0, 3, 3, 7])
    out = embedding_bag(weight, idx, off, per_sample_weights=psw, backend="cpu", sparse=True)
    gw, gp = torch.autograd.grad(out.square().sum(), [weight, psw])
    w2, p2 = weight.detach().clone().requires_grad_(), psw.detach().clone().requires_grad_()
    out2 = embedding_bag(w2, idx, off, per_sample_weights=p2, backend="reference", sparse=True)
    gw2, gp2 = torch.autograd.grad(out2.square().sum(), [w2, p2])
    assert gw.is_sparse
    torch.testing.assert_close(gw.to_dense(), gw2.to_dense())
    torch.testing.assert_close(gp, gp2)


def test_backward_rejects_quantized_table():
    packed = quantize_rowwise(torch.randn(5, 8))
    with pytest.raises(TypeError, match="inference only"):
        OPS.embedding_bag_backward(torch.randn(1, 8), packed, torch.tensor([0]), torch.tensor([0, 1]), None, "sum",
                                   None, "raise", False)


# ----------------------------------------------------------------------------- opcheck / compile
def _opcheck_cases():
    idx, off = torch.tensor([0, 3, 3, 1, 4]), torch.tensor([0, 2, 2, 5])
    packed = quantize_rowwise(torch.randn(5, 8), 4)
    return [
        (torch.randn(5, 4, requires_grad=True), idx, off, None, "mean", None, "raise", 8, None, False),
        (torch.randn(5, 4, dtype=torch.float64, requires_grad=True), idx.int(), off.int(),
         torch.rand(5, dtype=torch.float64, requires_grad=True), "sum", 3, "raise", 8, torch.float32, False),
        (torch.randn(5, 4, requires_grad=True), idx, off, None, "max", None, "clamp", 8, None, False),
        (torch.randn(5, 4), idx, off, None, "sum", 0, "zero", 8, None, True),
        (packed, idx, off, None, "sum", None, "raise", 4, torch.float16, False),
        (quantize_rowwise(torch.randn(5, 12)), idx, off, torch.rand(5), "sum", None, "raise", 8, None, False),
        (torch.randn(5, 4), idx[:0], torch.zeros(1, dtype=torch.long), None, "max", None, "raise", 8, None, False),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck_forward(case):
    torch.library.opcheck(OPS.embedding_bag.default, _opcheck_cases()[case])


@pytest.mark.parametrize("mode,sparse,weighted", [("sum", False, True), ("mean", True, False),
                                                  ("max", False, False), ("sum", True, True)])
def test_opcheck_backward(mode, sparse, weighted):
    idx, off = torch.tensor([0, 3, 3, 1, 4]), torch.tensor([0, 2, 2, 5])
    psw = torch.rand(5) if weighted else None
    args = (torch.randn(3, 4), torch.randn(5, 4), idx, off, psw, mode, 1, "raise", sparse)
    torch.library.opcheck(OPS.embedding_bag_backward.default, args)


def test_compile_backward_cpu_backend():
    weight = torch.randn(9, 5, requires_grad=True)
    idx, off = bags([2, 0, 3, 4], 9)
    f = torch.compile(lambda w: embedding_bag(w, idx, off, mode="mean", backend="cpu").square().sum(),
                      fullgraph=True, backend="aot_eager")
    g, = torch.autograd.grad(f(weight), weight)
    g_ref, = torch.autograd.grad(embedding_bag(weight, idx, off, mode="mean", backend="reference").square().sum(),
                                 weight)
    torch.testing.assert_close(g, g_ref)
