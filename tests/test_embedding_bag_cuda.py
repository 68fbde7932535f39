"""embedding_bag on the CUDA C++ backend (csrc/embedding_bag/embedding_bag_cuda.cu), beyond the generic
matrix of test_embedding_bag.py (which runs its "cuda-cuda" params when a GPU is present): large and
skewed batches against the reference run on the same GPU, both the vectorised and the scalar kernel
variants, quantized tables, the device-side error flags (IndexError / ValueError with the reference's
messages), and the deterministic backward. Every test here needs a GPU and is skipped without one."""
import pytest
import torch

from recsys_kernels import _backend
from recsys_kernels.ops.embedding import embedding_bag
from recsys_kernels.ops.rowwise import dequantize_rowwise, quantize_rowwise

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif("cuda" not in _backend.available_backends("embedding_bag", "cuda"),
                       reason="the cuda backend of embedding_bag is not available"),
]

DEV = "cuda"
EPS = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float64: 1e-12}


def bags(n_bags, max_len, n_rows, *, skew=None, device=DEV, dtype=torch.long, gen=None):
    """Random CSR bags (an empty bag at position 1); `skew` makes bag 0 that long."""
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=gen)
    if n_bags > 1:
        lengths[1] = 0
    if skew is not None:
        lengths[0] = skew
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    # power-law-ish row popularity: some rows repeat a lot (hot rows for the backward)
    u = torch.rand(int(offsets[-1]), generator=gen)
    indices = (u ** 3 * n_rows).long().clamp_(max=n_rows - 1)
    return indices.to(dtype).to(device), offsets.to(dtype).to(device)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is off 16-byte alignment (one element in): the
    kernels must then take their scalar path."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def run(weight, indices, offsets, backend, **kw):
    return embedding_bag(weight, indices, offsets, backend=backend, **kw)


