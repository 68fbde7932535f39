"""embedding_bag: every backend against a naive Python loop and torch's F.embedding_bag; quantized
tables against the reference fed the dequantized table; bad input; gradients; opcheck; compile."""
import pytest
import torch

from recsys_kernels import _backend
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import recsys_kernels as rk
from helpers import backend_params
from recsys_kernels.ops.embedding import embedding_bag
from recsys_kernels.ops.rowwise import dequantize_rowwise, quantize_rowwise

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# per_sample_weights exist only with mode="sum" (rejected otherwise: test_bad_input)
MODES_WEIGHTED = [("sum", False), ("sum", True), ("mean", False), ("max", False)]
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def naive(weight, indices, offsets, psw=None, mode="sum", padding_idx=None, bounds="raise"):
    """The definition, one index at a time, in float64."""
    w = weight.double()
    n, d = w.shape
    out = torch.zeros(len(offsets) - 1, d, dtype=torch.float64)
    for b in range(len(offsets) - 1):
        rows = []
        for p in range(int(offsets[b]), int(offsets[b + 1])):
            i = int(indices[p])
            if not 0 <= i < n:
                assert bounds != "raise"
                if bounds == "zero":
                    continue
                i = min(max(i, 0), n - 1)
            if i == padding_idx:
                continue
            rows.append(w[i] * (1.0 if psw is None else float(psw[p])))
        if rows:
            stacked = torch.stack(rows)
            out[b] = {"sum": stacked.sum(0), "mean": stacked.mean(0), "max": stacked.amax(0)}[mode]
    return out


def random_bags(n_bags, max_len=4, n_rows=11, lo=0, hi=None):
    lengths = torch.randint(0, max_len + 1, (n_bags,))
    if n_bags > 1:
        lengths[1] = 0  # always an empty bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(lo, n_rows if hi is None else hi, (int(offsets[-1]),))
    return indices, offsets


def rows_read(indices, n_rows, bounds, padding_idx):
    """The table rows a lookup reads, ascending, each once: a sparse gradient's coordinates."""
    read = indices.clamp(0, n_rows - 1) if bounds == "clamp" else indices[(indices >= 0) & (indices < n_rows)]
    return (read if padding_idx is None else read[read != padding_idx]).unique().tolist()


def check_low_precision(got, exact, theirs, dtype):
    """fp16/bf16: no worse than 2x the same-precision error of PyTorch's own kernel (DESIGN §6),
    with one ulp of the largest value as a floor for the case where torch happens to be exact."""
    err = (got.double() - exact).abs().max()
    torch_err = (theirs.double() - exact).abs().max()
    floor = EPS[dtype] * exact.abs().max().clamp(min=1)
    assert err <= 2 * torch_err + floor, (err, torch_err)


# ----------------------------------------------------------------------------- vs naive loop
@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("mode,weighted", MODES_WEIGHTED)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bounds", ["raise", "zero", "clamp"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_matches_naive_loop(device, backend, mode, weighted, dtype, index_dtype, bounds, padding_idx):
    n, d = 11, 5
    weight = torch.randn(n, d).to(dtype)
    lo, hi = (0, n) if bounds == "raise" else (-3, n + 3)
    indices, offsets = random_bags(7, n_rows=n, lo=lo, hi=hi)
    indices[0] = 3 if indices.numel() else 0  # the padding row shows up
    psw = torch.randn(indices.numel()).to(dtype) if weighted else None
    got = embedding_bag(weight.to(device), indices.to(index_dtype).to(device), offsets.to(index_dtype).to(device),
                        per_sample_weights=None if psw is None else psw.to(device), mode=mode,
                        padding_idx=padding_idx, bounds=bounds, backend=backend).cpu()
    assert got.dtype == dtype and got.shape == (7, d)
    exact = naive(weight, indices, offsets, psw, mode, padding_idx, bounds)
    if dtype in EPS:  # rounding the exact result once is what fp32 accumulation gives
        torch.testing.assert_close(got, exact.to(dtype), rtol=EPS[dtype], atol=EPS[dtype])
    else:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("sparse", [False, True])
