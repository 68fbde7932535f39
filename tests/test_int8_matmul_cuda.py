"""The int8 matmul family on the CUDA C++ backend (csrc/int8_matmul/), beyond the generic matrix of
test_int8_matmul.py (which runs its "cuda-cuda" params when a GPU is present): every tile edge of the
tensor-core GEMM (M, N, K around 16 and 128, each loader width: 16-byte, 4-byte and byte-granular K),
exact int32 against an int64 reference, the GEMV path (M <= 16) against the GEMM path (bit-identical
epilogues), the split-K path, K past the int32 limit, epilogue dtypes and activations, quantization
bit for bit, and the device error flags. Every test here needs a GPU and is skipped without one."""
import pytest
import torch
import torch.nn.functional as F

from recsys_kernels import _backend
from recsys_kernels.ops.int8_matmul import int8_linear, int8_matmul, quantize_rows_int8, quantize_weight_int8

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif("cuda" not in _backend.available_backends("int8_matmul", "cuda"),
                       reason="the cuda backend of int8_matmul is not available"),
]

DEV = "cuda"
ACTS = {"none": lambda t: t, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu}
EDGE = [1, 15, 16, 17, 127, 128, 129, 1000]


def rand_i8(*shape, gen=None):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)


def exact(a, b):
    """a @ b.T on the CPU as int64. Through fp64 (fast BLAS): every partial sum is an integer below
    2^53 in magnitude for K < 2^39, so it is exact in any summation order."""
    return (a.cpu().double() @ b.cpu().double().T).long()


