import numpy as np
import pytest
import torch
import torch.nn.functional as F

import recsys_kernels
from recsys_kernels.ops.int8_matmul import (int8_linear, int8_matmul, quantize_rows_int8,
                                            quantize_weight_int8)
from helpers import backend_params

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
ACTS = {"none": lambda t: t, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu}


def _op(name: str, backend: str):
    """The torch op a backend runs, for opcheck."""
    suffix = {"reference": "_reference", "triton": "_triton"}.get(backend, "")
    return getattr(torch.ops.recsys_kernels, name + suffix).default


def _rand_i8(*shape, low=-128, high=127):
    return torch.randint(low, high + 1, shape, dtype=torch.int8)


def _naive_quantize(x: torch.Tensor):
    """Row by row in numpy float32: scale = absmax / 127 (1 if 0), q = rint(x / scale) clipped."""
    xs = x.float().numpy()
    q = np.zeros(xs.shape, dtype=np.int8)
    scales = np.ones(xs.shape[0], dtype=np.float32)
    for m, row in enumerate(xs):
        absmax = np.float32(np.abs(row).max()) if row.size else np.float32(0)
        scale = absmax / np.float32(127)
        scale = np.float32(1) if scale == 0 else scale
        q[m] = np.clip(np.rint(row / scale), -127, 127).astype(np.int8)  # rint: ties to even
        scales[m] = scale
    return torch.from_numpy(q), torch.from_numpy(scales)


def _rel(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_reference_schemas_match_native():
    for name in ("quantize_rows_int8", "int8_matmul", "int8_linear"):
        ref = str(getattr(torch.ops.recsys_kernels, f"{name}_reference").default._schema)
        native = str(getattr(torch.ops.recsys_kernels, name).default._schema)
        assert ref.replace(f"{name}_reference", name) == native


# ----------------------------------------------------------------------------- quantize_rows_int8
@pytest.mark.parametrize("device,backend", backend_params("quantize_rows_int8"))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 130), (0, 5), (4, 0)])
def test_quantize_rows_matches_naive(device, backend, dtype, shape):
    x = (torch.randn(shape) * torch.rand(shape[0], 1) * 10).to(dtype)
    q, scale = quantize_rows_int8(x.to(device), backend=backend)
    q_exp, scale_exp = _naive_quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == shape and scale.shape == (shape[0],)
    assert torch.equal(q.cpu(), q_exp)
    assert torch.equal(scale.cpu(), scale_exp)
    # q * scale is within half a step of x
    assert ((q.cpu().float() * scale_exp[:, None] - x.float()).abs() <= scale_exp[:, None] * 0.5001).all()


@pytest.mark.parametrize("device,backend", backend_params("quantize_rows_int8"))
def test_quantize_rows_edge_cases(device, backend):
    x = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],           # zero row: scale 1, codes 0
        [127.0, 0.5, 1.5, 2.5, -0.5, -1.5],       # scale 1: ties round to even
        [-3.0, 3.0, 1.0, -1.0, 0.0, 2.0],         # +-absmax -> +-127
        [1e-44, -1e-44, 0.0, 0.0, 0.0, 0.0],      # absmax / 127 underflows to 0: scale 1
        [-5.0, 0.0, 0.0, 0.0, 0.0, 0.0],          # a negative absmax -> -127
    ])
    q, scale = quantize_rows_int8(x.to(device), backend=backend)
    q, scale = q.cpu(), scale.cpu()
    assert scale[0] == 1 and (q[0] == 0).all()
    assert scale[1] == 1 and q[1].tolist() == [127, 0, 2, 2, 0, -2]
    assert scale[2] == torch.tensor(3.0) / 127 and q[2, 0] == -127 and q[2, 1] == 127
    assert q[2, 2:].tolist() == [42, -42, 0, 85]  # 1/(3/127)=42.33 -> 42, 2/(3/127)=84.67 -> 85
    assert scale[3] == 1 and (q[3] == 0).all()
    assert q[4, 0] == -127 and scale[4] == torch.tensor(5.0) / 127
    assert q.min() >= -127  # -128 is never produced


def test_quantize_weight_is_the_rows_rule():
    w = torch.randn(9, 21)
    qw, sw = quantize_weight_int8(w)
    qx, sx = quantize_rows_int8(w)
    assert torch.equal(qw, qx) and torch.equal(sw, sx)


