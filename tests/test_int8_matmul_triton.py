"""The Triton backend of the int8 matmul family against the reference: what tests/test_int8_matmul.py's
backend matrix does not cover (K not a multiple of the block, several tiles and the grouped
order, the chunked big-K accumulation with scales, the two-pass quantization of long rows, value
checks through the triton ops, the check ops, compile). Runs on CUDA tensors, and on CPU tensors
under TRITON_INTERPRET=1 (set by conftest.py without a GPU): shapes are kept small."""
import pytest
import torch
import torch.nn.functional as F

from recsys_kernels import _backend
from recsys_kernels.ops import int8_matmul_triton  # noqa: F401 - registers the triton backend
from recsys_kernels.ops.int8_matmul import int8_linear, int8_matmul, quantize_rows_int8, quantize_weight_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in _backend.available_backends("int8_matmul", DEVICE),
    reason=f"the triton backend cannot run on {DEVICE}: {_backend.availability('int8_matmul')['triton']}")
ACTS = ("none", "relu", "gelu", "silu")


def _rand_i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def _rel(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- int32 GEMM
@pytest.mark.parametrize("m,n,k", [(1, 1, 37), (1, 5, 129), (3, 1, 129), (2, 3, 0), (1, 1, 1),
                                   (70, 40, 37), (5, 66, 129), (2, 3, 2100)])
def test_exact_int32_any_shape(m, n, k):
    # (70, 40): several tiles in both directions (grouped order); K = 2100: several K steps with
    # a masked tail under the interpreter's blocks as well as a GPU's
    a, b = _rand_i8(m, k), _rand_i8(n, k)
    got = int8_matmul(a.to(DEVICE), b.to(DEVICE), backend="triton")
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.cpu(), (a.long() @ b.long().T).int())


def test_exact_int32_extremes():
    # every product at its extreme: -128 * -128 and -128 * 127, summed exactly
    k = 1000
    a = torch.full((3, k), -128, dtype=torch.int8)
    b = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8)])
    got = int8_matmul(a.to(DEVICE), b.to(DEVICE), backend="triton").cpu()
    assert got.tolist() == [[16384 * k, -16256 * k]] * 3


def test_big_k_scaled_is_exact_sum_then_scales():
    # K > 131071: int32 partial sums are flushed into int64, so the float result is the exact
    # integer sum (2^31 here, not a wrapped int32) rounded once to fp32, then scaled
    k = 131072 + 5
    a = torch.full((1, k), -128, dtype=torch.int8)
    b = torch.stack([a[0], -a[0].clamp(min=-127)])
    sa, sb = torch.tensor([0.5]), torch.tensor([1.0, 2.0])
    got = int8_matmul(a.to(DEVICE), b.to(DEVICE), sa.to(DEVICE), sb.to(DEVICE), backend="triton").cpu()
    exp = int8_matmul(a, b, sa, sb, backend="reference")
    assert exp[0, 0].item() == 16384 * k * 0.5
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- epilogue
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 9, 37), (13, 1, 129), (70, 40, 20), (4, 5, 0)])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_epilogue_matches_reference(m, n, k, activation, with_bias):
    qa, sa = quantize_rows_int8(torch.randn(m, k) * 4)
    qb, sb = quantize_weight_int8(torch.randn(n, k) / max(k, 1) ** 0.5)
    bias = torch.randn(n) if with_bias else None
    args = (qa, qb, sa, sb, bias)
    got = int8_matmul(*(None if t is None else t.to(DEVICE) for t in args), activation=activation,
                      backend="triton").cpu()
    exp = int8_matmul(*args, activation=activation, backend="reference")
    assert got.dtype == torch.float32 and got.shape == (m, n)
    if exp.numel():
        assert _rel(got, exp) <= 1e-5
        # elementwise: within 1e-5 of the pre-activation magnitude
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * exp.abs().max().item() + 1e-30)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_epilogue_half_outputs(out_dtype, activation):
    qa, sa = quantize_rows_int8(torch.randn(9, 50))
    qb, sb = quantize_weight_int8(torch.randn(11, 50) / 7)
    bias = torch.randn(11)
    got = int8_matmul(qa.to(DEVICE), qb.to(DEVICE), sa.to(DEVICE), sb.to(DEVICE), bias.to(DEVICE),
                      activation=activation, out_dtype=out_dtype, backend="triton").cpu()
    exp = int8_matmul(qa, qb, sa, sb, bias, activation=activation, backend="reference")  # fp32
    assert got.dtype == out_dtype
    # the fp32 result rounded once to out_dtype: within one ulp
    torch.testing.assert_close(got.float(), exp, rtol=torch.finfo(out_dtype).eps, atol=1e-5)


# ----------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 1), (3, 37), (70, 129), (2, 9000)])
def test_quantize_bit_identical(dtype, m, k):
    # rows over many magnitudes (tiny, subnormal-scaled, huge); K = 9000 takes the two-pass path
    # under the interpreter's blocks as well as a GPU's
    mags = torch.logspace(-30, 30, m) if dtype == torch.float32 else torch.logspace(-3, 3, m)
    x = (torch.randn(m, k) * mags[:, None]).to(dtype)
    if m > 1:
        x[1] = 0  # an all-zero row
    q, scale = quantize_rows_int8(x.to(DEVICE), backend="triton")
    q_ref, scale_ref = quantize_rows_int8(x, backend="reference")
    assert torch.equal(scale.cpu(), scale_ref)
    assert torch.equal(q.cpu(), q_ref)