def misaligned(t):
    """A contiguous copy of t whose data pointer is 1 byte off 16-byte alignment (int8): the
    kernels must take their byte-granular loader."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 4 != 0
    return out


# ----------------------------------------------------------------------------- exact int32
@pytest.mark.parametrize("m", EDGE)
@pytest.mark.parametrize("n", EDGE)
@pytest.mark.parametrize("k", [1, 15, 16, 17, 64, 127, 128, 129, 1000])
def test_exact_int32_every_edge(m, n, k):
    gen = torch.Generator().manual_seed(m * 10007 + n * 101 + k)
    a, b = rand_i8(m, k, gen=gen), rand_i8(n, k, gen=gen)
    got = int8_matmul(a.to(DEV), b.to(DEV), backend="cuda")
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.cpu().long(), exact(a, b))


@pytest.mark.parametrize("m,n,k", [(300, 260, 1024), (129, 17, 1000), (1000, 129, 127), (16, 1000, 4096),
                                   (17, 1000, 4096), (40, 40, 8192)])
def test_exact_int32_larger(m, n, k):
    a, b = rand_i8(m, k), rand_i8(n, k)
    got = int8_matmul(a.to(DEV), b.to(DEV), backend="cuda")
    assert torch.equal(got.cpu().long(), exact(a, b))


@pytest.mark.parametrize("m,n,k", [(5, 33, 96), (200, 130, 96), (5, 33, 100), (200, 130, 100), (200, 130, 101)])
def test_misaligned_operands_take_the_byte_loader(m, n, k):
    a, b = rand_i8(m, k), rand_i8(n, k)
    got = int8_matmul(misaligned(a.to(DEV)), misaligned(b.to(DEV)), backend="cuda")
    assert torch.equal(got.cpu().long(), exact(a, b))


def test_extreme_values_all_minus_128():
    # every product is +16384: the largest sums an int32 accumulator sees, on both paths
    for m in (3, 200):
        k = 4096
        a = torch.full((m, k), -128, dtype=torch.int8)
        got = int8_matmul(a.to(DEV), a[:7].to(DEV), backend="cuda").cpu()
        assert (got == 16384 * k).all()


def test_output_is_fully_written():
    # the output comes from at::empty; a NaN/garbage-free result everywhere, including the edges
    for m, n, k in ((129, 257, 65), (7, 129, 33)):
        a, b = rand_i8(m, k), rand_i8(n, k)
        for _ in range(3):
            torch.cuda.empty_cache()
            got = int8_matmul(a.to(DEV), b.to(DEV), torch.ones(m, device=DEV), torch.ones(n, device=DEV),
                              backend="cuda")
            assert torch.equal(got.cpu().double(), exact(a, b).double())


# ----------------------------------------------------------------------------- GEMV vs GEMM
@pytest.mark.parametrize("k", [1, 33, 96, 1000, 4096])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemv_and_gemm_paths_agree_bit_for_bit(k, activation, out_dtype):
    """Rows 0..15 through the GEMV (M = 16) and through the GEMM (M = 40): the same exact integer,
    the same epilogue arithmetic, so the same bits."""
    n = 77
    a, b = rand_i8(40, k), rand_i8(n, k)
    sa, sb = torch.rand(40) + 0.01, torch.rand(n) / 1000
    bias = torch.randn(n)
    args = dict(activation=activation, out_dtype=out_dtype, backend="cuda")
    full = int8_matmul(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), bias.to(DEV), **args)
    small = int8_matmul(a[:16].to(DEV), b.to(DEV), sa[:16].to(DEV), sb.to(DEV), bias.to(DEV), **args)
    one = int8_matmul(a[3:4].to(DEV), b.to(DEV), sa[3:4].to(DEV), sb.to(DEV), bias.to(DEV), **args)
    assert torch.equal(full[:16], small)
    assert torch.equal(full[3:4], one)
    # and the reference's epilogue: exact integer -> fp32, two multiplies, an add
    ref = int8_matmul(a, b, sa, sb, bias, activation=activation, out_dtype=out_dtype, backend="reference")
    if activation in ("none", "relu"):
        assert torch.equal(full.cpu(), ref)  # no transcendental: bit-identical
    else:
        torch.testing.assert_close(full.cpu().float(), ref.float(), rtol=2 * torch.finfo(out_dtype).eps, atol=1e-6)


# ----------------------------------------------------------------------------- split K and K > 131071
def test_split_k_matches_exact():
    # 4 output tiles on a 100+ SM GPU: the launcher splits K and sums int32 slices in int64
    a, b = rand_i8(200, 8192), rand_i8(200, 8192)
    got = int8_matmul(a.to(DEV), b.to(DEV), backend="cuda")
    assert torch.equal(got.cpu().long(), exact(a, b))
    sa, sb = torch.rand(200), torch.rand(200)
    y = int8_matmul(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), backend="cuda").cpu()
    assert torch.equal(y, int8_matmul(a, b, sa, sb, backend="reference"))


@pytest.mark.parametrize("m", [2, 20])  # GEMV and GEMM
def test_large_k_overflow_raises_and_fitting_results_are_exact(m):
    k = 140_000  # > 131071: an int32 accumulator of all -128 * -128 would wrap
    a = torch.full((m, k), -128, dtype=torch.int8, device=DEV)
    b = torch.full((3, k), -128, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError, match="int32"):
        int8_matmul(a, b, backend="cuda")
    # with scales the exact integer (2^31 * 1.07 here) is converted to fp32 correctly rounded
    y = int8_matmul(a, b, torch.ones(m, device=DEV), torch.ones(3, device=DEV), backend="cuda").cpu()
    assert (y == float(16384 * k)).all()
    # alternating signs: the exact result fits int32 although the all -128 partial sums would not
    b[:, ::2] = 127
    got = int8_matmul(a, b, backend="cuda").cpu()
    assert (got == (k // 2) * (-128 * 127) + (k // 2) * 16384).all()


@pytest.mark.parametrize("m", [3, 40])
def test_large_k_random_with_scales(m):
    k = 150_001  # odd: the byte loaders
    a, b = rand_i8(m, k), rand_i8(5, k)
    sa, sb = torch.rand(m), torch.rand(5)
    y = int8_matmul(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), backend="cuda").cpu()
    assert torch.equal(y, int8_matmul(a, b, sa, sb, backend="reference"))


# ----------------------------------------------------------------------------- epilogue
@pytest.mark.parametrize("m", [5, 130])
@pytest.mark.parametrize("n", [131, 128])  # odd N: scalar stores; even N: paired stores
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_epilogue_matches_reference(m, n, activation, out_dtype, with_bias):
    k = 200
    qa, sa = quantize_rows_int8(torch.randn(m, k) * 3)
    qb, sb = quantize_weight_int8(torch.randn(n, k) / k ** 0.5)
    bias = torch.randn(n) if with_bias else None
    got = int8_matmul(qa.to(DEV), qb.to(DEV), sa.to(DEV), sb.to(DEV), None if bias is None else bias.to(DEV),
                      activation=activation, out_dtype=out_dtype, backend="cuda").cpu()
    ref = int8_matmul(qa, qb, sa, sb, bias, activation=activation, out_dtype=out_dtype, backend="reference")
    assert got.dtype == out_dtype and got.shape == (m, n)
    if activation in ("none", "relu"):
        assert torch.equal(got, ref)
    else:  # erff / expf against the CPU's vectorised versions: an ulp or two of fp32, then one rounding
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 * torch.finfo(out_dtype).eps, atol=1e-6)


def test_nan_bias_propagates_through_relu():
    qa, sa = quantize_rows_int8(torch.randn(3, 32))
    qb, sb = quantize_weight_int8(torch.randn(4, 32))
    bias = torch.tensor([0.0, float("nan"), 1.0, -1e9])
    got = int8_matmul(qa.to(DEV), qb.to(DEV), sa.to(DEV), sb.to(DEV), bias.to(DEV), activation="relu",
                      backend="cuda").cpu()
    assert torch.isnan(got[:, 1]).all() and (got[:, 3] == 0).all()


# ----------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (33, 7), (5, 128), (300, 1000), (2, 4099)])
def test_quantize_bit_for_bit(dtype, shape):
    x = (torch.randn(shape) * torch.rand(shape[0], 1) * 10).to(dtype)
    q, s = quantize_rows_int8(x.to(DEV), backend="cuda")
    q_ref, s_ref = quantize_rows_int8(x, backend="reference")
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)
    qm, sm = quantize_rows_int8(x.to(DEV)[:, :-1] if shape[1] > 1 else x.to(DEV), backend="cuda")  # strided
    qr, sr = quantize_rows_int8(x[:, :-1] if shape[1] > 1 else x, backend="reference")
    assert torch.equal(qm.cpu(), qr) and torch.equal(sm.cpu(), sr)


def test_quantize_non_finite_names_the_row():
    x = torch.randn(50, 40)
    x[31, 3] = float("inf")
    x[45, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*row 31"):
        quantize_rows_int8(x.to(DEV), backend="cuda")


# ----------------------------------------------------------------------------- int8_linear
@pytest.mark.parametrize("m", [1, 7, 16, 17, 300])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_dynamic_is_quantize_then_matmul(m, x_dtype):
    k, n = 320, 96
    x = (torch.randn(m, k) * 2).to(x_dtype)
    wq, ws = quantize_weight_int8(torch.randn(n, k))
    bias = torch.randn(n)
    got = int8_linear(x.to(DEV), wq.to(DEV), ws.to(DEV), bias.to(DEV), activation="relu", backend="cuda").cpu()
    ref = int8_linear(x, wq, ws, bias, activation="relu", backend="reference")
    assert got.dtype == x_dtype
    assert torch.equal(got, ref)  # quantization and relu epilogue are bit-exact


@pytest.mark.parametrize("m", [1, 5, 16, 17, 200])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 67])
def test_linear_weight_only(m, x_dtype, k):
    n = 129
    x = torch.randn(m, k).to(x_dtype)
    wq, ws = quantize_weight_int8(torch.randn(n, k))
    bias = torch.randn(n)
    got = int8_linear(x.to(DEV), wq.to(DEV), ws.to(DEV), bias.to(DEV), activation="silu", act_quant="none",
                      out_dtype=torch.float32, backend="cuda").cpu()
    exp = F.silu(x.double() @ (wq.double() * ws.double()[:, None]).T + bias.double())
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)


def test_linear_weight_only_nan_propagates_and_bad_scale_raises():
    wq, ws = quantize_weight_int8(torch.randn(3, 16))
    x = torch.randn(2, 16)
    x[0, 5] = float("nan")
    y = int8_linear(x.to(DEV), wq.to(DEV), ws.to(DEV), act_quant="none", backend="cuda").cpu()
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    with pytest.raises(ValueError, match="non-finite"):
        int8_linear(x.to(DEV), wq.to(DEV), ws.to(DEV), backend="cuda")
    bad = ws.clone()
    bad[2] = float("inf")
    for act_quant in ("dynamic", "none"):
        with pytest.raises(ValueError, match="weight_scale"):
            int8_linear(x.to(DEV), wq.to(DEV), bad.to(DEV), act_quant=act_quant, backend="cuda")


def test_non_finite_scales_name_the_argument():
    a, b = rand_i8(20, 8).to(DEV), rand_i8(4, 8).to(DEV)
    sa, sb = torch.ones(20, device=DEV), torch.ones(4, device=DEV)
    bad_a, bad_b = sa.clone(), sb.clone()
    bad_a[7], bad_b[2] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match="a_scale"):
        int8_matmul(a, b, bad_a, bad_b, backend="cuda")  # a_scale is reported first
    with pytest.raises(ValueError, match="b_scale"):
        int8_matmul(a, b, sa, bad_b, backend="cuda")
    with pytest.raises(ValueError, match="b_scale"):
        int8_matmul(a[:0], b, sa[:0], bad_b, backend="cuda")  # even when M = 0, as the reference