# ----------------------------------------------------------------------------- int8_matmul
SHAPES = [(1, 1, 1), (1, 7, 129), (13, 1, 67), (0, 5, 3), (5, 0, 3), (4, 3, 0), (17, 19, 1031)]


@pytest.mark.parametrize("device,backend", backend_params("int8_matmul"))
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("out_dtype", [None, torch.int32])
def test_int8_matmul_exact_int32(device, backend, m, n, k, out_dtype):
    a = _rand_i8(m, k)
    b = _rand_i8(n, k)  # full int8 range, -128 included
    got = int8_matmul(a.to(device), b.to(device), out_dtype=out_dtype, backend=backend)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.cpu(), (a.long() @ b.long().T).int())


@pytest.mark.parametrize("device,backend", backend_params("int8_matmul"))
def test_int8_matmul_extremes_and_overflow(device, backend):
    k = 131071  # the largest K for which no int8 inputs can overflow int32
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8)])
    got = int8_matmul(a.to(device), b.to(device), backend=backend).cpu()
    assert got.tolist() == [[16384 * k, -16256 * k]] * 2
    # one more -128 * -128 term: 2^31 does not fit in int32 -> an error, not a wrapped value
    a1 = torch.full((1, k + 1), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match="int32"):
        int8_matmul(a1.to(device), a1.to(device), backend=backend)
    # but a large K whose result fits is fine
    b1 = a1.clone()
    b1[0, ::2] = 127
    b1[0, 1::2] = -128
    got = int8_matmul(a1.to(device), b1.to(device), backend=backend).cpu()
    assert got.item() == ((k + 1) // 2) * (-128 * 127) + ((k + 1) // 2) * 16384


@pytest.mark.parametrize("device,backend", backend_params("int8_matmul"))
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (9, 13, 67), (1, 33, 200), (0, 4, 5), (3, 4, 0)])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_matmul_scaled_fp32(device, backend, m, n, k, activation, with_bias):
    qa, sa = quantize_rows_int8(torch.randn(m, k) * 3)
    qb, sb = quantize_weight_int8(torch.randn(n, k) / k ** 0.5)
    bias = torch.randn(n) if with_bias else None
    got = int8_matmul(qa.to(device), qb.to(device), sa.to(device), sb.to(device),
                      None if bias is None else bias.to(device), activation=activation, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # the float reference from the same quantized operands, in fp64
    exp = (qa.double() @ qb.double().T) * sa.double()[:, None] * sb.double()[None, :]
    if bias is not None:
        exp = exp + bias.double()
    # gelu/silu have slopes <= 1.13: an error relative to the pre-activation scale stays one after
    # them (but not relative to a tiny output, e.g. gelu of a very negative value)
    atol = 1e-5 * (exp.abs().max().item() if exp.numel() else 1.0)
    exp = ACTS[activation](exp)
    torch.testing.assert_close(got.cpu().double(), exp, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("device,backend", backend_params("int8_matmul"))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_matmul_out_dtype(device, backend, out_dtype):
    qa, sa = quantize_rows_int8(torch.randn(6, 40))
    qb, sb = quantize_weight_int8(torch.randn(10, 40))
    bias = torch.randn(10)
    got = int8_matmul(qa.to(device), qb.to(device), sa.to(device), sb.to(device), bias.to(device),
                      activation="silu", out_dtype=out_dtype, backend=backend).cpu()
    assert got.dtype == out_dtype
    exp = F.silu((qa.double() @ qb.double().T) * sa.double()[:, None] * sb.double() + bias.double())
    eps = torch.finfo(out_dtype).eps
    torch.testing.assert_close(got.double(), exp, rtol=max(2 * eps, 1e-5), atol=1e-5 + eps)


# ----------------------------------------------------------------------------- int8_linear
@pytest.mark.parametrize("device,backend", backend_params("int8_linear"))
@pytest.mark.parametrize("act_quant", ["dynamic", "none"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_linear_close_to_float_linear(device, backend, act_quant, activation, dtype):
    x = torch.randn(2, 7, 96).to(dtype)  # 3-D x
    w = torch.randn(33, 96) / 96 ** 0.5
    bias = torch.randn(33) * 0.1
    wq, ws = quantize_weight_int8(w)
    got = int8_linear(x.to(device), wq.to(device), ws.to(device), bias.to(device),
                      activation=activation, act_quant=act_quant, backend=backend).cpu()
    assert got.dtype == dtype and got.shape == (2, 7, 33)
    exp = ACTS[activation](F.linear(x.float(), w, bias))
    assert _rel(got, exp) <= 2e-2


@pytest.mark.parametrize("device,backend", backend_params("int8_linear"))
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 67, 9), (1, 200, 31), (0, 8, 3), (3, 0, 4)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("x_dtype", FLOATS)
def test_int8_linear_dynamic_is_quantize_then_matmul(device, backend, m, k, n, activation, x_dtype):
    x = (torch.randn(m, k) * 2).to(x_dtype).to(device)
    wq, ws = quantize_weight_int8(torch.randn(n, k))
    wq, ws, bias = wq.to(device), ws.to(device), torch.randn(n, device=device)
    got = int8_linear(x, wq, ws, bias, activation=activation, backend=backend)
    assert got.dtype == x_dtype and got.shape == (m, n)
    qx, sx = quantize_rows_int8(x, backend="reference")
    exp = int8_matmul(qx, wq, sx, ws, bias, activation=activation, out_dtype=x_dtype, backend="reference")
    if backend == "reference":
        assert torch.equal(got, exp)  # the specification, exactly
    else:
        torch.testing.assert_close(got.float(), exp.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("int8_linear"))
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 67, 9), (0, 8, 3), (3, 0, 4)])
def test_int8_linear_weight_only_matches_dequantized(device, backend, m, k, n):
    x = torch.randn(m, k)
    wq, ws = quantize_weight_int8(torch.randn(n, k))
    bias = torch.randn(n)
    got = int8_linear(x.to(device), wq.to(device), ws.to(device), bias.to(device), act_quant="none",
                      activation="relu", backend=backend).cpu()
    exp = torch.relu(x.double() @ (wq.double() * ws.double()[:, None]).T + bias.double())
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("int8_linear"))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(12,), (3, 12), (2, 0, 12), (2, 3, 4, 12)])
def test_int8_linear_shapes_and_out_dtype(device, backend, out_dtype, x_shape):
    x = torch.randn(x_shape, dtype=torch.bfloat16)
    wq, ws = quantize_weight_int8(torch.randn(5, 12))
    got = int8_linear(x.to(device), wq.to(device), ws.to(device), out_dtype=out_dtype, backend=backend)
    assert got.dtype == out_dtype and got.shape == x_shape[:-1] + (5,) and got.is_contiguous()
    exp = int8_linear(x.reshape(-1, 12), wq, ws, out_dtype=torch.float32, backend="reference")
    # the fp32 result rounded once to out_dtype: within half an ulp
    torch.testing.assert_close(got.cpu().float(), exp.reshape(got.shape), rtol=torch.finfo(out_dtype).eps, atol=1e-5)