def test_skipped_index_weight_contributes_nothing(device, backend, sparse):
    """A per-sample weight of inf / NaN at a skipped index (the padding row, out of range under
    bounds="zero") contributes nothing, as in F.embedding_bag: the reference and the Triton
    kernels multiplied the skipped 0 row by it (NaN), the C++ kernel skipped it; the same in the
    gradients of the table and of the weights."""
    weight = torch.randn(4, 3, dtype=torch.float64, device=device).requires_grad_()
    indices = torch.tensor([0, 1, 9, 2, -1], device=device)
    offsets = torch.tensor([0, 3, 5], device=device)
    psw = torch.tensor([float("inf"), 2.0, float("nan"), 3.0, float("-inf")], dtype=torch.float64,
                       device=device).requires_grad_()
    out = embedding_bag(weight, indices, offsets, per_sample_weights=psw, padding_idx=0, bounds="zero",
                        sparse=sparse, backend=backend)
    expected = torch.stack([2.0 * weight[1], 3.0 * weight[2]]).detach()
    torch.testing.assert_close(out.detach(), expected)
    out.sum().backward()
    grad = weight.grad.to_dense() if sparse else weight.grad
    torch.testing.assert_close(grad, torch.tensor([[0.0] * 3, [2.0] * 3, [3.0] * 3, [0.0] * 3], dtype=torch.float64,
                                                  device=device))
    torch.testing.assert_close(psw.grad, torch.stack([torch.zeros((), dtype=torch.float64, device=device),
                                                      weight[1].sum(), torch.zeros((), dtype=torch.float64, device=device),
                                                      weight[2].sum(), torch.zeros((), dtype=torch.float64, device=device)]).detach())


# ----------------------------------------------------------------------------- vs torch
@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("mode,weighted", MODES_WEIGHTED)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_matches_torch(device, backend, mode, weighted, dtype, index_dtype, padding_idx):
    n, d = 13, 6
    weight = torch.randn(n, d).to(dtype)
    indices, offsets = random_bags(9, max_len=6, n_rows=n)
    indices, offsets = indices.to(index_dtype), offsets.to(index_dtype)
    psw = torch.rand(indices.numel()).to(dtype) if weighted else None
    theirs = F.embedding_bag(indices, weight, offsets, mode=mode, per_sample_weights=psw,
                             include_last_offset=True, padding_idx=padding_idx)
    got = embedding_bag(weight.to(device), indices.to(device), offsets.to(device),
                        per_sample_weights=None if psw is None else psw.to(device), mode=mode,
                        padding_idx=padding_idx, backend=backend).cpu()
    assert got.dtype == theirs.dtype and got.shape == theirs.shape
    if dtype in EPS:
        pad = None if padding_idx is None else padding_idx % n
        check_low_precision(got, naive(weight, indices, offsets, psw, mode, pad), theirs, dtype)
    else:
        torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("d", [1, 3, 8, 129])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_odd_dims_and_lengths_path(device, backend, d, mode):
    weight = torch.randn(6, d)
    indices, offsets = random_bags(5, n_rows=6)
    lengths = (offsets[1:] - offsets[:-1]).int()
    got = embedding_bag(weight.to(device), indices.to(device), lengths=lengths.to(device), mode=mode,
                        backend=backend).cpu()
    torch.testing.assert_close(got.double(), naive(weight, indices, offsets, mode=mode), rtol=1e-5, atol=1e-6)
    via_offsets = embedding_bag(weight.to(device), indices.to(device), offsets.to(device), mode=mode,
                                backend=backend).cpu()
    assert torch.equal(got, via_offsets)


