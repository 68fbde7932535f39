"""embedding_bag's Triton backend (recsys_kernels::embedding_bag_triton) against the reference:
what tests/test_embedding_bag.py's backend matrix does not cover (quantized tables under every
bounds policy, D up to 256, a skewed bag of 10,000 indices, non-finite scales, the value checks
made before the launch, the Triton backward op, compile, opcheck of the triton ops). Runs on CUDA tensors, and on CPU
tensors under TRITON_INTERPRET=1 (set by conftest.py without a GPU): shapes are kept small."""
import pytest
import torch

from helpers import run_sm90_compile
from recsys_kernels import _backend
from recsys_kernels.ops import embedding_triton  # noqa: F401 - registers the triton backend
from recsys_kernels.ops.embedding import embedding_bag
from recsys_kernels.ops.rowwise import quantize_rowwise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in _backend.available_backends("embedding_bag", DEVICE),
    reason=f"the triton backend cannot run on {DEVICE}: {_backend.availability('embedding_bag')['triton']}")
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12), torch.float16: (1e-3, 1e-3),
       torch.bfloat16: (8e-3, 8e-3)}


def bags(n_bags, max_len=4, n_rows=11, lo=0, hi=None, gen=None):
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=gen)
    if n_bags > 1:
        lengths[1] = 0  # always an empty bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(lo, n_rows if hi is None else hi, (int(offsets[-1]),), generator=gen)
    return indices, offsets


def both(weight, indices, offsets, **kw):
    """(triton, reference) results for the same call; the inputs move to DEVICE for triton."""
    mv = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    psw = kw.pop("per_sample_weights", None)
    got = embedding_bag(mv(weight), mv(indices), mv(offsets), per_sample_weights=mv(psw), backend="triton", **kw)
    ref = embedding_bag(weight, indices, offsets, per_sample_weights=psw, backend="reference", **kw)
    return got.cpu(), ref