def check(got, expected, dtype):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = EPS[dtype]
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- forward vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("d", [64, 128, 256, 1000, 129])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
def test_large_batch_matches_reference(dtype, d, mode, weighted):
    n_rows = 50_000
    weight = torch.randn(n_rows, d, device=DEV).to(dtype)
    indices, offsets = bags(2048, 40, n_rows, dtype=torch.int32)
    psw = torch.rand(indices.numel(), device=DEV).to(dtype) if weighted else None
    kw = dict(per_sample_weights=psw, mode=mode, padding_idx=7)
    got = run(weight, indices, offsets, "cuda", **kw)
    check(got, run(weight, indices, offsets, "reference", **kw), dtype)


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_skewed_bags(d, mode, index_dtype):
    """One bag of 10,000 indices among many short ones."""
    weight = torch.randn(5000, d, device=DEV)
    indices, offsets = bags(300, 3, 5000, skew=10_000, dtype=index_dtype)
    got = run(weight, indices, offsets, "cuda", mode=mode)
    exact = run(weight.double(), indices, offsets, "reference", mode=mode)
    if mode != "sum":
        torch.testing.assert_close(got, exact.float(), rtol=1e-5, atol=1e-5)
        return
    # a float32 sum of 10,000 terms, in any order, is off by up to ~1e-4 of the sum of |terms|
    # (hot rows repeat, so sums reach ~1e3; 2e-5 relative was seen on an H200)
    magnitude = run(weight.double().abs(), indices, offsets, "reference", mode="sum")
    assert ((got.double() - exact).abs() <= 1e-4 * magnitude + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("d", [8, 64, 200])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_scalar_path_equals_vector_path(dtype, d, mode):
    """A misaligned table takes the scalar kernel; both must match the reference."""
    weight = torch.randn(1000, d, device=DEV).to(dtype)
    indices, offsets = bags(500, 12, 1000)
    psw = torch.rand(indices.numel(), device=DEV) if mode == "sum" else None
    kw = dict(per_sample_weights=psw, mode=mode, bounds="clamp")
    expected = run(weight, indices, offsets, "reference", **kw)
    check(run(weight, indices, offsets, "cuda", **kw), expected, dtype)
    check(run(misaligned(weight), indices, offsets, "cuda", **kw), expected, dtype)


@pytest.mark.parametrize("bits,d", [(8, 64), (8, 128), (8, 60), (8, 3), (8, 129), (4, 64), (4, 128), (4, 60),
                                    (4, 2), (4, 130)])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("output_dtype", [None, torch.float16])
def test_quantized_tables(bits, d, mode, output_dtype):
    weight = torch.randn(3000, d, device=DEV) * torch.rand(3000, 1, device=DEV) * 4
    packed = quantize_rowwise(weight, bits)
    table = dequantize_rowwise(packed, bits)
    indices, offsets = bags(700, 20, 3000)
    psw = torch.rand(indices.numel(), device=DEV) if mode == "sum" else None
    kw = dict(per_sample_weights=psw, mode=mode, padding_idx=11, output_dtype=output_dtype)
    expected = run(table, indices, offsets, "reference", **kw)
    got = run(packed, indices, offsets, "cuda", bits=bits, **kw)
    assert got.dtype == (output_dtype or torch.float32)
    tol = EPS[output_dtype or torch.float32]  # float32 sums in any order, rounded once to the output
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # the unaligned reader (a table that starts off its 8-byte alignment)
    got = run(misaligned(packed), indices, offsets, "cuda", bits=bits, **kw)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("output_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_output_dtypes(dtype, output_dtype):
    weight = torch.randn(300, 48, device=DEV).to(dtype)
    indices, offsets = bags(100, 9, 300)
    got = run(weight, indices, offsets, "cuda", mode="mean", output_dtype=output_dtype)
    expected = run(weight, indices, offsets, "reference", mode="mean", output_dtype=output_dtype)
    assert got.dtype == output_dtype
    tol = max(EPS[dtype], EPS[output_dtype])
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("bounds", ["zero", "clamp"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_out_of_range_policies_large(bounds, mode):
    weight = torch.randn(1000, 96, device=DEV)
    indices, offsets = bags(400, 10, 1000)
    indices = indices + torch.randint(-1500, 1500, indices.shape, device=DEV) * (torch.rand(indices.shape, device=DEV) < 0.2)
    kw = dict(mode=mode, bounds=bounds, padding_idx=999)
    torch.testing.assert_close(run(weight, indices, offsets, "cuda", **kw),
                               run(weight, indices, offsets, "reference", **kw), rtol=1e-5, atol=1e-5)


def test_nan_and_inf_rows():
    weight = torch.randn(10, 16, device=DEV)
    weight[3, 0] = float("nan")
    weight[4] = float("inf")
    indices = torch.tensor([3, 1, 4, 2, 4, 3, 0], device=DEV)
    offsets = torch.tensor([0, 2, 4, 7], device=DEV)
    for mode in ("sum", "mean", "max"):
        for pad in (None, 4):
            got = run(weight, indices, offsets, "cuda", mode=mode, padding_idx=pad).cpu()
            # the reference on CPU tensors: the specification (NaN propagates through max)
            expected = run(weight.cpu(), indices.cpu(), offsets.cpu(), "reference", mode=mode, padding_idx=pad)
            torch.testing.assert_close(got, expected, equal_nan=True)


# ----------------------------------------------------------------------------- device-side error flags
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_bounds_raise_names_the_first_bad_index(index_dtype):
    weight = torch.randn(100, 64, device=DEV)
    indices, offsets = bags(3000, 8, 100, dtype=index_dtype)
    indices[indices.numel() - 5] = -7  # later in index order, but the atomicMin keeps the first
    indices[123] = 1000
    with pytest.raises(IndexError, match=r"index 1000 is out of range for a table of 100 rows"):
        run(weight, indices, offsets, "cuda")
    # every other policy accepts it; the reference agrees
    for bounds in ("zero", "clamp"):
        torch.testing.assert_close(run(weight, indices, offsets, "cuda", bounds=bounds),
                                   run(weight, indices, offsets, "reference", bounds=bounds))


@pytest.mark.parametrize("offsets,match", [
    ([1, 2, 4], r"offsets\[0\] must be 0, got 1"),
    ([0, 3, 2, 4], r"non-decreasing .*offsets\[1\]=3 > offsets\[2\]=2"),
    ([0, 5, 4], r"end at the number of indices 4, got offsets\[1\]=5"),
    ([0, 2, 5], r"offsets\[-1\].*4, got 5"),
    ([0, 2, 3], r"offsets\[-1\].*4, got 3"),
    ([0, -2, 4], "non-decreasing"),
])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_bad_offsets_raise_value_error(offsets, match, index_dtype):
    weight = torch.randn(5, 3, device=DEV)
    idx = torch.tensor([0, 1, 2, 99], dtype=index_dtype, device=DEV)  # 99: offsets are checked first
    with pytest.raises(ValueError, match=match):
        run(weight, idx, torch.tensor(offsets, dtype=index_dtype, device=DEV), "cuda")
    with pytest.raises(ValueError, match=match):  # the backward op validates the same way
        torch.ops.recsys_kernels.embedding_bag_backward(torch.ones(len(offsets) - 1, 3, device=DEV), weight, idx,
                                                        torch.tensor(offsets, dtype=index_dtype, device=DEV), None,
                                                        "sum", None, "raise", False)


@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_scale_raises_like_reference(bits):
    """A gathered quantized row (index clamped; padding and skipped rows too) with a non-finite scale
    or bias raises the reference's ValueError, after the offsets and index errors."""
    packed = quantize_rowwise(torch.randn(6, 8, device=DEV), bits)
    tail = packed[:, 8:] if bits == 8 else packed[:, 4:]
    row = tail[3].clone().view(torch.float32 if bits == 8 else torch.float16)
    row[1] = float("inf")  # the bias
    tail[3] = row.view(torch.uint8)
    packed[5] = packed[3]
    off = torch.tensor([0, 1, 3], device=DEV)
    for bounds, idx, pad in [("raise", [0, 3, 1], None), ("raise", [0, 3, 1], 3), ("zero", [0, 3, 1], None),
                             ("zero", [0, 60, 1], 4), ("clamp", [0, 9, 1], None)]:
        indices = torch.tensor(idx, device=DEV)
        kw = dict(bits=bits, bounds=bounds, padding_idx=pad)
        with pytest.raises(ValueError, match="non-finite"):
            run(packed.cpu(), indices.cpu(), off.cpu(), "reference", **kw)
        with pytest.raises(ValueError, match="non-finite"):
            run(packed, indices, off, "cuda", **kw)
    with pytest.raises(IndexError, match="index 9"):  # the index error comes first
        run(packed, torch.tensor([0, 9, 3], device=DEV), off, "cuda", bits=bits)
    indices = torch.tensor([0, 2, 1], device=DEV)  # the bad rows unused: fine
    torch.testing.assert_close(run(packed, indices, off, "cuda", bits=bits),
                               run(packed, indices, off, "reference", bits=bits))


def test_64bit_offsets_raise():
    weight = torch.randn(3, 2, device=DEV)
    with pytest.raises(ValueError, match=str(2 ** 33)):
        run(weight, torch.tensor([0, 1], device=DEV), torch.tensor([0, 2 ** 33], device=DEV), "cuda")


def test_empty_tables_and_batches():
    empty = torch.randn(0, 4, device=DEV)
    idx, off = torch.tensor([0, 5], device=DEV), torch.tensor([0, 1, 2], device=DEV)
    assert torch.equal(run(empty, idx, off, "cuda", bounds="zero").cpu(), torch.zeros(2, 4))
    with pytest.raises(IndexError, match="empty table"):
        run(empty, idx, off, "cuda", bounds="clamp")
    with pytest.raises(IndexError, match="index 0 is out of range for a table of 0 rows"):
        run(empty, idx, off, "cuda")
    weight = torch.randn(5, 4, device=DEV)
    none = torch.zeros(0, dtype=torch.long, device=DEV)
    assert run(weight, none, torch.zeros(1, dtype=torch.long, device=DEV), "cuda").shape == (0, 4)
    with pytest.raises(ValueError, match=r"offsets\[-1\]"):  # B = 0 with indices left over
        run(weight, idx, torch.zeros(1, dtype=torch.long, device=DEV), "cuda")


# ----------------------------------------------------------------------------- backward
def grads(backend, weight, indices, offsets, psw, mode, padding_idx, bounds, sparse, *, in_float64=False):
    """The weight (and per-sample-weight) gradients, sparse ones made dense. in_float64: the same
    gradients computed in float64 from the same (already rounded) inputs and output gradient: a
    reference whose sums of thousands of terms do not depend on the summation order."""
    g_out = torch.randn(offsets.numel() - 1, weight.shape[1], generator=torch.Generator().manual_seed(0))
    g_out = g_out.to(weight.dtype)
    if in_float64:
        weight, psw, g_out = weight.double(), None if psw is None else psw.double(), g_out.double()
    w = weight.clone().requires_grad_()
    p = None if psw is None else psw.clone().requires_grad_()
    out = embedding_bag(w, indices, offsets, per_sample_weights=p, mode=mode, padding_idx=padding_idx, bounds=bounds,
                        sparse=sparse, backend=backend)
    gs = torch.autograd.grad(out, [w] if p is None else [w, p], g_out.to(out))
    assert all(g.dtype == weight.dtype for g in gs)
    # a sparse gradient holds one row per index: summed in float64, so that the sum is exact
    return [g.double().to_dense() if g.is_sparse else g for g in gs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("bounds,padding_idx", [("raise", None), ("zero", 2), ("clamp", 0)])
def test_backward_matches_reference(dtype, mode, weighted, sparse, bounds, padding_idx):
    n_rows, d = 2000, 72
    weight = torch.randn(n_rows, d, device=DEV).to(dtype)
    indices, offsets = bags(600, 30, n_rows, skew=5000)  # row 0 is hot: thousands of contributions
    if bounds != "raise":
        indices[::7] += n_rows  # out of range
    psw = torch.rand(indices.numel(), device=DEV).to(dtype) if weighted else None
    args = (weight, indices, offsets, psw, mode, padding_idx, bounds, sparse)
    ours, ref = grads("cuda", *args), grads("reference", *args, in_float64=True)
    # hot rows sum thousands of terms: float32 rounding of such sums reaches ~1e-4 in any order
    rtol, atol = {torch.float32: (1e-5, 1e-3), torch.float64: (1e-12, 1e-11), torch.float16: (2.0 ** -9, 2.0 ** -5)}[dtype]
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


def test_dense_backward_is_deterministic():
    weight = torch.randn(50, 128, device=DEV)
    indices, offsets = bags(4000, 50, 50)  # 50 rows: every row gets thousands of contributions
    psw = torch.rand(indices.numel(), device=DEV)
    first = grads("cuda", weight, indices, offsets, psw, "sum", None, "raise", False)
    for _ in range(3):
        again = grads("cuda", weight, indices, offsets, psw, "sum", None, "raise", False)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_backward_max_ties_go_to_first_index():
    base = torch.randn(8, 3, device=DEV)
    base[5] = base[6] = base.abs().max() + 1
    indices, offsets = torch.tensor([2, 6, 5, 6, 1, 5], device=DEV), torch.tensor([0, 4, 6], device=DEV)
    w = base.clone().requires_grad_()
    embedding_bag(w, indices, offsets, mode="max", backend="cuda").sum().backward()
    expected = torch.zeros(8, 3)
    expected[6] = 1
    expected[5] = 1
    torch.testing.assert_close(w.grad.cpu(), expected)
