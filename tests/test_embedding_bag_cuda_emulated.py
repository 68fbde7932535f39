"""The forward pooling loop of the CUDA embedding_bag kernels (pool_bags / pool_bag in
csrc/embedding_bag/embedding_bag_cuda_common.cuh: the single-table kernel's body, and the grouped
kernel's per lookup) on a machine without a GPU: compiled as plain C++ with
tests/emulation/cuda_emulation.h (one OS thread per CUDA thread, the warp shuffles and ballots an
exchange between the warp's threads) and driven through tests/emulation/embedding_bag_cuda_harness.cpp.
It checks the loop's indexing: the indices read 32 at a time (one per lane) and handed to the
groups of lanes by shuffles, batches that end inside a step, column chunks for wide rows, the
scalar and vectorised readers of fp32 / int8 / int4 tables, and the error flags the host turns into
the reference's exceptions. On a GPU, test_embedding_bag_cuda.py runs the real kernels through the
op."""
import ctypes
import zlib

import pytest
import torch

from helpers import build_cuda_emulated_library
from recsys_kernels.ops.embedding import embedding_bag
from recsys_kernels.ops.rowwise import quantize_rowwise

MODES = {"sum": 0, "mean": 1, "max": 2}
BOUNDS = {"raise": 0, "zero": 1, "clamp": 2}
NONE = torch.iinfo(torch.int64).max  # an error flag nobody reported into
BAD_INDEX, BAD_STEP, FIRST, LAST, BAD_SCALE = range(5)  # the flag set's layout


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = build_cuda_emulated_library(tmp_path_factory.mktemp("cuda_bag"),
                                     ["tests/emulation/embedding_bag_cuda_harness.cpp"], torch_headers=True)
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    so.rk_embedding_bag_cuda_emulated.argtypes = [i32, i32, i32, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64,
                                                  i32, i32, i64, ptr, ctypes.c_uint]
    so.rk_embedding_bag_cuda_emulated.restype = None
    return so


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def run_emulated(lib, table, bits, d, indices, offsets, psw=None, mode="sum", bounds="raise", padding_idx=None,
                 vec=True, blocks=1):
    """(output [B, d], the flag set) of the pooling loop on emulated threads. bits 0: an fp32
    table; vec: the vectorised reader where the launcher would take it."""
    n_bags = offsets.numel() - 1
    if bits == 0:
        vec = vec and d % 4 == 0
    else:
        vec = vec and d % 8 == 0
    out = torch.full((n_bags, d), float("nan"))  # every element must be written
    flags = torch.full((5,), NONE, dtype=torch.int64)
    lib.rk_embedding_bag_cuda_emulated(bits, int(vec), int(indices.dtype == torch.int64), _p(table),
                                       table.shape[1] if bits else 0, d, table.shape[0], _p(indices), _p(offsets),
                                       _p(psw), _p(out), n_bags, indices.numel(), MODES[mode], BOUNDS[bounds],
                                       -1 if padding_idx is None else padding_idx, _p(flags), blocks)
    return out, flags


def random_case(n_bags, max_len, n_rows, dtype, gen, long_bag=None):
    """CSR bags with an empty bag at 1 and, with long_bag, bag 0 of that many indices."""
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=gen)
    if n_bags > 1:
        lengths[1] = 0
    if long_bag is not None and n_bags > 0:
        lengths[0] = long_bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(0, n_rows, (int(offsets[-1]),), generator=gen)
    return indices.to(dtype), offsets.to(dtype)


def table_for(bits, n_rows, d, gen):
    weight = torch.randn(n_rows, d, generator=gen)
    return (weight, weight) if bits == 0 else (quantize_rowwise(weight, bits), weight)


FORMATS = [(0, d) for d in (1, 3, 8, 64, 129, 256)] + [(8, d) for d in (1, 3, 8, 64, 136)] + \
          [(4, d) for d in (2, 8, 64, 130)]