def test_quantize_ties_round_to_even():
    # scale 1 (absmax 127): x / scale are exact halves; and halves at a non-trivial scale
    halves = torch.arange(-126, 127, dtype=torch.float32) + 0.5
    x = torch.stack([torch.cat([torch.tensor([127.0]), halves]),
                     torch.cat([torch.tensor([127.0 * 3]), halves * 3])])
    q, scale = quantize_rows_int8(x.to(DEVICE), backend="triton")
    q_ref, scale_ref = quantize_rows_int8(x, backend="reference")
    assert torch.equal(scale.cpu(), scale_ref) and torch.equal(q.cpu(), q_ref)
    assert q[0, 1:].cpu().tolist() == torch.round(halves).int().tolist()


# ----------------------------------------------------------------------------- int8_linear
@pytest.mark.parametrize("act_quant", ["dynamic", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 37, 5), (70, 129, 3), (1, 1, 1)])
def test_linear_matches_reference(act_quant, dtype, m, k, n):
    x = torch.randn(m, k).to(dtype)
    wq, ws = quantize_weight_int8(torch.randn(n, k) / k ** 0.5)
    bias = torch.randn(n)
    got = int8_linear(x.to(DEVICE), wq.to(DEVICE), ws.to(DEVICE), bias.to(DEVICE), activation="silu",
                      act_quant=act_quant, out_dtype=torch.float32, backend="triton").cpu()
    exp = int8_linear(x, wq, ws, bias, activation="silu", act_quant=act_quant, out_dtype=torch.float32,
                      backend="reference")
    # dynamic: the same int8 operands, so only the epilogue rounds differently; weight-only: x @
    # (q * s).T vs (x @ q.T) * s, both fp32 sums
    tol = 1e-5 if act_quant == "dynamic" else 1e-5 * k ** 0.5
    assert _rel(got, exp) <= tol


# ----------------------------------------------------------------------------- value checks
def test_value_errors_like_reference():
    nan_x = torch.tensor([[1.0, float("nan")], [0.0, 1.0]], device=DEVICE)
    with pytest.raises(ValueError, match="quantize_rows_int8: x has non-finite"):
        quantize_rows_int8(nan_x, backend="triton")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows_int8(torch.tensor([[-float("inf")]], dtype=torch.float16, device=DEVICE), backend="triton")
    a, b = _rand_i8(2, 4).to(DEVICE), _rand_i8(3, 4).to(DEVICE)
    ones2, ones3 = torch.ones(2, device=DEVICE), torch.ones(3, device=DEVICE)
    bad3 = torch.tensor([1.0, float("inf"), 1.0], device=DEVICE)
    with pytest.raises(ValueError, match="b_scale has non-finite"):
        int8_matmul(a, b, ones2, bad3, backend="triton")
    with pytest.raises(ValueError, match="a_scale has non-finite"):  # a_scale first, as the reference
        int8_matmul(a, b, ones2 * float("nan"), bad3, backend="triton")
    x = torch.randn(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="weight_scale has non-finite"):  # before x, as the reference
        int8_linear(nan_x.repeat(1, 2), b, bad3, backend="triton")
    with pytest.raises(ValueError, match="weight_scale has non-finite"):
        int8_linear(x, b, bad3, act_quant="none", backend="triton")
    with pytest.raises(ValueError, match="quantize_rows_int8: x has non-finite"):
        int8_linear(nan_x.repeat(1, 2), b, ones3, backend="triton")
    # weight-only lets NaN through, like F.linear
    y = int8_linear(nan_x.repeat(1, 2), b, ones3, act_quant="none", backend="triton").cpu()
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


def test_overflow_check_op():
    ok = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert int8_matmul_triton.CHECK_OVERFLOW(ok).numel() == 0
    with pytest.raises(ValueError, match="does not fit in int32"):
        int8_matmul_triton.CHECK_OVERFLOW(ok + 1)


# ----------------------------------------------------------------------------- opcheck / compile
def test_opcheck_check_ops():
    x = torch.randn(3, 5, device=DEVICE)
    torch.library.opcheck(torch.ops.recsys_kernels.int8_triton_check_finite.default,
                          ([x, torch.ones(2, device=DEVICE)], "x;s"))
    torch.library.opcheck(torch.ops.recsys_kernels.int8_triton_check_overflow.default,
                          (torch.zeros(1, dtype=torch.int32, device=DEVICE),))


