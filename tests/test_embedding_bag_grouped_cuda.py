"""embedding_bag_grouped on its CUDA C++ kernel (csrc/embedding_bag/embedding_bag_grouped_cuda.cu),
called directly as torch.ops.recsys_kernels.embedding_bag_grouped.default, against the per-lookup
loop of embedding_bag(..., backend="reference", output_dtype=float32) concatenated and cast:
mixed table formats (fp32 / fp16 / bf16 / int8 / int4, vectorised and scalar readers), modes,
int32 / int64 indices, per-sample weights, padding rows, empty bags, B = 0, empty tables, many
lookups, and the value errors (the first bad lookup raises the single-table CUDA op's error).
Every test needs a GPU; the module is skipped without one, and before the op has a schema."""
import re

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import recsys_kernels  # noqa: E402,F401 - loads the extensions (schemas, CUDA kernels)
from recsys_kernels.ops.embedding import embedding_bag  # noqa: E402
from recsys_kernels.ops.rowwise import quantize_rowwise  # noqa: E402

if not hasattr(torch.ops.recsys_kernels, "embedding_bag_grouped"):
    pytest.skip("recsys_kernels::embedding_bag_grouped has no schema yet", allow_module_level=True)
if not torch._C._dispatch_has_kernel_for_dispatch_key("recsys_kernels::embedding_bag_grouped", "CUDA"):
    pytest.skip("embedding_bag_grouped has no CUDA kernel (recsys_kernels._C_cuda not built)",
                allow_module_level=True)

DEV = "cuda"
OP = torch.ops.recsys_kernels.embedding_bag_grouped.default
SINGLE = torch.ops.recsys_kernels.embedding_bag.default
TOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


class Lookup:
    """One lookup of a grouped call: the op's per-lookup arguments."""

    def __init__(self, weight, indices, offsets, psw=None, mode="sum", padding_idx=-1, bits=8):
        self.weight, self.indices, self.offsets, self.psw = weight, indices, offsets, psw
        self.mode, self.padding_idx, self.bits = mode, padding_idx, bits

    def reference(self, bounds):
        pad = None if self.padding_idx < 0 else self.padding_idx
        return embedding_bag(self.weight, self.indices, self.offsets, per_sample_weights=self.psw, mode=self.mode,
                             padding_idx=pad, bounds=bounds, bits=self.bits, output_dtype=torch.float32,
                             backend="reference")

    def single_op(self, bounds):
        """The single-table CUDA op, as the grouped op must behave for this lookup."""
        pad = None if self.padding_idx < 0 else self.padding_idx
        return SINGLE(self.weight, self.indices, self.offsets, self.psw, self.mode, pad, bounds, self.bits,
                      torch.float32, False)


def grouped_args(lookups, bounds, output_dtype):
    return ([lk.weight for lk in lookups], [lk.indices for lk in lookups], [lk.offsets for lk in lookups],
            [lk.psw for lk in lookups], [lk.mode for lk in lookups], [lk.padding_idx for lk in lookups],
            [lk.bits for lk in lookups], [False] * len(lookups), bounds, output_dtype)


def run_grouped(lookups, bounds="raise", output_dtype=torch.float32):
    """The op's output, with the memory it is likely to reuse poisoned with NaN first (the caching
    allocator hands a freed block of the same size back), so unwritten elements show."""
    n_bags = lookups[0].offsets.numel() - 1
    total_d = sum(lk_dim(lk) for lk in lookups)
    poison = torch.full((n_bags, total_d), float("nan"), dtype=output_dtype, device=DEV)
    del poison
    return OP(*grouped_args(lookups, bounds, output_dtype))


def lk_dim(lk):
    w = lk.weight
    if w.dtype != torch.uint8:
        return w.shape[1]
    return w.shape[1] - 8 if lk.bits == 8 else 2 * (w.shape[1] - 4)


def expected(lookups, bounds="raise", output_dtype=torch.float32):
    return torch.cat([lk.reference(bounds) for lk in lookups], dim=1).to(output_dtype)