def test_int8_linear_nan_with_weight_only_propagates():
    wq, ws = quantize_weight_int8(torch.randn(3, 4))
    x = torch.tensor([[1.0, float("nan"), 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    y = int8_linear(x, wq, ws, act_quant="none")
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


# ----------------------------------------------------------------------------- autograd policy
def test_inference_only_under_grad_and_no_grad():
    wq, ws = quantize_weight_int8(torch.randn(4, 6))
    x = torch.randn(3, 6, requires_grad=True)
    with torch.no_grad():
        y = int8_linear(x, wq, ws)
    assert not y.requires_grad
    qx, sx = quantize_rows_int8(x.detach())
    for fn in (lambda: int8_linear(x, wq, ws).sum(),
               lambda: quantize_rows_int8(x)[1].sum(),
               lambda: int8_matmul(qx, wq, sx, ws, torch.zeros(4, requires_grad=True)).sum()):
        out = fn()
        with pytest.raises(RuntimeError, match="inference-only"):
            out.backward()


# ----------------------------------------------------------------------------- opcheck / compile
def _opcheck_cases():
    qa, sa = quantize_rows_int8(torch.randn(5, 19))
    qb, sb = quantize_weight_int8(torch.randn(7, 19))
    x = torch.randn(5, 19)
    return {
        "quantize_rows_int8": [(x,), (x.half(),), (torch.zeros(0, 3),)],
        "int8_matmul": [(qa, qb, None, None, None, "none", None),
                        (qa, qb, sa, sb, torch.randn(7), "gelu", torch.bfloat16),
                        (qa, qb, sa, sb, None, "relu", None)],
        "int8_linear": [(x, qb, sb, torch.randn(7), "silu", "dynamic", None),
                        (x.bfloat16(), qb, sb, None, "none", "none", torch.float32),
                        (x[:0], qb, sb, None, "relu", "dynamic", None)],
    }


@pytest.mark.parametrize("name,device,backend", [
    pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks)
    for name in ("quantize_rows_int8", "int8_matmul", "int8_linear") for p in backend_params(name)])
def test_opcheck(name, device, backend):
    for args in _opcheck_cases()[name]:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(_op(name, backend), args)


def test_compile_fullgraph():
    wq, ws = quantize_weight_int8(torch.randn(6, 10))
    bias = torch.randn(6)

    def linear(x):
        return int8_linear(x, wq, ws, bias, activation="gelu", backend="reference")

    def matmul(a, b, sa, sb):
        return int8_matmul(a, b, backend="reference"), int8_matmul(a, b, sa, sb, activation="relu",
                                                                    backend="reference")

    x = torch.randn(2, 3, 10)
    assert torch.equal(torch.compile(linear, fullgraph=True)(x), linear(x))
    qa, sa = quantize_rows_int8(torch.randn(3, 10))
    compiled = torch.compile(matmul, fullgraph=True)(qa, wq, sa, ws)
    for c, e in zip(compiled, matmul(qa, wq, sa, ws)):
        assert torch.equal(c, e)
    q = torch.compile(lambda t: quantize_rows_int8(t, backend="reference"), fullgraph=True)(x[0])
    assert all(torch.equal(c, e) for c, e in zip(q, quantize_rows_int8(x[0])))


# ----------------------------------------------------------------------------- bad input
_A, _B = _rand_i8(3, 8), _rand_i8(4, 8)
_SA, _SB = torch.rand(3) + 0.1, torch.rand(4) + 0.1
_X = torch.randn(3, 8)
_WQ, _WS = quantize_weight_int8(torch.randn(4, 8))


@pytest.mark.parametrize("call,exc,match", [
    # quantize_rows_int8 / quantize_weight_int8
    (lambda: quantize_rows_int8([[1.0]]), TypeError, "x"),
    (lambda: quantize_rows_int8(torch.ones(3, 3, dtype=torch.int32)), TypeError, "x"),
    (lambda: quantize_rows_int8(torch.ones(3, 3, dtype=torch.float64)), TypeError, "x"),
    (lambda: quantize_rows_int8(torch.ones(3)), ValueError, "x"),
    (lambda: quantize_rows_int8(torch.ones(2, 3, 3)), ValueError, "x"),
    (lambda: quantize_rows_int8(torch.tensor([[1.0, float("nan")]])), ValueError, "non-finite"),
    (lambda: quantize_rows_int8(torch.tensor([[1.0, float("inf")]])), ValueError, "non-finite"),
    (lambda: quantize_rows_int8(torch.tensor([[1.0], [-float("inf")]], dtype=torch.float16)), ValueError, "non-finite"),
    (lambda: quantize_weight_int8(torch.ones(3)), ValueError, "weight"),
    (lambda: quantize_weight_int8(torch.ones(3, 3, dtype=torch.int8)), TypeError, "weight"),
    # int8_matmul
    (lambda: int8_matmul(_A.float(), _B), TypeError, "a_q"),
    (lambda: int8_matmul(_A[0], _B), ValueError, "a_q"),
    (lambda: int8_matmul(_A, _B.to(torch.uint8)), TypeError, "b_q"),
    (lambda: int8_matmul(_A, _B[None]), ValueError, "b_q"),
    (lambda: int8_matmul(_A, _B[:, :7]), ValueError, "K"),
    (lambda: int8_matmul(_A, _B, _SA), ValueError, "b_scale"),
    (lambda: int8_matmul(_A, _B, None, _SB), ValueError, "a_scale"),
    (lambda: int8_matmul(_A, _B, _SA.half(), _SB), TypeError, "a_scale"),
    (lambda: int8_matmul(_A, _B, _SA[:2], _SB), ValueError, "a_scale"),
    (lambda: int8_matmul(_A, _B, _SA[None], _SB), ValueError, "a_scale"),
    (lambda: int8_matmul(_A, _B, _SA, _SB.double()), TypeError, "b_scale"),
    (lambda: int8_matmul(_A, _B, _SA, _SB[:3]), ValueError, "b_scale"),
    (lambda: int8_matmul(_A, _B, _SA, _SB.clone().fill_(float("nan"))), ValueError, "b_scale"),
    (lambda: int8_matmul(_A, _B, torch.tensor([1.0, float("inf"), 1.0]), _SB), ValueError, "a_scale"),
    (lambda: int8_matmul(_A, _B, bias=torch.ones(4)), ValueError, "bias"),
    (lambda: int8_matmul(_A, _B, activation="relu"), ValueError, "activation"),
    (lambda: int8_matmul(_A, _B, _SA, _SB, activation="tanh"), ValueError, "activation"),
    (lambda: int8_matmul(_A, _B, _SA, _SB, torch.ones(5)), ValueError, "bias"),
    (lambda: int8_matmul(_A, _B, _SA, _SB, torch.ones(4, dtype=torch.int32)), TypeError, "bias"),
    (lambda: int8_matmul(_A, _B, out_dtype=torch.float32), TypeError, "out_dtype"),
    (lambda: int8_matmul(_A, _B, _SA, _SB, out_dtype=torch.int32), TypeError, "out_dtype"),
    (lambda: int8_matmul(_A, _B, _SA, _SB, out_dtype="float16"), TypeError, "out_dtype"),
    (lambda: int8_matmul(_A, _B.to("meta")), ValueError, "device"),
    (lambda: int8_matmul(_A, _B, backend="fast"), ValueError, "backend"),
    (lambda: int8_matmul(_A, _B, backend="cuda"), recsys_kernels.BackendUnavailableError, "cuda"),
    # int8_linear
    (lambda: int8_linear(_X.long(), _WQ, _WS), TypeError, "x"),
    (lambda: int8_linear(_X.double(), _WQ, _WS), TypeError, "x"),
    (lambda: int8_linear(torch.tensor(1.0), _WQ, _WS), ValueError, "x"),
    (lambda: int8_linear(_X[:, :7], _WQ, _WS), ValueError, "x"),
    (lambda: int8_linear(_X, _WQ.float(), _WS), TypeError, "weight_q"),
    (lambda: int8_linear(_X, _WQ[0], _WS), ValueError, "weight_q"),
    (lambda: int8_linear(_X, _WQ, _WS.half()), TypeError, "weight_scale"),
    (lambda: int8_linear(_X, _WQ, _WS[:3]), ValueError, "weight_scale"),
    (lambda: int8_linear(_X, _WQ, _WS[None]), ValueError, "weight_scale"),
    (lambda: int8_linear(_X, _WQ, torch.full((4,), float("inf"))), ValueError, "weight_scale"),
    (lambda: int8_linear(_X, _WQ, torch.full((4,), float("nan")), act_quant="none"), ValueError, "weight_scale"),
    (lambda: int8_linear(_X, _WQ, _WS, torch.ones(3)), ValueError, "bias"),
    (lambda: int8_linear(_X, _WQ, _WS, torch.ones(4, dtype=torch.int8)), TypeError, "bias"),
    (lambda: int8_linear(_X, _WQ, _WS, activation="gelu_tanh"), ValueError, "activation"),
    (lambda: int8_linear(_X, _WQ, _WS, act_quant="static"), ValueError, "act_quant"),
    (lambda: int8_linear(_X, _WQ, _WS, out_dtype=torch.int32), TypeError, "out_dtype"),
    (lambda: int8_linear(torch.tensor([[float("nan")] * 8]), _WQ, _WS), ValueError, "non-finite"),
    (lambda: int8_linear(_X, _WQ, _WS.to("meta")), ValueError, "device"),
    (lambda: int8_linear(_X, _WQ, _WS, backend="cpu_fast"), ValueError, "backend"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("device,backend", backend_params("int8_linear"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_x_raises_with_no_output_columns(device, backend, dtype):
    # N = 0: nothing to multiply, but dynamic quantization still meets the NaN (the C++ kernels
    # returned an empty result where the reference raised)
    x = torch.tensor([[float("nan"), 1.0]], dtype=dtype, device=device)
    wq, ws = torch.zeros(0, 2, dtype=torch.int8, device=device), torch.zeros(0, device=device)
    with pytest.raises(ValueError, match="x has non-finite values"):
        int8_linear(x, wq, ws, backend=backend)
    assert int8_linear(x, wq, ws, act_quant="none", backend=backend).shape == (1, 0)
    assert int8_linear(x[:0], wq, ws, backend=backend).shape == (0, 0)