# ----------------------------------------------------------------------------- quantized tables
@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("bits,d", [(8, 1), (8, 3), (8, 8), (8, 129), (4, 2), (4, 8), (4, 130)])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 4])
@pytest.mark.parametrize("output_dtype", [None, torch.float16])
def test_quantized_matches_dequantized_reference(device, backend, bits, d, mode, padding_idx, output_dtype):
    weight = torch.randn(9, d) * torch.rand(9, 1) * 4
    packed = quantize_rowwise(weight, bits)
    table = dequantize_rowwise(packed, bits)
    indices, offsets = random_bags(6, n_rows=9)
    psw = torch.rand(indices.numel()) if mode == "sum" else None
    got = embedding_bag(packed.to(device), indices.to(device), offsets.to(device), bits=bits, mode=mode,
                        per_sample_weights=None if psw is None else psw.to(device), padding_idx=padding_idx,
                        output_dtype=output_dtype, backend=backend).cpu()
    expected = embedding_bag(table, indices, offsets, mode=mode, per_sample_weights=psw, padding_idx=padding_idx,
                             output_dtype=output_dtype, backend="reference")
    assert got.dtype == (output_dtype or torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
def test_quantized_matches_torch_quantized_op(device, backend):
    weight = torch.randn(20, 16)
    packed = torch.ops.quantized.embedding_bag_byte_prepack(weight)
    indices, offsets = random_bags(8, n_rows=20)
    theirs = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        packed, indices, offsets, mode=0, include_last_offset=True)
    got = embedding_bag(packed.to(device), indices.to(device), offsets.to(device), backend=backend).cpu()
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_empty_batch_empty_bags_and_no_indices(device, backend, mode):
    weight = torch.randn(5, 3, device=device)
    none = torch.zeros(0, dtype=torch.long, device=device)
    out = embedding_bag(weight, none, torch.zeros(1, dtype=torch.long, device=device), mode=mode, backend=backend)
    assert out.shape == (0, 3)  # B = 0
    out = embedding_bag(weight, none, torch.zeros(5, dtype=torch.long, device=device), mode=mode, backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(4, 3))  # nnz = 0: every bag empty
    # bags holding only padding rows or (bounds="zero") out-of-range indices are empty too
    out = embedding_bag(weight, torch.tensor([1, 1, 7, -1], device=device), torch.tensor([0, 2, 4], device=device),
                        mode=mode, padding_idx=1, bounds="zero", backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(2, 3))
    # max over negative rows is negative, not clipped at the empty-bag 0
    out = embedding_bag(-weight.abs() - 1, torch.tensor([0, 2], device=device), torch.tensor([0, 2], device=device),
                        mode=mode, backend=backend)
    assert (out < 0).all()


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_bounds(device, backend, index_dtype):
    weight = torch.randn(5, 3, device=device)
    off = torch.tensor([0, 1, 2], dtype=index_dtype, device=device)
    ok = embedding_bag(weight, torch.tensor([4, 0], dtype=index_dtype, device=device), off, backend=backend)
    torch.testing.assert_close(ok, weight[[4, 0]])
    for bad in (5, -1, 2 ** 31 - 1 if index_dtype == torch.int32 else 2 ** 40):
        idx = torch.tensor([0, bad], dtype=index_dtype, device=device)
        with pytest.raises(IndexError, match=rf"index {bad} .*5 rows"):
            embedding_bag(weight, idx, off, backend=backend)
        zero = embedding_bag(weight, idx, off, bounds="zero", backend=backend)
        torch.testing.assert_close(zero, torch.stack([weight[0], torch.zeros(3, device=device)]))
        clamp = embedding_bag(weight, idx, off, bounds="clamp", backend=backend)
        torch.testing.assert_close(clamp, weight[[0, 4 if bad > 0 else 0]])


def test_mean_does_not_count_skipped_indices():
    weight = torch.arange(12.0).view(4, 3)
    out = embedding_bag(weight, torch.tensor([1, 0, 9, 3]), torch.tensor([0, 4]), mode="mean", padding_idx=0,
                        bounds="zero")
    torch.testing.assert_close(out, ((weight[1] + weight[3]) / 2)[None])
    out = embedding_bag(weight, torch.tensor([1, 9]), torch.tensor([0, 2]), mode="mean", bounds="clamp")
    torch.testing.assert_close(out, ((weight[1] + weight[3]) / 2)[None])


def test_two_dimensional_indices_and_mixed_index_dtypes():
    weight = torch.randn(7, 4)
    idx2 = torch.randint(0, 7, (5, 3))
    psw = torch.rand(5, 3)
    torch.testing.assert_close(embedding_bag(weight, idx2, per_sample_weights=psw),
                               F.embedding_bag(idx2, weight, per_sample_weights=psw, mode="sum"))
    assert embedding_bag(weight, idx2[:, :0]).abs().sum() == 0  # L = 0
    idx, off = random_bags(4, n_rows=7)
    torch.testing.assert_close(embedding_bag(weight, idx.int(), off), embedding_bag(weight, idx, off.int()))