def test_opcheck_big_k_and_empty():
    a = _rand_i8(1, 131073).to(DEVICE)
    torch.library.opcheck(torch.ops.recsys_kernels.int8_matmul_triton.default,
                          (a, a[:, :].clone(), None, None, None, "none", None))
    torch.library.opcheck(torch.ops.recsys_kernels.int8_matmul_triton.default,
                          (_rand_i8(0, 3).to(DEVICE), _rand_i8(2, 3).to(DEVICE), torch.ones(0, device=DEVICE),
                           torch.ones(2, device=DEVICE), None, "gelu", torch.float16))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    wq, ws = quantize_weight_int8(torch.randn(6, 10))
    wq, ws, bias = wq.to(DEVICE), ws.to(DEVICE), torch.randn(6, device=DEVICE)

    @torch.compile(fullgraph=True, backend=compile_backend)
    def f(x):
        q, s = quantize_rows_int8(x.reshape(-1, 10), backend="triton")
        exact = int8_matmul(q, wq, backend="triton")
        scaled = int8_matmul(q, wq, s, ws, bias, activation="relu", out_dtype=torch.bfloat16, backend="triton")
        dyn = int8_linear(x, wq, ws, bias, activation="gelu", backend="triton")
        wo = int8_linear(x, wq, ws, act_quant="none", backend="triton")
        return q, s, exact, scaled, dyn, wo

    x = torch.randn(2, 3, 10, device=DEVICE)
    got = f(x)
    q, s = quantize_rows_int8(x.reshape(-1, 10), backend="reference")
    exp = (q, s, int8_matmul(q, wq, backend="reference"),
           int8_matmul(q, wq, s, ws, bias, activation="relu", out_dtype=torch.bfloat16, backend="reference"),
           int8_linear(x, wq, ws, bias, activation="gelu", backend="reference"),
           int8_linear(x, wq, ws, act_quant="none", backend="reference"))
    for g, e in zip(got[:3], exp[:3]):
        assert torch.equal(g, e)
    for g, e in zip(got[3:], exp[3:]):
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-2 if g.dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-5)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):  # the value checks survive compilation
        f(bad)


# ----------------------------------------------------------------------------- GPU codegen
def _codegen_checks():
    """Compile the kernels for sm_90 (Triton -> PTX -> ptxas cubin; no GPU needed) and check the
    instructions the design relies on. Runs in a fresh process without TRITON_INTERPRET: once
    Triton is imported in interpreter mode its code generator is not usable."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from recsys_kernels._triton import int8_matmul as k
    assert not k.interpreted()

    def compile_ptx(fn, sig, consts, warps, stages):
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)  # what the JIT infers
                 if (sig[n].startswith("*") or n in ("N", "K")) and n != "TOKEN"}
        sig = {**sig, **{name: "constexpr" for name in consts}}
        return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages)).asm["ptx"]

    # quantize, the two-pass path and one-element rows: correctly rounded division, the rounding
    # add pair kept
    for k_len in (9000, 1):
        cfg = k.quantize_config(k_len, True)
        warps = cfg.pop("num_warps")
        ptx = compile_ptx(k._quantize_rows_kernel, {"X": "*bf16", "Q": "*i8", "SCALE": "*fp32", "TOKEN": "*fp32",
                                                    "M": "i32", "K": "i32"}, cfg, warps, 1)
        assert "div.rn.f32" in ptx and "0f4B400000" in ptx and "0fCB400000" in ptx

    # the GEMM, big-K variants (int64 flush; the overflow flag): int8 wgmma, pipelined, no spills
    gemm = {"A": "*i8", "B": "*i8", "C": "*bf16", "A_SCALE": "*fp32", "B_SCALE": "*fp32", "BIAS": "*fp32",
            "OVERFLOW": "*i32", "TOKEN": "*fp32", "M": "i32", "N": "i32", "K": "i32", "m_bucket": "i32"}
    config = k._GEMM_CONFIGS[2]
    for scaled, out in ((True, "*bf16"), (False, "*i32")):
        ptx = compile_ptx(k._int8_gemm_kernel, {**gemm, "C": out},
                          dict(HAS_SCALES=scaled, HAS_BIAS=scaled, ACT=2 if scaled else 0, BIG_K=True,
                               BF16_RNE_BY_HAND=False, **config.kwargs), config.num_warps, config.num_stages)
        assert "wgmma.mma_async.sync.aligned" in ptx and ".s32.s8.s8" in ptx
        assert "cp.async" in ptx and ".local" not in ptx

    # weight-only with bf16 x: a bf16 tensor-core dot
    config = k._WEIGHT_ONLY_CONFIGS[0]
    ptx = compile_ptx(k._weight_only_kernel, {"X": "*bf16", "W": "*i8", "C": "*bf16", "W_SCALE": "*fp32",
                                              "BIAS": "*fp32", "TOKEN": "*fp32", "M": "i32", "N": "i32",
                                              "K": "i32", "m_bucket": "i32"},
                      dict(HAS_BIAS=True, ACT=3, DOT_FP32=False, BF16_RNE_BY_HAND=False, **config.kwargs),
                      config.num_warps, config.num_stages)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx


def test_kernels_compile_for_sm90():
    """Catches what the interpreter accepts and the compiler does not (non-constexpr globals, dot
    shapes and dtypes) on machines without a GPU; see _codegen_checks."""
    import os
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_int8_matmul_triton as t; t._codegen_checks()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