def check(got, exp):
    assert got.dtype == exp.dtype and got.shape == exp.shape
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or NaN output elements"
    tol = TOL[exp.dtype]
    torch.testing.assert_close(got.double(), exp.double(), rtol=tol, atol=tol)


def bags(n_bags, max_len, n_rows, index_dtype=torch.long):
    """Random CSR bags with some empty ones (bag 1 always)."""
    lengths = torch.randint(0, max_len + 1, (n_bags,))
    if n_bags > 1:
        lengths[1] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(0, max(n_rows, 1), (int(offsets[-1]),))
    return indices.to(index_dtype).to(DEV), offsets.to(index_dtype).to(DEV)


def misaligned(t):
    """A contiguous copy of t whose data pointer is one element off 16-byte alignment."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def table(fmt, n_rows, d):
    """(weight, bits) of a random table: fmt one of f32, f16, bf16, q8, q4."""
    w = torch.randn(n_rows, d, device=DEV) * (torch.rand(n_rows, 1, device=DEV) * 4)
    if fmt == "q8":
        return quantize_rowwise(w, 8), 8
    if fmt == "q4":
        return quantize_rowwise(w, 4), 4
    return w.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[fmt]), 8


def make_lookup(fmt, d, n_bags, *, n_rows=500, max_len=12, mode="sum", weighted=False, padding_idx=-1,
                index_dtype=torch.long, bounds="raise"):
    weight, bits = table(fmt, n_rows, d)
    indices, offsets = bags(n_bags, max_len, n_rows, index_dtype)
    if bounds != "raise" and indices.numel() > 0:  # every 5th index out of range, on both sides
        n = indices[::5].numel()
        bad = torch.tensor([-3, n_rows, n_rows + 7, -1], device=DEV).repeat((n + 3) // 4)[:n]
        indices[::5] = bad.to(indices.dtype)
    psw = torch.rand(indices.numel(), device=DEV) if weighted else None
    return Lookup(weight, indices, offsets, psw, mode, padding_idx, bits)


# (format, D, mode, per-sample weights, padding row, index dtype): vectorised and scalar readers of
# every format (D % VEC != 0 takes the scalar one), D above one warp's width (column chunks), D = 0.
MIXED = [
    ("f32", 64, "sum", True, -1, torch.int32),
    ("f16", 60, "mean", False, 3, torch.int64),
    ("bf16", 128, "max", False, -1, torch.int32),
    ("q8", 64, "sum", False, 7, torch.int64),
    ("q4", 30, "mean", False, -1, torch.int32),
    ("q8", 3, "max", False, -1, torch.int64),
    ("f32", 129, "sum", False, 0, torch.int64),
    ("q4", 128, "sum", True, -1, torch.int64),
    ("f16", 200, "max", False, -1, torch.int32),
    ("bf16", 7, "sum", True, 499, torch.int64),
    ("f32", 0, "mean", False, -1, torch.int32),
    ("f32", 1000, "mean", False, -1, torch.int32),
]


def mixed_lookups(n_bags, bounds="raise"):
    return [make_lookup(fmt, d, n_bags, mode=mode, weighted=w, padding_idx=pad, index_dtype=it, bounds=bounds)
            for fmt, d, mode, w, pad, it in MIXED]


# ----------------------------------------------------------------------------- forward vs reference
@pytest.mark.parametrize("output_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bounds", ["raise", "zero", "clamp"])
@pytest.mark.parametrize("n_bags", [1, 37, 1000])
def test_mixed_lookups_match_reference(output_dtype, bounds, n_bags):
    lookups = mixed_lookups(n_bags, bounds)
    got = run_grouped(lookups, bounds, output_dtype)
    check(got, expected(lookups, bounds, output_dtype))


def test_each_lookup_equals_the_single_table_op():
    """Column block f is bit for bit what the single-table CUDA op returns for lookup f: the same
    per-bag loop, reader and lane layout."""
    lookups = mixed_lookups(300)
    got = run_grouped(lookups)
    col = 0
    for lk, spec in zip(lookups, MIXED):
        d = lk_dim(lk)
        assert torch.equal(got[:, col:col + d], lk.single_op("raise")), f"lookup {spec}"
        col += d


@pytest.mark.parametrize("fmt,d", [("f32", 64), ("f16", 64), ("bf16", 32), ("q8", 64), ("q4", 64)])
def test_misaligned_tables_take_the_scalar_reader(fmt, d):
    lookups = [make_lookup(fmt, d, 200, mode=m) for m in ("sum", "max")]
    lookups[1].weight = misaligned(lookups[1].weight)
    check(run_grouped(lookups), expected(lookups))


@pytest.mark.parametrize("output_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [
    [("q8", 3), ("f16", 64), ("f32", 64), ("q4", 6), ("bf16", 16)],  # odd stride: scalar stores
    [("f32", 4), ("f16", 64), ("f32", 60), ("q8", 64)],  # stride 192, a VEC=8 reader at column 4
])
def test_column_offsets_off_the_store_width(output_dtype, layout):
    """Lookups whose output columns start off their reader's vector width take narrower stores."""
    lookups = [make_lookup(fmt, d, 150) for fmt, d in layout]
    check(run_grouped(lookups, output_dtype=output_dtype), expected(lookups, output_dtype=output_dtype))