def test_output_dtype_and_fp64_accumulation():
    weight = torch.randn(6, 5)
    idx, off = random_bags(4, n_rows=6)
    out = embedding_bag(weight, idx, off, output_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, embedding_bag(weight, idx, off).bfloat16())
    # fp32 accumulation of fp16 rows: a sum that overflows no fp16 partial is exact
    w16 = torch.full((2, 1), 2048.0, dtype=torch.float16)
    w16[1] = 1.0
    out = embedding_bag(w16, torch.tensor([0, 1, 1, 1, 1]), torch.tensor([0, 5]), output_dtype=torch.float32)
    assert out.item() == 2052.0  # fp16 accumulation would round 2049 back to 2048 each step


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("sparse", [False, True])
def test_per_sample_weight_gradient_of_a_table_with_no_columns(device, backend, sparse):
    # D = 0: every bag's output is empty, so every weight's gradient is an empty dot product, 0
    # (the C++ backward took an empty G for its "no per-index rows" case and returned its
    # uninitialised per-sample-weight gradient); the grouped op's backward calls the same op
    weight = torch.randn(6, 0, device=device, requires_grad=True)
    idx, off = torch.tensor([0, 5, 2, 2], device=device), torch.tensor([0, 1, 4], device=device)
    psw = torch.full((4,), 7.0, device=device, requires_grad=True)
    for _ in range(3):  # fresh memory each time: garbage would show in one of them
        psw.grad = None
        embedding_bag(weight, idx, off, per_sample_weights=psw, sparse=sparse, backend=backend).sum().backward()
        assert torch.equal(psw.grad.cpu(), torch.zeros(4))
    psw.grad = None
    rk.embedding_bag_grouped([weight, torch.randn(6, 3, device=device)], [idx, idx], [off, off],
                             per_sample_weights=[psw, None], backend=backend).sum().backward()
    assert torch.equal(psw.grad.cpu(), torch.zeros(4))


def test_64bit_offsets_arithmetic():
    # offsets past 2^31 are read as int64 (the data itself stays small: a 0-row check only)
    weight = torch.randn(3, 2)
    off = torch.tensor([0, 2 ** 33], dtype=torch.long)
    with pytest.raises(ValueError, match=str(2 ** 33)):
        embedding_bag(weight, torch.tensor([0, 1]), off)


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("offsets,match", [
    ([1, 2, 4], r"offsets\[0\] must be 0"),
    ([0, 3, 2, 4], "non-decreasing"),
    ([0, 5, 4], r"end at the number of indices 4, got offsets\[1\]=5"),
    ([0, 2, 5], r"offsets\[-1\].*4"),
    ([0, 2, 3], r"offsets\[-1\].*4"),
])
def test_bad_offsets(device, backend, offsets, match):
    weight = torch.randn(5, 3, device=device)
    idx = torch.tensor([0, 1, 2, 3], device=device)
    with pytest.raises(ValueError, match=match):
        embedding_bag(weight, idx, torch.tensor(offsets, device=device), backend=backend)


def test_bad_lengths():
    weight, idx = torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="lengths"):
        embedding_bag(weight, idx, lengths=torch.tensor([3, -1, 2]))
    with pytest.raises(ValueError, match="lengths"):
        embedding_bag(weight, idx, lengths=torch.tensor([1, 2]))