@pytest.mark.parametrize("bits,d", FORMATS, ids=[f"{'fp32' if b == 0 else f'int{b}'}-d{d}" for b, d in FORMATS])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
@pytest.mark.parametrize("vec", [True, False], ids=["vec", "scalar"])
def test_matches_the_reference(lib, bits, d, mode, weighted, vec):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((bits, d, mode, weighted, vec)).encode()))
    n_rows = 50
    table, _ = table_for(bits, n_rows, d, gen)
    # bag 0 has 70 indices: two full batches of 32 and a partial one; 21 bags over 8 warps, one block
    indices, offsets = random_case(21, 40, n_rows, torch.int64 if d % 2 else torch.int32, gen, long_bag=70)
    psw = torch.rand(indices.numel(), generator=gen) if weighted else None
    padding_idx = int(indices[3]) if indices.numel() > 3 else None  # a row that occurs
    got, flags = run_emulated(lib, table, bits, d, indices, offsets, psw, mode, padding_idx=padding_idx, vec=vec)
    expected = embedding_bag(table, indices, offsets, per_sample_weights=psw, mode=mode, padding_idx=padding_idx,
                             bits=bits or 8, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert flags.tolist() == [NONE, NONE, 0, indices.numel(), NONE]


@pytest.mark.parametrize("n_bags,long_bag", [(0, None), (1, 0), (1, 1), (1, 33), (3, 64), (9, 1000)])
@pytest.mark.parametrize("blocks", [1, 2])
def test_bag_counts_and_lengths(lib, n_bags, long_bag, blocks):
    # no bags, one empty bag, bags around the 32-index batch, more warps than bags and the reverse
    gen = torch.Generator().manual_seed(7 * n_bags + blocks)
    table = torch.randn(40, 128, generator=gen)
    indices, offsets = random_case(n_bags, 5, 40, torch.int64, gen, long_bag=long_bag)
    got, flags = run_emulated(lib, table, 0, 128, indices, offsets, blocks=blocks)
    torch.testing.assert_close(got, embedding_bag(table, indices, offsets, backend="reference"), rtol=1e-5, atol=1e-5)
    assert flags[BAD_INDEX] == NONE and flags[BAD_STEP] == NONE


@pytest.mark.parametrize("bits", [0, 8])
def test_out_of_range_indices_flag_the_first_position(lib, bits):
    gen = torch.Generator().manual_seed(11)
    table, _ = table_for(bits, 30, 64, gen)
    indices, offsets = random_case(6, 50, 30, torch.int64, gen, long_bag=80)
    indices[[45, 70, 90]] = torch.tensor([30, -1, 1000])  # in bag 0's second and third batches, and later
    _, flags = run_emulated(lib, table, bits, 64, indices, offsets, bounds="raise")
    assert flags[BAD_INDEX] == 45
    for bounds in ("zero", "clamp"):
        got, flags = run_emulated(lib, table, bits, 64, indices, offsets, bounds=bounds)
        assert flags[BAD_INDEX] == NONE
        torch.testing.assert_close(got, embedding_bag(table, indices, offsets, bounds=bounds, bits=bits or 8,
                                                      backend="reference"), rtol=1e-5, atol=1e-5)


def test_decreasing_offsets_flag_the_step_and_read_nothing_outside(lib):
    gen = torch.Generator().manual_seed(12)
    table = torch.randn(20, 8, generator=gen)
    indices = torch.randint(0, 20, (40,), generator=gen)
    offsets = torch.tensor([0, 10, 5, 30, 60])  # a step back at bag 1; the last offset past nnz
    got, flags = run_emulated(lib, table, 0, 8, indices, offsets)
    assert flags[BAD_STEP] == 1 and flags[LAST] == 60 and flags[FIRST] == 0
    assert not got.isnan().any()  # every bag written, clamped to the indices there are


def test_non_finite_scale_flags_the_first_position_that_gathers_it(lib):
    gen = torch.Generator().manual_seed(13)
    packed = quantize_rowwise(torch.randn(10, 16, generator=gen), 8)
    packed[4, 16:20] = torch.tensor([float("inf")]).view(torch.uint8)  # row 4's scale
    indices = torch.tensor([1, 2, 3, 0, 9, 8, 7, 6] * 5 + [4, 4, 5])
    offsets = torch.tensor([0, 20, indices.numel()])
    _, flags = run_emulated(lib, packed, 8, 16, indices, offsets, padding_idx=4)  # a padding row still counts
    assert flags[BAD_SCALE] == 40
