"""The AVX-512 pooling kernel of embedding_bag (csrc/embedding_bag/embedding_bag_cpu_avx512.h) on a
CPU without AVX-512: its translation units are compiled with -DRK_EMULATE_WIDE, where SIMDe's
AVX-512 (tests/emulation/wide_emulation.h) stands in for the instructions, and a run of bags is
pooled through a C entry point (tests/emulation/embedding_bag_harness.cpp). Per column the kernel
performs the AVX2 path's float operations in the same order, so every output must be bit-equal to
the op on the AVX2 path: every table format, sum / mean / max, per-sample weights, int32 / int64
indices, D with and without a scalar tail, partial blocks and the 4-bit group decode, empty bags,
4-bit rows also through the AVX512_VBMI build; the first out-of-range index and non-finite row
scales are reported as on AVX2. Where the CPU has AVX-512, test_embedding_bag_cpu.py runs the
real kernel through the op."""
import ctypes

import pytest
import torch

import recsys_kernels as rk
from helpers import build_emulated_library, on_isa

SOURCES = ["tests/emulation/embedding_bag_harness.cpp", "csrc/embedding_bag/embedding_bag_cpu_avx512_i32.cpp",
           "csrc/embedding_bag/embedding_bag_cpu_avx512_i64.cpp", "csrc/embedding_bag/embedding_bag_cpu_avx512_vbmi.cpp"]
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, 8: 3, 4: 4}  # TableKind


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    # -O1: the emulated kernel is ~1 min of g++ per unit even so
    so = build_emulated_library(tmp_path_factory.mktemp("eb_avx512_emulated"), SOURCES, opt="-O1")
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    so.rk_pool_bags_avx512.argtypes = [i32, i32, i32, ptr, i64, i64, i64, ptr, ptr, i32, i64, i64, ptr, ptr, i64,
                                       i32, ctypes.POINTER(i32)]
    so.rk_pool_bags_avx512.restype = i64
    return so


def pool_emulated(lib, table, bits, indices, offsets, mode, weights=None, vbmi=False):
    """(out [B, D] fp32, first bad position or -1, finite) from the emulated AVX-512 kernel (vbmi:
    its AVX512_VBMI build, 4-bit tables only)."""
    quantized = table.dtype == torch.uint8
    row_bytes = table.shape[1] * table.element_size()
    dim = {8: row_bytes - 8, 4: 2 * (row_bytes - 4)}[bits] if quantized else table.shape[1]
    n_bags = offsets.numel() - 1
    out = torch.full((n_bags, dim), float("nan"))
    finite = ctypes.c_int(1)
    first_bad = lib.rk_pool_bags_avx512(
        KINDS[bits if quantized else table.dtype], int(mode == "max"), int(mode == "mean"),
        ctypes.c_void_p(table.data_ptr()), row_bytes, dim, table.shape[0], ctypes.c_void_p(indices.data_ptr()),
        ctypes.c_void_p(offsets.data_ptr()), int(indices.dtype == torch.int64), n_bags, indices.numel(),
        None if weights is None else ctypes.c_void_p(weights.data_ptr()), ctypes.c_void_p(out.data_ptr()), dim,
        int(vbmi), ctypes.byref(finite))
    return out, first_bad, bool(finite.value)


def make_table(fmt, n, d, g):
    w = torch.randn(n, d, generator=g)
    if fmt in (8, 4):
        return rk.quantize_rowwise(w, fmt), fmt
    return w.to(fmt), 8


def make_bags(n_rows, n_bags, g, index_dtype):
    lengths = torch.randint(0, 9, (n_bags,), generator=g)
    lengths[1] = 0                     # an empty bag
    lengths[-1] = 40                   # a longer one
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(0, n_rows, (int(offsets[-1]),), generator=g)
    indices[0] = n_rows - 1
    return indices.to(index_dtype), offsets.to(index_dtype)


# D: multiples of 16 (what the op sends to this kernel): one vector, a partial block, a full block
# of 8 (quantized) or 16 (float) vectors and one more, the 4-bit groups of 4 and a group's rest;
# and widths with a scalar tail (the kernel handles them too)
DIMS = [16, 48, 64, 80, 128, 144, 256, 272, 8, 40]
# 4-bit rows also through the AVX512_VBMI build (which instantiates only them)
VBMI_BUILDS = {fmt: (False, True) if fmt == 4 else (False,) for fmt in KINDS}


@pytest.mark.parametrize("fmt", list(KINDS), ids=lambda f: str(f).replace("torch.", ""))
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bit_equal_to_the_avx2_path(lib, fmt, d, mode):
    g = torch.Generator().manual_seed(d * 10 + KINDS[fmt])
    table, bits = make_table(fmt, 300, d, g)
    for index_dtype in (torch.int32, torch.int64):
        indices, offsets = make_bags(300, 23, g, index_dtype)
        weights = torch.rand(indices.numel(), generator=g) * 2 - 0.5 if mode == "sum" else None
        exp = on_isa("avx2", lambda: rk.embedding_bag(table, indices, offsets, per_sample_weights=weights,
                                                      mode=mode, bits=bits, output_dtype=torch.float32,
                                                      backend="cpu"))
        for vbmi in VBMI_BUILDS[fmt]:
            got, first_bad, finite = pool_emulated(lib, table, bits, indices, offsets, mode, weights, vbmi)
            assert first_bad == -1 and finite
            assert torch.equal(got, exp.float()), (index_dtype, vbmi, (got - exp).abs().max())


@pytest.mark.parametrize("fmt", [torch.float32, 8, 4], ids=lambda f: str(f).replace("torch.", ""))
def test_reports_the_first_index_out_of_range(lib, fmt):
    g = torch.Generator().manual_seed(1)
    table, bits = make_table(fmt, 50, 64, g)
    indices, offsets = make_bags(50, 12, g, torch.int64)
    for bad_at, bad in [(7, 50), (3, -1), (int(offsets[-1]) - 1, 1 << 40)]:
        idx = indices.clone()
        idx[bad_at] = bad
        idx[bad_at + 1:] = 0
        for vbmi in VBMI_BUILDS[fmt]:
            _, first_bad, _ = pool_emulated(lib, table, bits, idx, offsets, "sum", vbmi=vbmi)
            assert first_bad == bad_at


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_reports_non_finite_scales(lib, bits, bad):
    g = torch.Generator().manual_seed(2)
    table, _ = make_table(bits, 40, 128, g)
    scale_at = table.shape[1] - (8 if bits == 8 else 4)
    if bits == 8:
        table[5, scale_at:scale_at + 4] = torch.tensor([bad], dtype=torch.float32).view(torch.uint8)
    else:
        table[5, scale_at + 2:scale_at + 4] = torch.tensor([bad], dtype=torch.float16).view(torch.uint8)  # bias
    indices = torch.tensor([1, 5, 7], dtype=torch.int64)
    for vbmi in VBMI_BUILDS[bits]:
        _, _, finite = pool_emulated(lib, table, bits, indices, torch.tensor([0, 3]), "sum", vbmi=vbmi)
        assert not finite
        _, _, finite = pool_emulated(lib, table, bits, indices[[0, 2]], torch.tensor([0, 2]), "sum", vbmi=vbmi)
        assert finite