def test_many_lookups():
    """F = 120: the metadata array is far past a kernel-parameter buffer."""
    fmts = ["f32", "f16", "bf16", "q8", "q4"]
    lookups = [make_lookup(fmts[f % 5], 8 * (1 + f % 7), 64, n_rows=50 + f, mode=("sum", "mean", "max")[f % 3],
                           index_dtype=(torch.int32, torch.int64)[f % 2]) for f in range(120)]
    check(run_grouped(lookups), expected(lookups))


def test_skewed_bag():
    """One bag of 10,000 indices among short ones (long index loop per warp)."""
    lk = make_lookup("f32", 128, 50, n_rows=5000, max_len=3)
    lengths = (lk.offsets[1:] - lk.offsets[:-1]).cpu()
    lengths[0] = 10_000
    lk.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(DEV)
    lk.indices = torch.randint(0, 5000, (int(lk.offsets[-1]),), device=DEV)
    other = make_lookup("q8", 64, 50, mode="mean")
    got = run_grouped([lk, other])
    # bag 0 against float64: a float32 sum of 10,000 terms is off by ~1e-4 in any summation order
    exact = Lookup(lk.weight.double(), lk.indices, lk.offsets).reference("raise")
    torch.testing.assert_close(got[:, :128], exact.float(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[:, 128:], expected([other]), rtol=1e-5, atol=1e-5)


def test_mixed_index_and_offset_dtypes_in_one_lookup():
    """int32 indices with int64 offsets (a direct call; the front door would promote): int64."""
    lk = make_lookup("f32", 32, 40, index_dtype=torch.int32)
    direct = Lookup(lk.weight, lk.indices, lk.offsets.long())
    check(run_grouped([direct]), expected([lk]))


def test_zero_bags():
    lookups = [Lookup(torch.randn(10, 4, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV),
                      torch.zeros(1, dtype=torch.long, device=DEV)),
               Lookup(quantize_rowwise(torch.randn(5, 8, device=DEV), 4), torch.zeros(0, dtype=torch.int32, device=DEV),
                      torch.zeros(1, dtype=torch.int32, device=DEV), bits=4)]
    out = OP(*grouped_args(lookups, "raise", torch.float16))
    assert out.shape == (0, 12) and out.dtype == torch.float16
    # B = 0 with indices left over is still an offsets error
    lookups[1].indices = torch.tensor([1, 2], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=r"offsets\[-1\].*2, got 0"):
        OP(*grouped_args(lookups, "raise", torch.float32))


def test_all_bags_empty_and_empty_tables():
    empty_bags = Lookup(torch.randn(10, 8, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV),
                        torch.zeros(4, dtype=torch.long, device=DEV), mode="max")
    empty_table = Lookup(torch.randn(0, 4, device=DEV), torch.tensor([0, 5, 2], device=DEV),
                         torch.tensor([0, 1, 1, 3], device=DEV))
    got = OP(*grouped_args([empty_bags, empty_table], "zero", torch.float32))
    assert torch.equal(got.cpu(), torch.zeros(3, 12))
    with pytest.raises(IndexError, match="cannot clamp into an empty table"):
        OP(*grouped_args([empty_bags, empty_table], "clamp", torch.float32))
    with pytest.raises(IndexError, match="index 0 is out of range for a table of 0 rows"):
        OP(*grouped_args([empty_bags, empty_table], "raise", torch.float32))


def test_nan_and_inf_rows_propagate():
    weight = torch.randn(10, 16, device=DEV)
    weight[3, 0] = float("nan")
    weight[4] = float("inf")
    indices = torch.tensor([3, 1, 4, 2, 4, 3, 0], device=DEV)
    offsets = torch.tensor([0, 2, 4, 7], device=DEV)
    lookups = [Lookup(weight, indices, offsets, mode=m, padding_idx=p) for m in ("sum", "mean", "max")
               for p in (-1, 4)]
    got = OP(*grouped_args(lookups, "raise", torch.float32)).cpu()
    # the reference on CPU tensors: the specification (NaN propagates through max)
    cpu = [Lookup(lk.weight.cpu(), lk.indices.cpu(), lk.offsets.cpu(), mode=lk.mode, padding_idx=lk.padding_idx)
           for lk in lookups]
    torch.testing.assert_close(got, expected(cpu), equal_nan=True)


# ----------------------------------------------------------------------------- value errors
def error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and message are compared
        return e
    return None


def assert_same_error(lookups, bad, bounds="raise"):
    """The grouped op raises what the single-table CUDA op raises for lookup `bad` (type and message)."""
    single = error_of(lambda: lookups[bad].single_op(bounds))
    assert single is not None
    for earlier in lookups[:bad]:
        earlier.single_op(bounds)  # the lookups before it are fine
    grouped = error_of(lambda: OP(*grouped_args(lookups, bounds, torch.float32)))
    assert type(grouped) is type(single) and str(grouped) == str(single)
    return grouped


def good(n_bags=20, index_dtype=torch.long):
    return make_lookup("f32", 16, n_bags, index_dtype=index_dtype)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("offsets,match", [
    ([1, 2, 4], r"offsets\[0\] must be 0, got 1"),
    ([0, 3, 2, 4], r"non-decreasing .*offsets\[1\]=3 > offsets\[2\]=2"),
    ([0, 5, 4], r"end at the number of indices 4, got offsets\[1\]=5"),
    ([0, 2, 5], r"offsets\[-1\].*4, got 5"),
    ([0, 2, 3], r"offsets\[-1\].*4, got 3"),
    ([0, -2, 4], "non-decreasing"),
])
def test_bad_offsets(index_dtype, offsets, match):
    n_bags = len(offsets) - 1
    bad = Lookup(torch.randn(5, 3, device=DEV), torch.tensor([0, 1, 2, 99], dtype=index_dtype, device=DEV),
                 torch.tensor(offsets, dtype=index_dtype, device=DEV))  # 99: offsets are checked first
    lookups = [good(n_bags), good(n_bags, torch.int32), bad, good(n_bags)]
    e = assert_same_error(lookups, 2)
    assert isinstance(e, ValueError) and re.search(match, str(e))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_bounds_raise_names_the_first_bad_index_of_the_first_bad_lookup(index_dtype):
    lookups = [good(3000), make_lookup("q8", 64, 3000, n_rows=100, index_dtype=index_dtype),
               make_lookup("f16", 8, 3000, n_rows=100)]
    lookups[1].indices[lookups[1].indices.numel() - 5] = -7  # later in index order
    lookups[1].indices[123] = 1000
    lookups[2].indices[0] = 5000  # a later lookup's bad index does not win
    e = assert_same_error(lookups, 1)
    assert isinstance(e, IndexError) and "index 1000 is out of range for a table of 100 rows" in str(e)
    for bounds in ("zero", "clamp"):
        check(run_grouped(lookups, bounds), expected(lookups, bounds))


def test_offsets_error_of_an_earlier_lookup_wins_over_an_index_error():
    lookups = [good(), make_lookup("f32", 8, 20), make_lookup("f32", 8, 20)]
    lookups[1].offsets = lookups[1].offsets.clone()
    lookups[1].offsets[-1] += 1
    lookups[2].indices[0] = -1
    e = assert_same_error(lookups, 1)
    assert isinstance(e, ValueError)
    # and the other way round
    lookups = [good(), make_lookup("f32", 8, 20), make_lookup("f32", 8, 20)]
    lookups[1].indices[0] = -1
    lookups[2].offsets = lookups[2].offsets.clone()
    lookups[2].offsets[0] = 1
    assert isinstance(assert_same_error(lookups, 1), IndexError)


def test_64bit_offsets_raise():
    lookups = [good(1), Lookup(torch.randn(3, 2, device=DEV), torch.tensor([0, 1], device=DEV),
                               torch.tensor([0, 2 ** 33], device=DEV))]
    e = assert_same_error(lookups, 1)
    assert str(2 ** 33) in str(e)


@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_scale_raises(bits):
    """A gathered quantized row (clamped index, contributing or not) with a NaN scale raises the
    reference's ValueError; the same row left ungathered is fine."""
    packed = quantize_rowwise(torch.randn(6, 8, device=DEV), bits)
    tail = packed[:, 8:] if bits == 8 else packed[:, 4:]
    dtype = torch.float32 if bits == 8 else torch.float16
    row = tail[3].clone().view(dtype)
    row[0] = float("nan")
    tail[3] = row.view(torch.uint8)
    off = torch.tensor([0, 1, 3], device=DEV)
    cases = [("raise", [0, 3, 1], -1), ("zero", [0, 3, 1], -1), ("raise", [0, 3, 1], 3),  # padding row 3
             ("clamp", [0, 9, 1], -1)]
    for bounds, idx, pad in cases:
        table = packed.clone()
        table[5] = packed[3]  # index 9 clamps to row 5
        bad = Lookup(table, torch.tensor(idx, device=DEV), off, padding_idx=pad, bits=bits)
        lookups = [make_lookup("q8", 8, 2), bad]
        with pytest.raises(ValueError, match="non-finite"):
            bad.reference(bounds)
        e = assert_same_error(lookups, 1, bounds)
        assert isinstance(e, ValueError) and "non-finite" in str(e)
    ok = Lookup(packed, torch.tensor([0, 2, 1], device=DEV), off, bits=bits)
    check(run_grouped([ok]), expected([ok]))


def test_metadata_errors():
    lk = good()
    args = list(grouped_args([lk, good()], "raise", torch.float32))
    with pytest.raises(ValueError, match=r"^modes must have one entry per lookup \(2\), got 1$"):
        OP(*(args[:4] + [["sum"]] + args[5:]))
    with pytest.raises(ValueError, match=r"offsets\[1\] must have B \+ 1 = 21"):
        OP(*(args[:2] + [[lk.offsets, lk.offsets[:-1]]] + args[3:]))
    with pytest.raises(TypeError, match=r"weights\[1\] must have dtype"):
        OP(*([[lk.weight, lk.weight.double()]] + args[1:]))
    with pytest.raises(ValueError, match="mode must be one of"):
        OP(*(args[:4] + [["sum", "median"]] + args[5:]))
    with pytest.raises(TypeError, match="output_dtype"):
        OP(*(args[:9] + [torch.float64]))


def test_opcheck():
    lookups = [make_lookup("f32", 16, 5, weighted=True), make_lookup("q4", 8, 5, mode="max", index_dtype=torch.int32)]
    torch.library.opcheck(OP, grouped_args(lookups, "raise", torch.float32))