W, I, O = torch.randn(5, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight=torch.randint(0, 3, (5, 4))), TypeError, "weight"),
    (dict(weight=torch.randn(5)), ValueError, "weight"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.uint8)), ValueError, "weight"),  # < 9 bytes a row
    (dict(weight=torch.zeros(5, 12, dtype=torch.uint8), bits=3), ValueError, "bits"),
    (dict(indices=I.float()), TypeError, "indices"),
    (dict(indices=I[None, None]), ValueError, "indices"),
    (dict(indices=I.view(3, 1)), ValueError, "offsets"),  # 2-D indices take no offsets
    (dict(offsets=O.float()), TypeError, "offsets"),
    (dict(offsets=O[None]), ValueError, "offsets"),
    (dict(offsets=O[:0]), ValueError, "offsets"),
    (dict(offsets=None), ValueError, "offsets"),
    (dict(lengths=torch.tensor([1, 2])), ValueError, "offsets"),  # both given
    (dict(offsets=None, lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    (dict(per_sample_weights=torch.ones(3, dtype=torch.long)), TypeError, "per_sample_weights"),
    (dict(per_sample_weights=torch.ones(4)), ValueError, "per_sample_weights"),
    (dict(per_sample_weights=torch.ones(3), mode="mean"), ValueError, "per_sample_weights"),
    (dict(per_sample_weights=torch.ones(3), mode="max"), ValueError, "per_sample_weights"),
    (dict(mode="median"), ValueError, "mode"),
    (dict(bounds="wrap"), ValueError, "bounds"),
    (dict(padding_idx=5), ValueError, "padding_idx"),
    (dict(padding_idx=-6), ValueError, "padding_idx"),
    (dict(padding_idx=1.0), TypeError, "padding_idx"),
    (dict(output_dtype=torch.int32), TypeError, "output_dtype"),
    (dict(sparse="yes"), TypeError, "sparse"),
    (dict(indices=I.to("meta")), ValueError, "device"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(weight=W, indices=I, offsets=O)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        embedding_bag(args.pop("weight"), args.pop("indices"), args.pop("offsets"), **args)


def test_quantized_table_has_no_gradient():
    packed = quantize_rowwise(torch.randn(5, 8))
    with pytest.raises(NotImplementedError, match="inference only"):
        embedding_bag(packed, I, O, per_sample_weights=torch.ones(3, requires_grad=True))


# ----------------------------------------------------------------------------- hypothesis
@settings(max_examples=40, deadline=None)
@given(data=st.data(), n_rows=st.integers(0, 6), mode=st.sampled_from(["sum", "mean", "max"]),
       bounds=st.sampled_from(["zero", "clamp"]), use_padding=st.booleans(), weighted=st.booleans())
def test_hypothesis_index_offset_space(data, n_rows, mode, bounds, use_padding, weighted):
    if bounds == "clamp" and n_rows == 0:
        bounds = "zero"  # clamping into an empty table is an error (test_clamp_into_empty_table)
    lengths = data.draw(st.lists(st.integers(0, 4), max_size=6))
    nnz = sum(lengths)
    indices = torch.tensor(data.draw(st.lists(st.integers(-3, n_rows + 2), min_size=nnz, max_size=nnz)),
                           dtype=torch.long)
    offsets = torch.tensor([0] + lengths, dtype=torch.long).cumsum(0)
    padding_idx = data.draw(st.integers(0, n_rows - 1)) if use_padding and n_rows else None
    psw = torch.randn(nnz) if weighted and mode == "sum" else None
    weight = torch.randn(n_rows, 3)
    got = embedding_bag(weight, indices, offsets, per_sample_weights=psw, mode=mode, padding_idx=padding_idx,
                        bounds=bounds)
    torch.testing.assert_close(got.double(), naive(weight, indices, offsets, psw, mode, padding_idx, bounds),
                               rtol=1e-5, atol=1e-6)


def test_clamp_into_empty_table():
    with pytest.raises(IndexError, match="empty table"):
        embedding_bag(torch.randn(0, 3), torch.tensor([0]), torch.tensor([0, 1]), bounds="clamp")


# ----------------------------------------------------------------------------- gradients
class _Densify(torch.autograd.Function):
    """Identity whose backward densifies the incoming gradient, so gradcheck (which wants a dense
    gradient for a dense input) checks the values of the sparse gradient."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        assert g.is_sparse
        return g.to_dense()


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("bounds,padding_idx", [("raise", None), ("zero", 2), ("clamp", 0)])
def test_gradcheck(mode, sparse, bounds, padding_idx):
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)  # random: no ties for max
    lo, hi = (0, 7) if bounds == "raise" else (-2, 9)
    indices, offsets = random_bags(5, n_rows=7, lo=lo, hi=hi)
    inputs = [weight]
    if mode == "sum":
        inputs.append(torch.randn(indices.numel(), dtype=torch.float64, requires_grad=True))

    def fn(w, *psw):
        return embedding_bag(_Densify.apply(w) if sparse else w, indices, offsets,
                             per_sample_weights=psw[0] if psw else None, mode=mode, padding_idx=padding_idx,
                             bounds=bounds, sparse=sparse)

    assert torch.autograd.gradcheck(fn, inputs)
    if sparse:  # the sparse gradient itself: coalesced COO [N, D], one row per row read
        g = embedding_bag(weight, indices, offsets, per_sample_weights=inputs[1] if mode == "sum" else None,
                          mode=mode, padding_idx=padding_idx, bounds=bounds, sparse=True)
        gw, = torch.autograd.grad(g.sum(), weight)
        assert gw.is_sparse and gw.is_coalesced() and gw.shape == weight.shape
        assert gw._indices()[0].tolist() == rows_read(indices, 7, bounds, padding_idx)


# torch's F.embedding_bag has no sparse gradient in max mode (ours is checked by test_gradcheck)
@pytest.mark.parametrize("mode,sparse", [("sum", False), ("sum", True), ("mean", False), ("mean", True),
                                         ("max", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_grads_match_torch(mode, sparse, dtype, padding_idx):
    indices, offsets = random_bags(6, max_len=5, n_rows=8)
    indices[:2] = 1  # padding and repeated rows
    base = torch.randn(8, 4, dtype=dtype)
    psw_base = torch.rand(indices.numel(), dtype=dtype) if mode == "sum" else None
    grads = []
    for impl in ("ours", "torch"):
        w = base.clone().requires_grad_()
        psw = None if psw_base is None else psw_base.clone().requires_grad_()
        if impl == "ours":
            out = embedding_bag(w, indices, offsets, per_sample_weights=psw, mode=mode, padding_idx=padding_idx,
                                sparse=sparse)
        else:
            out = F.embedding_bag(indices, w, offsets, per_sample_weights=psw, mode=mode, padding_idx=padding_idx,
                                  sparse=sparse, include_last_offset=True)
        g_out = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        gs = torch.autograd.grad(out, [w] if psw is None else [w, psw], g_out)
        if sparse:
            assert gs[0].is_sparse
        grads.append([g.to_dense() if g.is_sparse else g for g in gs])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("mode,weighted", MODES_WEIGHTED)
@pytest.mark.parametrize("bounds,padding_idx", [("raise", None), ("raise", 3), ("zero", 0), ("clamp", 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_gradient_is_the_dense_one_coalesced(device, backend, mode, weighted, bounds, padding_idx, dtype):
    """sparse=True gives the dense gradient's touched rows as a coalesced COO tensor: each row
    read once, ascending, none for an index that reads nothing (padding, out of range under
    "zero"), with the dense gradient's bits (the same sums in the same order); the
    per-sample-weight gradient is unchanged. Hot rows, long bags and empty ones."""
    n_rows = 9
    lo, hi = (0, n_rows) if bounds == "raise" else (-3, n_rows + 3)
    indices, offsets = random_bags(40, max_len=12, n_rows=n_rows, lo=lo, hi=hi)
    indices[::3] = 4  # a hot row
    base = torch.randn(n_rows, 5, dtype=dtype)
    psw_base = torch.randn(indices.numel(), dtype=dtype) if weighted else None
    grads = {}
    for sparse in (False, True):
        w = base.to(device).requires_grad_()
        psw = None if psw_base is None else psw_base.to(device).requires_grad_()
        out = embedding_bag(w, indices.to(device), offsets.to(device), per_sample_weights=psw, mode=mode,
                            padding_idx=padding_idx, bounds=bounds, sparse=sparse, backend=backend)
        g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
        grads[sparse] = torch.autograd.grad(out, [w] if psw is None else [w, psw], g_out)
    sparse_grad = grads[True][0]
    assert sparse_grad.is_sparse and sparse_grad.is_coalesced() and sparse_grad.shape == base.shape
    assert sparse_grad._indices().cpu()[0].tolist() == rows_read(indices, n_rows, bounds, padding_idx)
    if device == "cuda" and backend == "reference":  # torch's index_add_ there: atomics, in no set order
        torch.testing.assert_close(sparse_grad.to_dense(), grads[False][0])
    else:
        assert torch.equal(sparse_grad.to_dense(), grads[False][0])
    if weighted:
        assert torch.equal(grads[True][1], grads[False][1])


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("sparse", [False, True])
def test_sum_and_mean_gradients_do_not_read_the_table(device, backend, mode, sparse):
    """Without per-sample weights the sum / mean gradient does not depend on the table: a table of
    NaN gets the exact gradient. (The sparse gradient relies on it: its compact table is left
    uninitialised.)"""
    indices, offsets = random_bags(9, max_len=6, n_rows=7)
    weight = torch.full((7, 3), float("nan"), device=device, requires_grad=True)
    out = embedding_bag(weight, indices.to(device), offsets.to(device), mode=mode, sparse=sparse, backend=backend)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    got, = torch.autograd.grad(out, weight, g_out)
    want = torch.zeros(7, 3)
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        for p in range(s, e):
            want[indices[p]] += g_out[b].cpu() / (e - s if mode == "mean" else 1)
    torch.testing.assert_close((got.to_dense() if sparse else got).cpu(), want)


@pytest.mark.parametrize("mode,sparse", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
def test_trainable_front_door_records_the_ops_autograd_node(mode, sparse):
    # a trainable CPU table skips the dispatcher (_common.run_direct applies the op's
    # autograd.Function itself): the same node, output and gradients as the op called through it
    indices, offsets = random_bags(7, max_len=6, n_rows=9)
    base = torch.randn(9, 5)
    g_out = torch.randn(7, 5)
    results = []
    for call in (lambda w: embedding_bag(w, indices, offsets, mode=mode, sparse=sparse, backend="cpu"),
                 lambda w: torch.ops.recsys_kernels.embedding_bag(w, indices, offsets, None, mode, None, "raise", 8,
                                                                  None, sparse)):
        w = base.clone().requires_grad_()
        out = call(w)
        (grad,) = torch.autograd.grad(out, [w], g_out)
        results.append((type(out.grad_fn), out, grad.to_dense()))
    (node, out, grad), (op_node, op_out, op_grad) = results
    assert node is op_node and node.__name__ == "FunctionBackward"
    assert torch.equal(out, op_out) and torch.equal(grad, op_grad)


def test_max_ties_route_gradient_to_first_index():
    base = torch.randn(8, 3)
    base[5] = base[6] = base.abs().max() + 1  # rows 5 and 6 tie for the max in every column
    indices, offsets = torch.tensor([2, 6, 5, 6, 1, 5]), torch.tensor([0, 4, 6])
    grads = []
    for fn in (lambda w: embedding_bag(w, indices, offsets, mode="max"),
               lambda w: F.embedding_bag(indices, w, offsets, mode="max", include_last_offset=True)):
        w = base.clone().requires_grad_()
        fn(w).sum().backward()
        grads.append(w.grad)
    expected = torch.zeros(8, 3)
    expected[6] = 1  # bag 0: first of the tied indices is 6
    expected[5] = 1  # bag 1: 5 beats 1
    torch.testing.assert_close(grads[0], expected)
    torch.testing.assert_close(grads[1], expected)  # torch's CPU kernel agrees


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
def test_max_with_nan_rows(device, backend):
    """max pooling: a NaN value wins its column wherever it sits in the bag (torch's amax), and
    that column's gradient goes to no index (the reference compares with the max; NaN equals
    nothing). Triton's tl.max drops NaN: its kernels track it apart."""
    n, d = 12, 40  # columns over more than one Triton column block at BLOCK_D = 32
    weight = torch.randn(n, d)
    weight[3, 0] = weight[3, 33] = float("nan")  # row 3: mid-bag, first, last and alone below
    weight[7, 5] = float("nan")
    indices = torch.tensor([1, 3, 2, 3, 0, 4, 5, 6, 8, 9, 10, 11, 2, 7, 3, 7])
    offsets = torch.tensor([0, 3, 5, 12, 14, 15, 16])
    grad_out = torch.randn(6, d)
    outs, grads = [], []
    for be, dev in (("reference", "cpu"), (backend, device)):
        w = weight.to(dev, copy=True).requires_grad_()  # a leaf of its own on each device
        out = embedding_bag(w, indices.to(dev), offsets.to(dev), mode="max", backend=be)
        out.backward(grad_out.to(dev))
        outs.append(out.detach().cpu())
        grads.append(w.grad.cpu())
    assert outs[0][0, 0].isnan() and outs[0][3, 5].isnan() and not outs[0][2, 0].isnan()
    torch.testing.assert_close(outs[1], outs[0], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    grouped = rk.embedding_bag_grouped([weight.to(device)] * 2, [indices.to(device)] * 2, [offsets.to(device)] * 2,
                                       modes=["max", "sum"], backend=backend)
    torch.testing.assert_close(grouped[:, :d].cpu(), outs[0], equal_nan=True, rtol=0, atol=0)


def test_grad_with_output_dtype_and_fp16_table():
    w = torch.randn(6, 3, dtype=torch.float16, requires_grad=True)
    idx, off = torch.tensor([0, 1, 1, 5]), torch.tensor([0, 3, 4])
    out = embedding_bag(w, idx, off, output_dtype=torch.float32)
    out.sum().backward()
    assert w.grad.dtype == torch.float16
    torch.testing.assert_close(w.grad.float(), torch.tensor([1.0, 2, 0, 0, 0, 1])[:, None].expand(6, 3))


# ----------------------------------------------------------------------------- opcheck / compile
def _opcheck_cases():
    idx, off = torch.tensor([0, 3, 3, 1, 4]), torch.tensor([0, 2, 2, 5])
    w = torch.randn(5, 4)
    packed = quantize_rowwise(torch.randn(5, 8), 4)
    return [
        (w.requires_grad_(), idx, off, None, "mean", None, "raise", 8, None, False),
        (torch.randn(5, 4, dtype=torch.float64, requires_grad=True), idx.int(), off.int(),
         torch.rand(5, dtype=torch.float64, requires_grad=True), "sum", 3, "raise", 8, torch.float32, False),
        (torch.randn(5, 4, requires_grad=True), idx, off, None, "max", None, "clamp", 8, None, False),
        (torch.randn(5, 4), idx, off, None, "sum", 0, "zero", 8, None, True),
        (packed, idx, off, None, "sum", None, "raise", 4, torch.float16, False),
        (torch.randn(5, 4), idx[:0], torch.zeros(1, dtype=torch.long), None, "max", None, "raise", 8, None, False),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck_forward(case):
    torch.library.opcheck(torch.ops.recsys_kernels.embedding_bag_reference.default, _opcheck_cases()[case])


@pytest.mark.parametrize("mode,sparse,weighted", [("sum", False, True), ("mean", True, False),
                                                  ("max", False, False), ("sum", True, True)])
def test_opcheck_backward(mode, sparse, weighted):
    idx, off = torch.tensor([0, 3, 3, 1, 4]), torch.tensor([0, 2, 2, 5])
    psw = torch.rand(5) if weighted else None
    args = (torch.randn(3, 4), torch.randn(5, 4), idx, off, psw, mode, 1, "raise", sparse)
    torch.library.opcheck(torch.ops.recsys_kernels.embedding_bag_backward_reference.default, args)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in _backend.available_backends("embedding_bag", "cpu")])
def test_compile_fullgraph(backend):
    weight = torch.randn(9, 5)
    idx, off = random_bags(4, n_rows=9)
    lengths = off[1:] - off[:-1]
    packed = quantize_rowwise(weight)

    @torch.compile(fullgraph=True)
    def f(w, q, idx, off, lengths, psw):
        a = embedding_bag(w, idx, off, per_sample_weights=psw, padding_idx=-1, backend=backend)
        b = embedding_bag(w, idx, lengths=lengths, mode="max", bounds="clamp", backend=backend)
        c = embedding_bag(q, idx, off, mode="mean", backend=backend)
        return a, b, c

    psw = torch.rand(idx.numel())
    a, b, c = f(weight, packed, idx, off, lengths, psw)
    torch.testing.assert_close(a, embedding_bag(weight, idx, off, per_sample_weights=psw, padding_idx=8, backend="reference"))
    torch.testing.assert_close(b, embedding_bag(weight, idx, off, mode="max", backend="reference"))
    torch.testing.assert_close(c, embedding_bag(packed, idx, off, mode="mean", backend="reference"))


def test_compile_backward():
    weight = torch.randn(9, 5, requires_grad=True)
    idx, off = random_bags(4, n_rows=9)
    f = torch.compile(lambda w: embedding_bag(w, idx, off, mode="mean", backend="reference").square().sum(),
                      fullgraph=True, backend="aot_eager")
    g, = torch.autograd.grad(f(weight), weight)
    g_ref, = torch.autograd.grad(embedding_bag(weight, idx, off, mode="mean").square().sum(), weight)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in _backend.available_backends("embedding_bag", "cpu")])
def test_compile_sparse_backward(backend):
    """The coalesced sparse gradient has a data-dependent number of rows; a fullgraph compile of
    forward and backward gives the eager one."""
    torch._dynamo.reset()
    weight = torch.randn(9, 5, requires_grad=True)
    idx, off = random_bags(6, n_rows=11, lo=-2)
    idx[:3] = 4

    def loss(w):
        return embedding_bag(w, idx, off, padding_idx=2, bounds="zero", sparse=True, backend=backend).square().sum()

    g, = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(weight), weight)
    g_eager, = torch.autograd.grad(loss(weight), weight)
    assert g.is_coalesced() and torch.equal(g._indices(), g_eager._indices())
    assert g._indices()[0].tolist() == rows_read(idx, 9, "zero", 2)
    torch.testing.assert_close(g._values(), g_eager._values())


def test_backend_selection():
    weight, idx, off = torch.randn(4, 2), torch.tensor([1]), torch.tensor([0, 1])
    torch.testing.assert_close(embedding_bag(weight, idx, off, backend="reference"), weight[1:2])
    prev = rk.set_backend("reference")
    try:
        torch.testing.assert_close(embedding_bag(weight, idx, off), weight[1:2])
    finally:
        rk.set_backend(prev)