def assert_matches(got, ref, tol_dtype=None):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    rtol, atol = TOL[tol_dtype or ref.dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_float_tables_all_policies(mode, weighted, dtype):
    n, d = 11, 5
    weight = torch.randn(n, d).to(dtype)
    for index_dtype in (torch.int32, torch.int64):
        for bounds in ("raise", "zero", "clamp"):
            lo, hi = (0, n) if bounds == "raise" else (-3, n + 3)
            indices, offsets = bags(7, n_rows=n, lo=lo, hi=hi)
            indices[0] = 3
            psw = torch.randn(indices.numel()).to(dtype) if weighted else None
            for padding_idx in (None, 3):
                got, ref = both(weight, indices.to(index_dtype), offsets.to(index_dtype), per_sample_weights=psw,
                                mode=mode, padding_idx=padding_idx, bounds=bounds)
                assert_matches(got, ref)


@pytest.mark.parametrize("bits,d", [(8, 1), (8, 3), (8, 8), (8, 129), (4, 2), (4, 8), (4, 130)])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_quantized_tables_all_policies(bits, d, mode):
    n = 9
    packed = quantize_rowwise(torch.randn(n, d) * torch.rand(n, 1) * 4, bits)
    for bounds, padding_idx, index_dtype, out_dtype in [("raise", None, torch.int64, None),
                                                        ("zero", 4, torch.int32, torch.float16),
                                                        ("clamp", 0, torch.int64, torch.bfloat16)]:
        lo, hi = (0, n) if bounds == "raise" else (-2, n + 2)
        indices, offsets = bags(6, n_rows=n, lo=lo, hi=hi)
        psw = torch.rand(indices.numel()) if mode == "sum" else None
        got, ref = both(packed, indices.to(index_dtype), offsets.to(index_dtype), per_sample_weights=psw, bits=bits,
                        mode=mode, padding_idx=padding_idx, bounds=bounds, output_dtype=out_dtype)
        assert got.dtype == (out_dtype or torch.float32)
        assert_matches(got, ref, tol_dtype=out_dtype or torch.float32)


@pytest.mark.parametrize("d", [1, 3, 8, 64, 129, 256])
def test_dims(d):
    weight = torch.randn(13, d)
    indices, offsets = bags(6, max_len=6, n_rows=13)
    psw = torch.rand(indices.numel())
    for mode in ("sum", "mean", "max"):
        got, ref = both(weight, indices, offsets, mode=mode, per_sample_weights=psw if mode == "sum" else None)
        assert_matches(got, ref)
    got, ref = both(weight.half(), indices, offsets, output_dtype=torch.float32)
    assert_matches(got, ref)


def test_skewed_bag_of_10000_indices():
    weight = torch.randn(50, 16)
    lengths = torch.tensor([10_000, 0, 3, 1, 37])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(0, 50, (int(offsets[-1]),))
    psw = torch.rand(indices.numel())
    for mode in ("sum", "mean", "max"):
        got, ref = both(weight, indices, offsets, mode=mode, per_sample_weights=psw if mode == "sum" else None,
                        padding_idx=7)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)  # 10^4-term fp32 sums, another order
    packed = quantize_rowwise(weight, 4)
    got, ref = both(packed, indices.int(), offsets.int(), bits=4, mode="mean")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_at_the_op():
    # the op itself (not the front door) takes int32 indices with int64 offsets and weights of
    # another float dtype than the table
    op = torch.ops.recsys_kernels.embedding_bag_triton.default
    ref = torch.ops.recsys_kernels.embedding_bag_reference.default
    weight = torch.randn(8, 6)
    indices, offsets = bags(5, n_rows=8)
    psw = torch.rand(indices.numel(), dtype=torch.float64)
    args = (indices.int(), offsets, psw, "sum", 2, "raise", 8, torch.float64, False)
    got = op(weight.to(DEVICE), *[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]).cpu()
    torch.testing.assert_close(got, ref(weight, *args), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_empty_inputs(mode):
    weight = torch.randn(5, 3, device=DEVICE)
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert embedding_bag(weight, none, torch.zeros(1, dtype=torch.long, device=DEVICE), mode=mode,
                         backend="triton").shape == (0, 3)  # B = 0
    out = embedding_bag(weight, none, torch.zeros(5, dtype=torch.long, device=DEVICE), mode=mode, backend="triton")
    assert torch.equal(out.cpu(), torch.zeros(4, 3))  # nnz = 0
    out = embedding_bag(weight, torch.tensor([1, 1, 7, -1], device=DEVICE), torch.tensor([0, 2, 4], device=DEVICE),
                        mode=mode, padding_idx=1, bounds="zero", backend="triton")
    assert torch.equal(out.cpu(), torch.zeros(2, 3))  # only padding / out-of-range: empty bags
    out = embedding_bag(-weight.abs() - 1, torch.tensor([0, 2], device=DEVICE), torch.tensor([0, 2], device=DEVICE),
                        mode=mode, backend="triton")
    assert (out < 0).all()  # max of negative rows is not clipped at the empty-bag 0
    # an empty table: only bounds="zero" can look anything up in it
    empty = torch.randn(0, 3, device=DEVICE)
    out = embedding_bag(empty, torch.tensor([0, 4], device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE),
                        mode=mode, bounds="zero", backend="triton")
    assert torch.equal(out.cpu(), torch.zeros(2, 3))
    with pytest.raises(IndexError, match="empty table"):
        embedding_bag(empty, torch.tensor([0], device=DEVICE), torch.tensor([0, 1], device=DEVICE), mode=mode,
                      bounds="clamp", backend="triton")
    assert embedding_bag(torch.randn(5, 0, device=DEVICE), torch.tensor([0], device=DEVICE),
                         torch.tensor([0, 1], device=DEVICE), mode=mode, backend="triton").shape == (1, 0)


def test_skipped_rows_are_masked_not_multiplied():
    weight = torch.randn(4, 3)
    weight[2] = float("inf")
    indices, offsets = torch.tensor([0, 2, 1, 2]), torch.tensor([0, 2, 4])
    for mode in ("sum", "mean", "max"):
        got, ref = both(weight, indices, offsets, mode=mode, padding_idx=2)
        assert torch.isfinite(got).all()
        assert_matches(got, ref)


def test_bf16_results_round_to_nearest_even():
    """bf16 outputs and gradients have the reference's bits at rounding boundaries: under the
    interpreter a plain fp32 -> bf16 cast truncates (a GPU's rounds), so the kernels round on the
    bits (kernels/rounding.py); 265.5 and 263.0 are ties, 1.005859375 rounds up."""
    from recsys_kernels.ops.embedding_grouped import embedding_bag_grouped

    values = torch.tensor([[265.5], [263.0], [1.005859375], [-3.0078125]], device=DEVICE)
    idx, off = torch.arange(4, device=DEVICE), torch.arange(5, device=DEVICE)
    for backend in ("reference", "triton"):
        got = (embedding_bag(values, idx, off, output_dtype=torch.bfloat16, backend=backend),
               embedding_bag_grouped([values], [idx], [off], output_dtype=torch.bfloat16, backend=backend))
        if backend == "reference":
            expected = got
        else:
            for g, e in zip(got, expected):
                assert torch.equal(g.cpu(), e.cpu())
    grads = []
    for backend in ("reference", "triton"):
        for sparse in (False, True):
            w = torch.ones(4, 1, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
            embedding_bag(w, idx, off, output_dtype=torch.float32, sparse=sparse, backend=backend).backward(values)
            grads.append(w.grad.to_dense().cpu())
    assert all(torch.equal(g, grads[0]) for g in grads) and grads[0][2, 0] == 1.0078125


@pytest.mark.parametrize("bits,dim,align", [(8, 64, 8), (8, 4, 4), (8, 6, 2), (8, 5, 1), (8, 264, 8),
                                            (4, 8, 8), (4, 64, 4), (4, 4, 2), (4, 6, 1), (4, 264, 8)])
def test_packed_rows_read_several_bytes_at_once_where_aligned(bits, dim, align):
    """The forward reads a packed table several bytes at a time where every row starts on a
    multiple of ROW_ALIGN bytes (the address and the row stride, D + 8 or D / 2 + 4 bytes); the
    same rows at an odd address (a view one byte into a buffer) are read byte by byte. Both give
    the same bits, and the reference's values, for each mode, with an index range that has
    padding and out-of-range indices; D = 264 spans two column blocks (BLOCK_D <= 256)."""
    g = torch.Generator().manual_seed(dim * bits)
    table = quantize_rowwise(torch.randn(40, dim, generator=g) * 2, bits).to(DEVICE)
    buffer = torch.empty(table.numel() + 1, dtype=torch.uint8, device=DEVICE)
    odd = buffer[1:].view(table.shape)
    odd.copy_(table)
    assert embedding_triton.row_alignment(table) == align and embedding_triton.row_alignment(odd) == 1
    indices, offsets = bags(9, max_len=7, n_rows=40, lo=-2, hi=42, gen=g)
    indices, offsets = indices.to(DEVICE), offsets.to(DEVICE)
    for mode in ("sum", "mean", "max"):
        kw = dict(mode=mode, bits=bits, bounds="zero", padding_idx=5)
        got = embedding_bag(table, indices, offsets, backend="triton", **kw)
        assert torch.equal(got, embedding_bag(odd, indices, offsets, backend="triton", **kw)), mode
        ref = embedding_bag(table.cpu(), indices.cpu(), offsets.cpu(), backend="reference", **kw)
        assert_matches(got.cpu(), ref)


def test_dequantized_values_means_and_fp64_casts_have_the_reference_bits():
    """Where the reference's result is exact arithmetic plus its roundings, the Triton backend gives
    its bits: a max over int8 / int4 rows (each output one dequantized code * scale + bias, two
    roundings: on a GPU Triton contracted them into one fma), a mean of bags whose sums are exact
    (a GPU's fp32 `/` is div.full.f32, 2 ulp; inexact sums would depend on the order of the
    reference's index_add_, atomics on a GPU), an fp64 table's one-row bags cast to fp16 / bf16
    (torch casts through fp32, a GPU's cvt rounds once; the interpreter's fp64 -> bf16 cast gave
    garbage). Checked in the compiled PTX for sm_90 as well (docs/design.md)."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50, (60,), generator=g).to(DEVICE)
    off = torch.arange(0, 61, 3).to(DEVICE)
    for bits in (8, 4):
        packed = quantize_rowwise(torch.randn(50, 64, generator=g) * 3, bits).to(DEVICE)
        got, ref = (embedding_bag(packed, idx, off, mode="max", bits=bits, backend=b) for b in ("triton", "reference"))
        assert torch.equal(got.cpu(), ref.cpu()), bits
    ints = torch.randint(-50, 50, (50, 33), generator=g).float().to(DEVICE)  # exact sums
    got, ref = (embedding_bag(ints, idx, off, mode="mean", backend=b) for b in ("triton", "reference"))
    assert torch.equal(got.cpu(), ref.cpu())
    near_ties = torch.tensor([[1 + 2 ** -11 + 2 ** -40], [1 + 2 ** -8 + 2 ** -30], [3.14159], [-2.5e-3]],
                             dtype=torch.float64, device=DEVICE)
    one_each = torch.arange(4, device=DEVICE)
    for out_dtype in (torch.float16, torch.bfloat16):
        got, ref = (embedding_bag(near_ties, one_each, torch.arange(5, device=DEVICE), output_dtype=out_dtype,
                                  backend=b) for b in ("triton", "reference"))
        assert torch.equal(got.cpu(), ref.cpu()), out_dtype


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    # Triton launches on the current device: the ops enter the tensors' (_common.cuda_device_of)
    weight = torch.randn(30, 16, device="cuda:1")
    idx, off = torch.randint(0, 30, (40,), device="cuda:1"), torch.arange(0, 41, 4, device="cuda:1")
    with torch.cuda.device(0):
        got = embedding_bag(weight, idx, off, backend="triton")
        torch.cuda.synchronize(1)
    torch.testing.assert_close(got, embedding_bag(weight, idx, off, backend="reference"), rtol=1e-5, atol=1e-5)


def test_max_ties_and_infinities():
    weight = torch.tensor([[1.0, -float("inf")], [1.0, 2.0], [float("inf"), -float("inf")]])
    got, ref = both(weight, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 2, 3, 4]), mode="max")
    assert torch.equal(got, ref)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_bounds(index_dtype):
    weight = torch.randn(5, 3, device=DEVICE)
    off = torch.tensor([0, 1, 2], dtype=index_dtype, device=DEVICE)
    ok = embedding_bag(weight, torch.tensor([4, 0], dtype=index_dtype, device=DEVICE), off, backend="triton")
    torch.testing.assert_close(ok, weight[[4, 0]])
    for bad in (5, -1, 2 ** 31 - 1 if index_dtype == torch.int32 else 2 ** 40):
        idx = torch.tensor([0, bad], dtype=index_dtype, device=DEVICE)
        with pytest.raises(IndexError) as theirs:
            embedding_bag(weight.cpu(), idx.cpu(), off.cpu(), backend="reference")
        with pytest.raises(IndexError) as ours:
            embedding_bag(weight, idx, off, backend="triton")
        assert str(ours.value) == str(theirs.value) and f"index {bad} " in str(ours.value)
        zero = embedding_bag(weight, idx, off, bounds="zero", backend="triton")
        torch.testing.assert_close(zero, torch.stack([weight[0], torch.zeros(3, device=DEVICE)]))
        clamp = embedding_bag(weight, idx, off, bounds="clamp", backend="triton")
        torch.testing.assert_close(clamp, weight[[0, 4 if bad > 0 else 0]])


@pytest.mark.parametrize("offsets", [[1, 2, 4], [0, 3, 2, 4], [0, 2, 5], [0, 2, 3], [0, 2 ** 33]])
def test_bad_offsets_same_error_as_reference(offsets):
    weight, idx = torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    off = torch.tensor(offsets)
    with pytest.raises(ValueError) as theirs:
        embedding_bag(weight, idx, off, backend="reference")
    with pytest.raises(ValueError) as ours:
        embedding_bag(weight.to(DEVICE), idx.to(DEVICE), off.to(DEVICE), backend="triton")
    assert str(ours.value) == str(theirs.value)
    # offsets are checked before indices, as in the reference
    with pytest.raises(ValueError):
        embedding_bag(weight.to(DEVICE), torch.tensor([0, 9, 2, 3], device=DEVICE), off.to(DEVICE), backend="triton")


def test_bad_offsets_at_the_op():
    op = torch.ops.recsys_kernels.embedding_bag_triton.default
    with pytest.raises(ValueError, match="B \\+ 1 >= 1"):
        op(torch.randn(5, 3, device=DEVICE), torch.tensor([0], device=DEVICE),
           torch.zeros(0, dtype=torch.long, device=DEVICE), None, "sum", None, "raise", 8, None, False)


@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_scale_raises_like_reference(bits):
    packed = quantize_rowwise(torch.randn(6, 4), bits)
    tail = packed[:, 4:] if bits == 8 else packed[:, 2:]
    dtype = torch.float32 if bits == 8 else torch.float16
    row = tail[3].clone().view(dtype)
    row[0] = float("nan")
    tail[3] = row.view(torch.uint8)
    idx, off = torch.tensor([0, 3, 1]), torch.tensor([0, 1, 3])
    for bounds, indices in [("raise", idx), ("zero", torch.tensor([0, 3, 1])), ("clamp", torch.tensor([0, 9, 1]))]:
        if bounds == "clamp":
            packed_c = packed.clone()
            packed_c[5] = packed[3]  # index 9 clamps to the bad row 5
        else:
            packed_c = packed
        with pytest.raises(ValueError, match="non-finite"):
            embedding_bag(packed_c, indices, off, bits=bits, bounds=bounds, backend="reference")
        with pytest.raises(ValueError, match="non-finite"):
            embedding_bag(packed_c.to(DEVICE), indices.to(DEVICE), off.to(DEVICE), bits=bits, bounds=bounds,
                          backend="triton")
    got, ref = both(packed, torch.tensor([0, 2, 1]), off, bits=bits)  # the bad row unused: fine
    assert_matches(got, ref)


# ----------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("mode,sparse", [("sum", False), ("sum", True), ("mean", False), ("max", False),
                                         ("max", True)])
def test_grads_through_triton_forward(mode, sparse):
    base = torch.randn(8, 4, dtype=torch.float64)
    indices, offsets = bags(6, max_len=5, n_rows=10, lo=-1, hi=10)
    psw_base = torch.rand(indices.numel(), dtype=torch.float64) if mode == "sum" else None
    grads = []
    for backend, dev in (("triton", DEVICE), ("reference", "cpu")):
        w = base.clone().to(dev).requires_grad_()
        psw = None if psw_base is None else psw_base.clone().to(dev).requires_grad_()
        out = embedding_bag(w, indices.to(dev), offsets.to(dev), per_sample_weights=psw, mode=mode, padding_idx=1,
                            bounds="zero", sparse=sparse, backend=backend)
        g_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=dev).view_as(out)
        gs = torch.autograd.grad(out, [w] if psw is None else [w, psw], g_out)
        assert gs[0].is_sparse == sparse
        grads.append([(g.to_dense() if g.is_sparse else g).cpu() for g in gs])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("mode,sparse", [("sum", False), ("sum", True), ("mean", False), ("mean", True),
                                         ("max", False), ("max", True)])
def test_backward_op_matches_reference(mode, sparse):
    op = torch.ops.recsys_kernels.embedding_bag_backward_triton.default
    ref = torch.ops.recsys_kernels.embedding_bag_backward_reference.default
    n = 8
    for dtype, bounds, d in [(torch.float32, "raise", 5), (torch.float16, "zero", 3), (torch.bfloat16, "clamp", 8),
                             (torch.float64, "zero", 300)]:  # D = 300: two column blocks
        weight = torch.randn(n, d).to(dtype)
        lo, hi = (0, n) if bounds == "raise" else (-2, n + 2)
        indices, offsets = bags(6, max_len=6, n_rows=n, lo=lo, hi=hi)
        indices[:2] = 2  # padding and repeated rows
        psw = torch.rand(indices.numel()).to(dtype) if mode == "sum" else None
        grad_out = torch.randn(6, d).to(dtype)
        args = (grad_out, weight, indices, offsets, psw, mode, 2, bounds, sparse)
        got = op(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
        for g, r in zip(got, ref(*args)):
            assert g.dtype == r.dtype and g.shape == r.shape
            torch.testing.assert_close(g.cpu(), r, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_backward_max_ties_and_empty_table():
    op = torch.ops.recsys_kernels.embedding_bag_backward_triton.default
    ref = torch.ops.recsys_kernels.embedding_bag_backward_reference.default
    weight = torch.randn(8, 3)
    weight[5] = weight[6] = weight.abs().max() + 1  # rows 5 and 6 tie for the max in every column
    weight[4] = -float("inf")  # a bag whose only kept row is -inf still routes its gradient there
    idx, off = torch.tensor([2, 6, 5, 6, 1, 5, 4]), torch.tensor([0, 4, 6, 7])
    for sparse in (False, True):
        args = (torch.randn(3, 3), weight, idx, off, None, "max", None, "raise", sparse)
        for g, r in zip(op(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]), ref(*args)):
            assert torch.equal(g.cpu(), r)
    args = (torch.randn(2, 3), torch.randn(0, 3), torch.tensor([0, 4]), torch.tensor([0, 1, 2]), torch.rand(2),
            "sum", None, "zero", True)
    for g, r in zip(op(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]), ref(*args)):
        assert torch.equal(g.cpu(), r)


def _index_order_sums(grad_rows, indices, n_rows, padding_idx=None, chunk=None):
    """The dense gradient from the per-index rows, one add at a time: per row, its rows in index
    order; with `chunk`, a row's positions cut into chunks of that many from its first one, each
    chunk summed in order, then the chunk sums in order (the Triton and CUDA grouping of hot rows)."""
    grad = torch.zeros(n_rows, grad_rows.shape[1], dtype=grad_rows.dtype)
    for row in range(n_rows):
        if row == padding_idx:
            continue
        positions = torch.nonzero(indices == row).flatten().tolist()
        size = chunk or max(len(positions), 1)
        total = torch.zeros(grad_rows.shape[1], dtype=grad_rows.dtype)
        for c in range(0, len(positions), size):
            part = torch.zeros_like(total)
            for p in positions[c:c + size]:
                part = part + grad_rows[p]
            total = total + part if size < len(positions) else part
        grad[row] = total
    return grad


def _dense_backward_case(mode, weighted, n_rows, d, indices, offsets, padding_idx=None):
    """The arguments of one fp32 dense backward call (CPU tensors)."""
    psw = torch.randn(indices.numel()) if weighted else None
    return (torch.randn(offsets.numel() - 1, d), torch.randn(n_rows, d), indices, offsets, psw, mode, padding_idx,
            "raise", False)


def _triton_runs(args, runs=2):
    op = torch.ops.recsys_kernels.embedding_bag_backward_triton.default
    dev_args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    results = [[g.cpu() for g in op(*dev_args)] for _ in range(runs)]
    for grad, grad_psw in results:  # the same bits on every run
        assert torch.equal(grad, results[0][0]) and torch.equal(grad_psw, results[0][1])
    return results[0]


@pytest.mark.parametrize("mode,weighted,padding_idx,d", [("sum", False, None, 129), ("sum", True, None, 129),
                                                         ("mean", False, 2, 129), ("max", False, None, 129),
                                                         ("sum", True, 1, 300)])
def test_dense_backward_is_deterministic_and_bit_exact(mode, weighted, padding_idx, d):
    # 200 indices over 5 rows: about 40 adds into every row. No float atomics: the same bits on
    # every run, and the reference's (index_add_ on CPU: per row, in index order; every row here
    # has fewer than DENSE_CHUNK positions) and the CPU backend's. D = 300: two column blocks,
    # whose parts of the per-sample-weight gradient are added without atomics either
    gen = torch.Generator().manual_seed(3)
    cuts = torch.randint(0, 201, (19,), generator=gen).sort().values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([200])])
    indices = torch.randint(0, 5, (200,), generator=gen)
    args = _dense_backward_case(mode, weighted, 5, d, indices, offsets, padding_idx)
    grad, grad_psw = _triton_runs(args)
    ref, ref_psw = torch.ops.recsys_kernels.embedding_bag_backward_reference.default(*args)
    assert torch.equal(grad, ref) and grad.abs().sum() > 0
    if weighted:  # a dot product over D: the same terms, summed in another order
        torch.testing.assert_close(grad_psw, ref_psw)
    if "cpu" in _backend.available_backends("embedding_bag_backward", "cpu"):
        assert torch.equal(grad, torch.ops.recsys_kernels.embedding_bag_backward.default(*args)[0])


@pytest.mark.parametrize("mode,weighted,d", [("sum", True, 7), ("mean", False, 7), ("max", False, 5)])
def test_dense_backward_hot_row_is_deterministic(mode, weighted, d):
    # row 3 takes 300 of 340 indices: more than one chunk of DENSE_CHUNK positions, summed chunk
    # by chunk, then the chunk sums in order (the CUDA backend's grouping)
    from recsys_kernels._triton.embedding_bag import DENSE_CHUNK
    gen = torch.Generator().manual_seed(5)
    indices = torch.randint(0, 9, (340,), generator=gen)
    indices[torch.randperm(340, generator=gen)[:300]] = 3
    offsets = torch.tensor([0, 100, 100, 250, 339, 340])
    args = _dense_backward_case(mode, weighted, 9, d, indices, offsets)
    grad, grad_psw = _triton_runs(args)
    ref = torch.ops.recsys_kernels.embedding_bag_backward_reference.default
    (ref_grad, ref_psw), ref_rows = ref(*args), ref(*args[:-1], True)[0]
    assert torch.equal(grad, _index_order_sums(ref_rows, indices, 9, chunk=DENSE_CHUNK))
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    if weighted:
        torch.testing.assert_close(grad_psw, ref_psw)


def test_index_order_sums_helper():
    # the helper reproduces index_add_ without chunks, and chunking changes the rounding
    rows = torch.randn(600, 3)
    indices = torch.zeros(600, dtype=torch.long)
    indices[::7] = 1
    want = torch.zeros(2, 3).index_add_(0, indices, rows)
    assert torch.equal(_index_order_sums(rows, indices, 2), want)
    assert not torch.equal(_index_order_sums(rows, indices, 2, chunk=128), want)


def test_gradcheck():
    weight = torch.randn(6, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    psw = torch.randn(7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    idx = torch.tensor([0, 5, 2, 2, 7, 1, 3], device=DEVICE)
    off = torch.tensor([0, 3, 3, 7], device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda w, p: embedding_bag(w, idx, off, per_sample_weights=p, bounds="clamp", padding_idx=1,
                                   backend="triton"), (weight, psw))


# ----------------------------------------------------------------------------- opcheck / compile
def _opcheck_cases():
    idx, off = torch.tensor([0, 3, 3, 1, 4], device=DEVICE), torch.tensor([0, 2, 2, 5], device=DEVICE)
    packed = quantize_rowwise(torch.randn(5, 8), 4).to(DEVICE)
    return [
        (torch.randn(5, 4, device=DEVICE, requires_grad=True), idx, off, None, "mean", None, "raise", 8, None, False),
        (torch.randn(5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True), idx.int(), off.int(),
         torch.rand(5, dtype=torch.float64, device=DEVICE, requires_grad=True), "sum", 3, "raise", 8, torch.float32,
         False),
        (torch.randn(5, 4, device=DEVICE, requires_grad=True), idx, off, None, "max", None, "clamp", 8, None, False),
        (packed, idx, off, None, "sum", None, "zero", 4, torch.float16, False),
        (torch.randn(5, 4, device=DEVICE), idx[:0], torch.zeros(1, dtype=torch.long, device=DEVICE), None, "max",
         None, "raise", 8, None, False),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    torch.library.opcheck(torch.ops.recsys_kernels.embedding_bag_triton.default, _opcheck_cases()[case])


@pytest.mark.parametrize("mode,sparse,weighted", [("sum", False, True), ("mean", True, False),
                                                  ("max", False, False)])
def test_opcheck_backward(mode, sparse, weighted):
    idx, off = torch.tensor([0, 3, 3, 1, 4], device=DEVICE), torch.tensor([0, 2, 2, 5], device=DEVICE)
    psw = torch.rand(5, device=DEVICE) if weighted else None
    args = (torch.randn(3, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE), idx, off, psw, mode, 1, "raise",
            sparse)
    torch.library.opcheck(torch.ops.recsys_kernels.embedding_bag_backward_triton.default, args)


def test_opcheck_check_op():
    idx, off = torch.tensor([0, 3, 3, 1, 4], device=DEVICE), torch.tensor([0, 2, 2, 5], device=DEVICE)
    torch.library.opcheck(torch.ops.recsys_kernels.embedding_bag_triton_check.default,
                          (torch.randn(5, 4, device=DEVICE), idx, off, "raise", 8))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    weight = torch.randn(9, 5, device=DEVICE)
    idx, off = bags(4, n_rows=9)
    idx, off = idx.to(DEVICE), off.to(DEVICE)
    lengths = off[1:] - off[:-1]
    packed = quantize_rowwise(weight.cpu()).to(DEVICE)
    psw = torch.rand(idx.numel(), device=DEVICE)

    @torch.compile(fullgraph=True, backend=compile_backend)
    def f(w, q, idx, off, lengths, psw):
        a = embedding_bag(w, idx, off, per_sample_weights=psw, padding_idx=-1, backend="triton")
        b = embedding_bag(w, idx, lengths=lengths, mode="max", bounds="clamp", backend="triton")
        c = embedding_bag(q, idx, off, mode="mean", backend="triton")
        return a, b, c

    a, b, c = f(weight, packed, idx, off, lengths, psw)
    torch.testing.assert_close(a, embedding_bag(weight, idx, off, per_sample_weights=psw, padding_idx=8,
                                                backend="reference"))
    torch.testing.assert_close(b, embedding_bag(weight, idx, off, mode="max", backend="reference"))
    torch.testing.assert_close(c, embedding_bag(packed, idx, off, mode="mean", backend="reference"))
    bad = idx.clone()
    bad[0] = 9
    with pytest.raises(IndexError, match="index 9 "):  # the value checks survive compilation
        f(weight, packed, bad, off, lengths, psw)


def test_compile_backward():
    torch._dynamo.reset()
    weight = torch.randn(9, 5, device=DEVICE, requires_grad=True)
    idx, off = bags(4, n_rows=9)
    idx, off = idx.to(DEVICE), off.to(DEVICE)
    f = torch.compile(lambda w: embedding_bag(w, idx, off, mode="mean", backend="triton").square().sum(),
                      fullgraph=True, backend="aot_eager")
    g, = torch.autograd.grad(f(weight), weight)
    g_ref, = torch.autograd.grad(embedding_bag(weight, idx, off, mode="mean", backend="reference").square().sum(),
                                 weight)
    torch.testing.assert_close(g, g_ref)


# ----------------------------------------------------------------------------- GPU code
_SM90_FORWARD = r'''
import collections
from recsys_kernels._triton import embedding_bag as k

D = 128  # issue 3's shape: rows of 512 (fp32), 136 (int8) or 68 (int4) bytes
for bits, align in ((0, 1), (8, 8), (8, 1), (4, 4), (4, 1)):
    cfg = k.launch_config(D, True)
    warps = cfg.pop("num_warps")
    sig = dict(W="*u8" if bits else "*fp32", IDX="*i64", OFF="*i64", PSW="*fp32", OUT="*fp32", TOKEN="*fp32",
               n_rows="i32", row_stride="i32", D="i32", pad="i32")
    consts = dict(MODE=0, BOUNDS=0, HAS_PAD=False, HAS_PSW=False, BITS=bits, ROW_ALIGN=align, ACC64=False,
                  GPU_RN=True, **cfg)
    stride = {0: D, 8: D + 8, 4: D // 2 + 4}[bits]
    ptx, sass = build(k._embedding_bag_fwd_kernel, {**sig, **{n: "constexpr" for n in consts}}, consts, warps,
                      ["W", "IDX", "OFF", "PSW", "OUT", "TOKEN", "n_rows", "D"] + (["row_stride"] if stride % 16 == 0 else []))
    loads = collections.Counter(re.findall(r"\bLDG\.E[.A-Z0-9]*", sass))
    print(bits, align, dict(loads), "mul.rn", ptx.count("mul.rn.f32"), "fma.rn", ptx.count("fma.rn.f32"))
    assert sass.count("STL") == 0, "register spill stores"
    if bits:  # the dequantization's product rounded on its own, never contracted with the bias add
        assert ptx.count("mul.rn.f32") > 0 and ptx.count("fma.rn.f32") == 0
    if bits and align > 1:  # rows read several bytes at a time: no byte loads, a dozen loads a step
        assert loads["LDG.E.U8"] == 0 and sum(loads.values()) <= 12, loads
    elif bits:  # (byte by byte: 144 loads for int8, 80 for int4, with Triton 3.8)
        assert loads["LDG.E.U8"] > 0, loads
print("ok")
'''


def test_forward_compiles_for_sm90_with_wide_loads(tmp_path):
    """The forward kernel as a GPU launch at D = 128 compiles it: no register spills; packed rows
    read several bytes a load where aligned (2026-11-30: int8 144 byte loads per step -> 4 word
    loads, int4 80 -> 2 + 4 halves; fp32 rows 4 16-byte loads); the dequantization's mul.rn kept."""
    out = run_sm90_compile(_SM90_FORWARD, tmp_path)
    print(out)
