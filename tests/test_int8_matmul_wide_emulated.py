"""The AVX512-VNNI and AMX kernels of the int8 GEMM (csrc/int8_matmul/int8_gemm_wide.cpp) on a CPU
that has neither: the translation unit is compiled with -DRK_EMULATE_WIDE, where SIMDe's AVX-512
and a scalar model of the AMX tile ops (tests/emulation/wide_emulation.h) stand in for the
instructions, and driven through a C entry point (tests/emulation/wide_gemm_harness.cpp). What this
checks: the quad re-layout, the +128 compensation, the padding of rows, K and panels, the N / K
blocking and the task ranges. The int32 sums must be exact, and every float output bit-equal to the
AVX2 path of the real ops (the wide tasks share its row quantization and epilogue). Where the CPU has
the instructions, test_int8_matmul_cpu.py runs the real kernels through the ops."""
import ctypes

import pytest
import torch

from helpers import build_emulated_library, on_isa
from recsys_kernels.ops.int8_matmul import (int8_linear, int8_matmul, pack_weight_int8, quantize_rows_int8,
                                            quantize_weight_int8)

SOURCES = ["tests/emulation/wide_gemm_harness.cpp", "csrc/int8_matmul/int8_gemm_wide.cpp",
           "csrc/int8_matmul/int8_gemm_avx2.cpp"]
ISAS = {"avx512_vnni": 0, "amx": 1}                 # WideIsa
IN_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OUT_KINDS = {torch.int32: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
ACTS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = build_emulated_library(tmp_path_factory.mktemp("wide_emulated"), SOURCES)
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    so.rk_wide_task.argtypes = [i32, i64, i64, i64, i32, i32, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, i32, i32, ptr,
                                i64, i64, i64, i64]
    so.rk_wide_task.restype = i32
    return so


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def run_wide(lib, isa, a, w_packed, n, *, a_scale=None, b_scale=None, bias=None, activation="none",
             out_dtype=torch.int32, tasks=None, k=None, a_offset=0, b_p0=0):
    """One wide_task per (r0, r1, j0, j1) of `tasks` (default: one task, everything). `a` is int8
    rows, or float rows to quantize; k / a_offset / b_p0 select a K chunk as the driver does."""
    m = a.shape[0]
    k = a.shape[1] if k is None else k
    n_panels = w_packed.shape[0]
    out = torch.full((m, n), -7, dtype=out_dtype) if out_dtype == torch.int32 else torch.full((m, n), float("nan"),
                                                                                             dtype=out_dtype)
    quantize = a.dtype != torch.int8
    keep = [a, w_packed, a_scale, b_scale, bias, out]  # noqa: F841 (alive during the calls)
    ok = True
    for r0, r1, j0, j1 in tasks or [(0, m, 0, n_panels)]:
        ok &= bool(lib.rk_wide_task(
            ISAS[isa], m, n, k, int(quantize), IN_KINDS.get(a.dtype, 0),
            ctypes.c_void_p(a.data_ptr() + a_offset * a.element_size()), a.shape[1] * a.element_size(),
            _ptr(a_scale), _ptr(w_packed), w_packed.shape[1], b_p0, _ptr(b_scale), _ptr(bias), ACTS[activation],
            OUT_KINDS[out_dtype], _ptr(out), r0, r1, j0, j1))
    return out, ok


def _rand_i8(*shape, g):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def _exact(a, b):
    return (a.long() @ b.long().T).int()


@pytest.fixture(params=list(ISAS))
def isa(request):
    return request.param


# M, N, K: one row / column / K value; K not a multiple of 4 or 64; rows past the 12 / 32 row
# micro-tiles; an odd number of panels; > 16 panels (two N blocks); K > 1024 (two K blocks);
# more rows than a row block (96 on VNNI, 192 on AMX)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 17, 3), (12, 16, 64), (13, 33, 257), (33, 47, 130),
                                   (40, 600, 1100), (97, 40, 1500), (3, 70, 0), (197, 20, 130)])
def test_int32_exact(lib, isa, m, n, k):
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    a, b = _rand_i8(m, k, g=g), _rand_i8(n, k, g=g)
    if k:
        a[0], b[0] = -128, -128    # the extremes: (-128)(-128) summed over K
        a[-1], b[-1] = 127, -128
    got, ok = run_wide(lib, isa, a, pack_weight_int8(b), n)
    assert ok and torch.equal(got, _exact(a, b))


def test_task_ranges_and_k_chunks(lib, isa):
    g = torch.Generator().manual_seed(3)
    m, n, k = 57, 70, 300
    a, b = _rand_i8(m, k, g=g), _rand_i8(n, k, g=g)
    packed = pack_weight_int8(b)
    tasks = [(0, 20, 0, 3), (0, 20, 3, 5), (20, 57, 0, 2), (20, 57, 2, 5)]  # rows x panels, as the driver splits
    got, ok = run_wide(lib, isa, a, packed, n, tasks=tasks)
    assert ok and torch.equal(got, _exact(a, b))
    # the K chunks of the driver's large-K path: A columns from k0, B pairs from k0 / 2
    for k0, k1 in [(0, 128), (128, 300), (64, 67)]:
        got, ok = run_wide(lib, isa, a, packed, n, k=k1 - k0, a_offset=k0, b_p0=k0 // 2)
        assert ok and torch.equal(got, _exact(a[:, k0:k1], b[:, k0:k1])), (k0, k1)


@pytest.mark.parametrize("m,n,k", [(29, 37, 129), (97, 300, 1100), (197, 37, 129)])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scaled_epilogue_gives_the_avx2_bits(lib, isa, m, n, k, activation, out_dtype):
    g = torch.Generator().manual_seed(m + n + k)
    qa, sa = quantize_rows_int8(torch.randn(m, k, generator=g) * 3, backend="reference")
    qb, sb = quantize_weight_int8(torch.randn(n, k, generator=g) / k ** 0.5, backend="reference")
    bias = torch.randn(n, generator=g)
    got, ok = run_wide(lib, isa, qa, pack_weight_int8(qb), n, a_scale=sa, b_scale=sb, bias=bias,
                       activation=activation, out_dtype=out_dtype)
    exp = on_isa("avx2", lambda: int8_matmul(qa, qb, sa, sb, bias, activation=activation, out_dtype=out_dtype,
                                             backend="cpu"))
    assert ok and torch.equal(got, exp)


@pytest.mark.parametrize("dtype", list(IN_KINDS))
@pytest.mark.parametrize("m,k,n", [(16, 67, 9), (30, 1100, 20), (70, 333, 90), (197, 129, 37)])
def test_dynamic_quantization_gives_the_avx2_bits(lib, isa, dtype, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    x[1] = 0                      # an all-zero row (scale 1)
    wq, ws = quantize_weight_int8(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    got, ok = run_wide(lib, isa, x, pack_weight_int8(wq), n, b_scale=ws, bias=bias, activation="silu",
                       out_dtype=torch.float32)
    exp = on_isa("avx2", lambda: int8_linear(x, wq, ws, bias, activation="silu", out_dtype=torch.float32,
                                             backend="cpu"))
    assert ok and torch.equal(got, exp)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_are_reported(lib, isa, bad):
    x = torch.randn(40, 37)
    x[23, 35] = bad
    wq, ws = quantize_weight_int8(torch.randn(5, 37))
    _, ok = run_wide(lib, isa, x, pack_weight_int8(wq), 5, b_scale=ws, out_dtype=torch.float32)
    assert not ok
