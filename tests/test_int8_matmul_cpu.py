"""The C++ CPU kernels of the int8 matmul family beyond the shared matrix of test_int8_matmul.py:
every CPU path the machine has (AMX and AVX512-VNNI for tasks of 16 rows or more, AVX2, and the
forced scalar fallback), exact int32 results over the whole int8 range
for shapes that hit every tail (M, N, K not multiples of the 6 x 16 tile or of the K pairs, K
blocked past 1024, the K-chunked path past 131070), the fused epilogue against the reference, the
prepacked-weight op int8_linear_packed, opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from helpers import INT8_GEMM_ISAS, ISA_VAR, has_avx2 as _has_avx2, has_cpu_feature, on_isa, on_threads
from recsys_kernels import _loader
from recsys_kernels.ops.int8_matmul import (int8_linear, int8_linear_packed, int8_matmul, pack_weight_int8,
                                            quantize_rows_int8, quantize_weight_int8, unpack_weight_int8)

pytestmark = pytest.mark.skipif(
    "_C" not in _loader.EXTENSIONS or not _loader.has_native_kernel("int8_matmul", "CPU"),
    reason="the C++ CPU kernels of int8_matmul are not built")

OPS = torch.ops.recsys_kernels
@pytest.fixture(params=INT8_GEMM_ISAS)
def isa(request, monkeypatch):
    """Caps the CPU path (cpu_isa() reads the variable on every call)."""
    monkeypatch.setenv(ISA_VAR, request.param)
    return request.param


def _rand_i8(*shape, g=None):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def _exact(a, b):
    return (a.long() @ b.long().T).int()


def _rel(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


# M, N, K: tails of the 6-row / 16-column tile and of K pairs; K blocked (> 1024); one row / column;
# for the wide kernels (tasks of >= 16 rows), more than 16 panels a task and K blocks of 1024
# (test_wide_row_blocks_on_one_thread: tasks past the 96 / 192-row blocks)
SHAPES = [(1, 1, 1), (1, 1024, 1024), (7, 17, 3), (6, 16, 2), (13, 33, 257), (1, 5, 2049),
          (50, 1, 31), (97, 40, 1500), (3, 70, 0), (200, 48, 64), (40, 600, 1100), (33, 31, 0)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int32_exact(isa, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    a, b = _rand_i8(m, k, g=g), _rand_i8(n, k, g=g)
    a[0, :] = -128  # the extremes
    b[0, :] = -128
    got = int8_matmul(a, b, backend="cpu")
    assert got.dtype == torch.int32
    assert torch.equal(got, _exact(a, b))


def test_int32_exact_large_k_chunked(isa):
    # past 131070 K values the kernels sum exact int32 chunks in int64
    k = 131072 + 37
    g = torch.Generator().manual_seed(5)
    a, b = _rand_i8(3, k, g=g), _rand_i8(18, k, g=g)
    assert torch.equal(int8_matmul(a, b, backend="cpu"), _exact(a, b))
    sa, sb = torch.rand(3, generator=g) + 0.5, torch.rand(18, generator=g) + 0.5
    got = int8_matmul(a, b, sa, sb, activation="relu", backend="cpu")
    exp = int8_matmul(a, b, sa, sb, activation="relu", backend="reference")
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=0)
    big = torch.full((1, k), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match="int32"):
        int8_matmul(big, big, backend="cpu")


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 17, 3), (13, 33, 257), (97, 40, 1500), (3, 9, 0)])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
def test_scaled_epilogue_matches_reference(isa, m, n, k, activation):
    g = torch.Generator().manual_seed(m + n + k)
    qa, sa = quantize_rows_int8(torch.randn(m, k, generator=g) * 3, backend="reference")
    qb, sb = quantize_weight_int8(torch.randn(n, k, generator=g) / max(k, 1) ** 0.5, backend="reference")
    bias = torch.randn(n, generator=g)
    got = int8_matmul(qa, qb, sa, sb, bias, activation=activation, backend="cpu")
    exp = int8_matmul(qa, qb, sa, sb, bias, activation=activation, backend="reference")
    assert _rel(got, exp) <= 1e-5
    pre = int8_matmul(qa, qb, sa, sb, bias, backend="reference")
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6 * (pre.abs().max().item() if pre.numel() else 1))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_round_once(isa, out_dtype):
    g = torch.Generator().manual_seed(1)
    qa, sa = quantize_rows_int8(torch.randn(9, 70, generator=g), backend="reference")
    qb, sb = quantize_weight_int8(torch.randn(35, 70, generator=g), backend="reference")
    got = int8_matmul(qa, qb, sa, sb, activation="none", out_dtype=out_dtype, backend="cpu")
    exp = int8_matmul(qa, qb, sa, sb, activation="none", backend="reference")  # fp32; exact path
    assert torch.equal(got, exp.to(out_dtype))  # acc -> fp32 is exact-rounded: one rounding to out_dtype


def test_relu_keeps_nan_from_bias(isa):
    qa, sa = quantize_rows_int8(torch.randn(2, 8))
    qb, sb = quantize_weight_int8(torch.randn(17, 8))
    bias = torch.zeros(17)
    bias[3] = float("nan")
    got = int8_matmul(qa, qb, sa, sb, bias, activation="relu", backend="cpu")
    assert torch.isnan(got[:, 3]).all() and not torch.isnan(got[:, 4:]).any()


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_activations_of_huge_inputs_are_torchs(isa, activation):
    """silu(-inf) is NaN (-inf * sigmoid(-inf) = -inf * 0) and silu / gelu of large negative
    inputs -0.0, as F.silu / F.gelu and the reference give: the vector exp saturated at +-88.4,
    and the AVX2 / AVX-512 epilogue returned silu(-inf) = -inf, silu(-1e38) = -0.53, gelu(-100)
    = -6e-39. Every path: the GEMM, the M = 1 GEMV, weight-only, packed."""
    bias = torch.tensor([-float("inf"), float("inf"), -100.0, -1e38, -1e4, 0.0] * 3)[:17]
    if activation == "gelu":  # gelu(+inf): +inf here, NaN from torch's vector F.gelu (docs/design.md)
        bias[bias == float("inf")] = 1e4
    weight_q, weight_scale = quantize_weight_int8(torch.randn(17, 8))
    for m in (1, 5):
        x = torch.randn(m, 8)
        for act_quant in ("dynamic", "none"):
            want = int8_linear(x, weight_q, weight_scale, bias, activation=activation, act_quant=act_quant,
                               backend="reference")
            for got in (int8_linear(x, weight_q, weight_scale, bias, activation=activation, act_quant=act_quant,
                                    backend="cpu"),
                        int8_linear_packed(x, pack_weight_int8(weight_q), weight_scale, bias, in_features=8,
                                           activation=activation, act_quant=act_quant, backend="cpu")):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
                assert (got[:, 2:5] == 0).all()
                if activation == "silu":
                    assert torch.isnan(got[:, 0]).all() and torch.isinf(got[:, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 1), (5, 17), (33, 1030), (7, 0)])
def test_quantize_rows_bit_exact(isa, dtype, m, k):
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).to(dtype)
    if m > 2 and k > 2:
        x[1] = 0
        x[2, :2] = torch.tensor([127.0, -0.5]).to(dtype)  # ties
    q, s = quantize_rows_int8(x, backend="cpu")
    q_ref, s_ref = quantize_rows_int8(x, backend="reference")
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantize_ties_round_half_to_even(isa):
    x = torch.tensor([[127.0] + [v + 0.5 for v in range(-20, 20)] + [-0.5, 0.5, 1.5, 2.5]])
    q, s = quantize_rows_int8(x, backend="cpu")
    assert s.item() == 1.0
    assert torch.equal(q, torch.round(x).to(torch.int8))


def _near_half_integer_quotients(absmax):
    """Rows whose first value fixes the scale (absmax / 127 in fp32) and whose others make x / scale
    a half-integer h in [-126.5, 126.5], as near as fp32 gets, and the fp32 values on either side."""
    absmax = absmax.float()
    scale = (absmax / 127)[:, None]
    halves = torch.arange(-126.5, 127, 1.0)
    x = halves * scale
    rows = torch.cat([absmax[:, None], x, torch.nextafter(x, torch.tensor(float("inf"))),
                      torch.nextafter(x, torch.tensor(-float("inf")))], dim=1)
    return rows.clamp(-absmax[:, None], absmax[:, None])  # the scale stays absmax / 127


def test_quantize_near_half_integers_matches_the_reference(isa):
    # Where rounding x / scale is most fragile: quotients at and around every half-integer, for
    # scales whose inverse is inexact, exact halves (scale 1, 3), a subnormal scale and a huge one.
    # (A kernel that rounds x * (1 / scale) instead of the quotient fails it.)
    g = torch.Generator().manual_seed(11)
    absmax = torch.cat([torch.exp(torch.empty(200).uniform_(-30, 30, generator=g)),
                        torch.tensor([127.0, 381.0, 1e-40, 3.4e38])])
    x = _near_half_integer_quotients(absmax)
    q, s = quantize_rows_int8(x, backend="cpu")
    q_ref, s_ref = quantize_rows_int8(x, backend="reference")
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref), (q != q_ref).nonzero()[:5]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(isa, bad):
    x = torch.randn(40, 37)
    x[23, 35] = bad  # in a vector's tail on AVX2
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows_int8(x, backend="cpu")
    wq, ws = quantize_weight_int8(torch.randn(5, 37))
    with pytest.raises(ValueError, match="non-finite"):
        int8_linear(x, wq, ws, backend="cpu")
    x[23, 35] = 0
    x[3, 3] = bad  # in a full vector
    with pytest.raises(ValueError, match="non-finite"):
        int8_linear(x, wq, ws, backend="cpu")


@pytest.mark.parametrize("m,k,n", [(1, 1024, 1024), (4, 67, 9), (1, 1, 1), (30, 1100, 20), (0, 8, 3), (3, 0, 17)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_dynamic_matches_reference(isa, m, k, n, activation, dtype):
    g = torch.Generator().manual_seed(m + k + n)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    wq, ws = quantize_weight_int8(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    got = int8_linear(x, wq, ws, bias, activation=activation, out_dtype=torch.float32, backend="cpu")
    exp = int8_linear(x, wq, ws, bias, activation=activation, out_dtype=torch.float32, backend="reference")
    if m * n:
        assert _rel(got, exp) <= 1e-5
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    packed = int8_linear_packed(x, pack_weight_int8(wq), ws, bias, in_features=k, activation=activation,
                                out_dtype=torch.float32, backend="cpu")
    assert torch.equal(packed, got)


@pytest.mark.parametrize("m,k,n", [(1, 1024, 64), (7, 67, 9), (30, 1100, 20), (0, 8, 3), (3, 0, 17)])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_linear_weight_only_matches_reference(isa, m, k, n, activation):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g)
    wq, ws = quantize_weight_int8(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    got = int8_linear(x, wq, ws, bias, activation=activation, act_quant="none", backend="cpu")
    exp = torch.nn.functional.linear(x.double(), wq.double() * ws.double()[:, None], bias.double())
    exp = torch.relu(exp) if activation == "relu" else F.silu(exp)
    if m * n:
        assert _rel(got, exp) <= 1e-5
    # fp32 sums of K terms: elementwise error grows like sqrt(K) eps |x||w|
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5 * max(1.0, k ** 0.5 / 4))
    packed = int8_linear_packed(x, pack_weight_int8(wq), ws, bias, in_features=k, activation=activation,
                                act_quant="none", backend="cpu")
    assert torch.equal(packed, got)


def test_threads_do_not_change_results(isa):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 130, generator=g)
    wq, ws = quantize_weight_int8(torch.randn(70, 130, generator=g))
    one = on_threads(1, lambda: int8_linear(x, wq, ws, activation="silu", backend="cpu"))
    two = on_threads(max(2, torch.get_num_threads()), lambda: int8_linear(x, wq, ws, activation="silu", backend="cpu"))
    assert torch.equal(one, two)


def test_wide_row_blocks_on_one_thread(isa):
    # one task of 421 rows on any machine: past VNNI's 96-row and AMX's 192-row blocks, with a
    # last block of neither size, for the exact int32 sums and the quantized, scaled epilogue
    g = torch.Generator().manual_seed(21)
    a, b = _rand_i8(421, 130, g=g), _rand_i8(40, 130, g=g)
    x = torch.randn(421, 130, generator=g) * 2
    wq, ws = quantize_weight_int8(torch.randn(40, 130, generator=g))
    bias = torch.randn(40, generator=g)
    got, lin = on_threads(1, lambda: (int8_matmul(a, b, backend="cpu"),
                                      int8_linear(x, wq, ws, bias, activation="gelu", backend="cpu")))
    assert torch.equal(got, _exact(a, b))
    exp = int8_linear(x, wq, ws, bias, activation="gelu", backend="reference")
    assert _rel(lin, exp) <= 1e-5
    torch.testing.assert_close(lin, exp, rtol=1e-5, atol=1e-5)


def test_paths_agree_on_int32():
    if not _has_avx2():
        pytest.skip("CPU has no AVX2")
    a, b = _rand_i8(23, 301), _rand_i8(45, 301)
    results = [on_isa(isa, lambda: int8_matmul(a, b, backend="cpu")) for isa in ("scalar", "avx2")]
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(not has_cpu_feature("avx512_vnni"), reason="CPU has no AVX512-VNNI")
def test_wide_paths_give_the_avx2_bits():
    # the wide kernels share the AVX2 row quantization and epilogue: the same bits, not just close
    g = torch.Generator().manual_seed(11)
    x = torch.randn(70, 333, generator=g)
    wq, ws = quantize_weight_int8(torch.randn(90, 333, generator=g))
    bias = torch.randn(90, generator=g)
    isas = ["avx2", "avx512_vnni"] + (["amx"] if has_cpu_feature("amx_int8") else [])
    for act in ("none", "gelu", "silu"):
        for out_dtype in (torch.float32, torch.bfloat16):
            runs = [on_isa(i, lambda: int8_linear(x, wq, ws, bias, activation=act, out_dtype=out_dtype,
                                                  backend="cpu")) for i in isas]
            assert all(torch.equal(runs[0], r) for r in runs[1:]), (act, out_dtype)


# ----------------------------------------------------------------------------- packed weights
@pytest.mark.parametrize("n,k", [(1, 1), (16, 2), (17, 3), (40, 129)])
def test_pack_unpack_round_trip(n, k):
    w = _rand_i8(n, k)
    packed = pack_weight_int8(w)
    assert packed.shape == (-(-n // 16), -(-k // 2) * 32)
    assert torch.equal(unpack_weight_int8(packed, n, k), w)
    # the documented layout
    assert packed[0, 1].item() == w[0, 1].item() if k > 1 else packed[0, 0].item() == w[0, 0].item()


def test_packed_op_bad_input():
    wq, ws = quantize_weight_int8(torch.randn(5, 8))
    packed = pack_weight_int8(wq)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x"):
        int8_linear_packed(x[:, :7], packed, ws, in_features=8)
    with pytest.raises(ValueError, match="packed_weight"):
        int8_linear_packed(x, packed[:, :-32], ws, in_features=8)
    with pytest.raises(ValueError, match="packed_weight"):
        OPS.int8_linear_packed(x, packed[:, :-32], ws, None, "none", "dynamic", None)
    with pytest.raises(ValueError, match="packed_weight"):
        OPS.int8_linear_packed_reference(x, packed[:, :-32], ws, None, "none", "dynamic", None)
    with pytest.raises(ValueError, match="weight_scale"):
        int8_linear_packed(x, packed, torch.full((5,), float("nan")), in_features=8, backend="cpu")
    with pytest.raises(TypeError, match="in_features must be an int"):
        int8_linear_packed(x, packed, ws, in_features=8.0)


@pytest.mark.parametrize("op", ["cpu", "reference"])
def test_packed_opcheck(op):
    wq, ws = quantize_weight_int8(torch.randn(7, 19))
    packed = pack_weight_int8(wq)
    x = torch.randn(5, 19)
    fn = OPS.int8_linear_packed.default if op == "cpu" else OPS.int8_linear_packed_reference.default
    for args in [(x, packed, ws, torch.randn(7), "silu", "dynamic", None),
                 (x.bfloat16(), packed, ws, None, "none", "none", torch.float32),
                 (x[:0], packed, ws, None, "relu", "dynamic", None)]:
        torch.library.opcheck(fn, args)


def test_packed_compile_fullgraph():
    wq, ws = quantize_weight_int8(torch.randn(20, 24))
    packed = pack_weight_int8(wq)
    bias = torch.randn(20)

    def f(x):
        return int8_linear_packed(x, packed, ws, bias, in_features=24, activation="gelu")

    x = torch.randn(3, 4, 24)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
    assert torch.equal(f(x), int8_linear(x, wq, ws, bias, activation="gelu", backend="cpu"))
