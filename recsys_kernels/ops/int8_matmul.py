"""Int8 matmul: per-row symmetric int8 quantization, the int8 GEMM with a fused dequant + bias +
activation epilogue, and the int8 Linear that puts them together (DESIGN.md §4).

Quantization (activations per row, nn.Linear weights per output channel -- the same rule):
    scale[m] = absmax(x[m, :]) / 127, or 1.0 where that is 0 (an all-zero row, or a row so tiny
               that absmax / 127 underflows to 0 in fp32)
    q[m, k]  = clamp(round_half_to_even(x[m, k] / scale[m]), -127, 127)     (fp32 division)
so q * scale reproduces x to within half a step and -128 is never produced. Non-finite x raises.

int8_matmul(a [M, K] int8, b [N, K] int8) computes a @ b.T (b in nn.Linear weight layout):
  * without scales: the exact integer result as int32, bit for bit. A result that does not fit in
    int32 raises ValueError (only possible for K > 131071) instead of wrapping silently.
  * with scales (a_scale [M], b_scale [N], fp32): in fp32, y = (acc * a_scale[m]) * b_scale[n]
    + bias[n], then the activation, then the cast to out_dtype (default fp32). `acc` is the exact
    integer dot product (kernels must not let an int32 accumulator wrap: for K > 131071 they
    accumulate in chunks). Activations: "none", "relu", "gelu" (the exact erf form,
    F.gelu(approximate="none")), "silu".

int8_linear(x [..., K] float, weight_q [N, K], weight_scale [N]) -> [..., N]:
  * act_quant="dynamic": quantize x per row (the rule above) inside the op, then int8_matmul's
    GEMM and epilogue. The reference is exactly
    int8_matmul(*quantize_rows_int8(x) ..., weight_q, sx, weight_scale, bias, activation).
  * act_quant="none": weight-only; y = x @ (weight_q * weight_scale[:, None]).T in fp32, + bias,
    then the activation. Non-finite x propagates as in F.linear (nothing is quantized).
  Output dtype: out_dtype, default x's dtype. The op itself takes a 2-D x; the front door
  flattens the leading dims.

int8_linear_packed(x, packed_weight, weight_scale, ...): int8_linear with the weight prepacked once
by `pack_weight_int8` into the CPU kernels' layout (16-column panels of int8 K-pairs:
packed[j, 32 p + 16 h + 2 c + t] = weight_q[16 j + 8 h + c, 2 p + t], zero past N and K), so that a
layer does not repack its weight on every call. Same semantics as int8_linear on the unpacked
weight; Int8Linear uses it on the CPU. The packed tensor's shape fixes N only up to a multiple
of 16 (N is taken from weight_scale) and K up to its parity (the front door checks K against
`in_features`): a scale vector of another layer of the same padded N is not detectable.

No autograd: these are inference ops (quantization is not differentiable). They run on inputs
that require grad, but backward through them raises a RuntimeError saying so; call them under
torch.no_grad() / torch.inference_mode(), or keep the float nn.Linear for training.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from . import _common

ACTIVATIONS = ("none", "relu", "gelu", "silu")
ACT_QUANTS = ("dynamic", "none")
QMAX = 127
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


# ----------------------------------------------------------------------------- reference
def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """The quantization rule of the module docstring, shared by every reference below."""
    xf = x.float()  # fp16/bf16 -> fp32 is exact
    if not bool(torch.isfinite(xf).all()):
        raise ValueError("quantize_rows_int8: x has non-finite values (inf or nan)")
    m, k = xf.shape
    absmax = xf.abs().amax(dim=1) if k > 0 else xf.new_zeros(m)  # amax of an empty row raises
    # a tensor divisor: a Python-scalar divisor may become a multiply by its reciprocal on CUDA,
    # one ulp off the fp32 division every kernel does
    scale = absmax / torch.full_like(absmax, QMAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(xf / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _apply_activation(y: Tensor, activation: str) -> Tensor:
    if activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)  # exact erf form
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_finite_scale(scale: Tensor, name: str) -> None:
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name} has non-finite values (inf or nan)")


def _int8_matmul(a: Tensor, b: Tensor, a_scale: Optional[Tensor], b_scale: Optional[Tensor],
                 bias: Optional[Tensor], activation: str, out_dtype: Optional[torch.dtype]) -> Tensor:
    if (a_scale is None) != (b_scale is None):
        raise ValueError("int8_matmul: give both a_scale and b_scale, or neither")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul: a is [M, {a.shape[1]}] but b is [N, {b.shape[1]}] (K must match)")
    # Every partial sum is an integer below 2^53 in magnitude (|a*b| <= 2^14, K < 2^39), so fp64
    # accumulation is exact in any order -- and, unlike int64 matmul, runs on CUDA too.
    acc = a.double() @ b.double().T
    if a_scale is None:
        if bias is not None or activation != "none":
            raise ValueError("int8_matmul: bias and activation need a_scale and b_scale")
        if out_dtype not in (None, torch.int32):
            raise ValueError(f"int8_matmul: without scales the output is int32, got out_dtype={out_dtype}")
        if acc.numel() and bool(((acc < _INT32_MIN) | (acc > _INT32_MAX)).any()):
            raise ValueError("int8_matmul: the exact result does not fit in int32 (K too large for "
                             "these values); pass scales to get a float result")
        return acc.to(torch.int32)
    _check_finite_scale(a_scale, "a_scale")
    _check_finite_scale(b_scale, "b_scale")
    # acc.float() rounds exactly as an int32 -> fp32 conversion of the same integer would.
    y = acc.float() * a_scale.float()[:, None] * b_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return _apply_activation(y, activation).to(out_dtype or torch.float32)


def _quantize_rows_int8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    return _quantize_rows(x)


def _int8_matmul_ref(a: Tensor, b: Tensor, a_scale: Optional[Tensor], b_scale: Optional[Tensor],
                     bias: Optional[Tensor], activation: str, out_dtype: Optional[torch.dtype]) -> Tensor:
    return _int8_matmul(a, b, a_scale, b_scale, bias, activation, out_dtype)


def _int8_linear_ref(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                     activation: str, act_quant: str, out_dtype: Optional[torch.dtype]) -> Tensor:
    out_dtype = out_dtype or x.dtype
    _check_finite_scale(weight_scale, "weight_scale")  # here, so the message names weight_scale
    if act_quant == "dynamic":
        x_q, x_scale = _quantize_rows(x)
        return _int8_matmul(x_q, weight_q, x_scale, weight_scale, bias, activation, out_dtype)
    if act_quant != "none":
        raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
    w = weight_q.float() * weight_scale.float()[:, None]
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return _apply_activation(y, activation).to(out_dtype)


def pack_weight_int8(weight_q: Tensor) -> Tensor:
    """weight_q [N, K] int8 -> the CPU kernels' packed layout [ceil(N/16), ceil(K/2) * 32] int8
    (see the module docstring). Pure tensor ops: runs on any device, traceable."""
    if not isinstance(weight_q, Tensor) or weight_q.dtype != torch.int8 or weight_q.dim() != 2:
        raise TypeError(f"weight_q must be a 2-D int8 tensor, got {getattr(weight_q, 'dtype', type(weight_q))}")
    n, k = weight_q.shape
    n_panels, n_pairs = -(-n // 16), -(-k // 2)
    w = weight_q.new_zeros(n_panels * 16, n_pairs * 2)
    w[:n, :k] = weight_q
    # rows 16 j + 8 h + c, columns 2 p + t -> [j, p, h, c, t]
    return w.view(n_panels, 2, 8, n_pairs, 2).permute(0, 3, 1, 2, 4).reshape(n_panels, n_pairs * 32).contiguous()


def unpack_weight_int8(packed_weight: Tensor, n: int, k: int) -> Tensor:
    """The inverse of `pack_weight_int8`: [N, K] int8."""
    n_panels, n_pairs = packed_weight.shape[0], packed_weight.shape[1] // 32
    w = packed_weight.view(n_panels, n_pairs, 2, 8, 2).permute(0, 2, 3, 1, 4).reshape(n_panels * 16, n_pairs * 2)
    return w[:n, :k]


def _int8_linear_packed_ref(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                            activation: str, act_quant: str, out_dtype: Optional[torch.dtype]) -> Tensor:
    n, k = weight_scale.shape[0], x.shape[1]
    if tuple(packed_weight.shape) != (-(-n // 16), -(-k // 2) * 32):
        raise ValueError(f"packed_weight must have shape [{-(-n // 16)}, {-(-k // 2) * 32}] (pack_weight_int8 of an "
                         f"[N, K] = [{n}, {k}] weight), got {tuple(packed_weight.shape)}")
    weight_q = unpack_weight_int8(packed_weight, n, k)
    return _int8_linear_ref(x, weight_q, weight_scale, bias, activation, act_quant, out_dtype)


# ----------------------------------------------------------------------------- fake kernels
def _quantize_rows_int8_fake(x):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32))


def _int8_matmul_fake(a, b, a_scale, b_scale, bias, activation, out_dtype):
    dtype = torch.int32 if a_scale is None else (out_dtype or torch.float32)
    return a.new_empty(a.shape[0], b.shape[0], dtype=dtype)


def _int8_linear_fake(x, weight_q, weight_scale, bias, activation, act_quant, out_dtype):
    return x.new_empty(x.shape[0], weight_q.shape[0], dtype=out_dtype or x.dtype)


def _int8_linear_packed_fake(x, packed_weight, weight_scale, bias, activation, act_quant, out_dtype):
    return x.new_empty(x.shape[0], weight_scale.shape[0], dtype=out_dtype or x.dtype)


# ----------------------------------------------------------------------------- registration
def _no_backward(name: str):
    return _common.raising_backward(
        f"recsys_kernels.{name} is an inference-only op and has no backward (int8 quantization "
        f"is not differentiable). Run it under torch.no_grad() / torch.inference_mode() or on "
        f"detached inputs; to train, keep the float nn.Linear.")


for _name, _ref, _fake in (("quantize_rows_int8", _quantize_rows_int8_ref, _quantize_rows_int8_fake),
                           ("int8_matmul", _int8_matmul_ref, _int8_matmul_fake),
                           ("int8_linear", _int8_linear_ref, _int8_linear_fake),
                           ("int8_linear_packed", _int8_linear_packed_ref, _int8_linear_packed_fake)):
    _variants = _common.define_op(_name, _ref, _fake)
    _common.register_autograd(_variants, _no_backward(_name), _common.setup_nothing)


# ----------------------------------------------------------------------------- front doors
def _check_out_dtype(out_dtype, allowed, what: str) -> None:
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or out_dtype not in allowed):
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"out_dtype must be None or one of {names}{what}, got {out_dtype!r}")


def _check_bias(bias, n: int) -> Optional[Tensor]:
    """bias: None or a float [N] tensor; returned as contiguous fp32 (what the kernels read)."""
    if bias is None:
        return None
    _common.check_tensor(bias, "bias", dtypes=_common.FLOAT_DTYPES, dim=1)
    if bias.shape[0] != n:
        raise ValueError(f"bias must have shape [{n}] (N), got {tuple(bias.shape)}")
    return bias.float().contiguous()


def _quantize_front(x: Tensor, name: str, backend: str | None) -> tuple[Tensor, Tensor]:
    _common.check_tensor(x, name, dtypes=_common.FLOAT_DTYPES, dim=2)
    return _common.call("quantize_rows_int8", x.device, backend, x.contiguous())


def quantize_rows_int8(x: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 quantization of a float [M, K] tensor -> (q int8 [M, K],
    scale fp32 [M]) with scale = absmax / 127 (1.0 for an all-zero row) and
    q = clamp(round_half_even(x / scale), -127, 127). Non-finite values raise ValueError."""
    return _quantize_front(x, "x", backend)


def quantize_weight_int8(weight: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 quantization of an nn.Linear weight [N, K] ->
    (weight_q int8 [N, K], weight_scale fp32 [N]): the same rule as `quantize_rows_int8`, whose
    rows are the output channels. The result feeds `int8_linear` / `int8_matmul`'s b side."""
    return _quantize_front(weight, "weight", backend)


def check_int8_matmul_args(a_q, b_q, a_scale, b_scale, bias, activation, out_dtype):
    """int8_matmul's metadata checks (its front door's, and the Triton op's called directly, whose
    kernels trust the shapes); returns (device, a_scale, b_scale, bias, out_dtype) as the kernels
    take them."""
    _common.check_tensor(a_q, "a_q", dtypes=(torch.int8,), dim=2)
    _common.check_tensor(b_q, "b_q", dtypes=(torch.int8,), dim=2)
    m, k = a_q.shape
    n = b_q.shape[0]
    if b_q.shape[1] != k:
        raise ValueError(f"b_q must be [N, K] with K = a_q.shape[1] = {k}, got shape {tuple(b_q.shape)}")
    _common.check_choice(activation, "activation", ACTIVATIONS)
    if (a_scale is None) != (b_scale is None):
        missing = "b_scale" if b_scale is None else "a_scale"
        raise ValueError(f"{missing} is missing: give both a_scale and b_scale, or neither")
    if a_scale is None:
        if bias is not None:
            raise ValueError("bias needs a_scale and b_scale (the int32 result has no epilogue)")
        if activation != "none":
            raise ValueError(f"activation={activation!r} needs a_scale and b_scale (the int32 result has no epilogue)")
        _check_out_dtype(out_dtype, (torch.int32,), " without scales")
        out_dtype = None
    else:
        for t, name, size, dim_name in ((a_scale, "a_scale", m, "M"), (b_scale, "b_scale", n, "N")):
            _common.check_tensor(t, name, dtypes=(torch.float32,), dim=1)
            if t.shape[0] != size:
                raise ValueError(f"{name} must have shape [{size}] ({dim_name}), got {tuple(t.shape)}")
        bias = _check_bias(bias, n)
        _check_out_dtype(out_dtype, _common.FLOAT_DTYPES, " with scales")
        a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    device = _common.check_same_device((a_q, b_q, a_scale, b_scale, bias), ("a_q", "b_q", "a_scale", "b_scale", "bias"))
    return device, a_scale, b_scale, bias, out_dtype


def int8_matmul(a_q: Tensor, b_q: Tensor, a_scale: Tensor | None = None, b_scale: Tensor | None = None,
                bias: Tensor | None = None, *, activation: str = "none",
                out_dtype: torch.dtype | None = None, backend: str | None = None) -> Tensor:
    """a_q [M, K] int8 @ b_q [N, K] int8 .T -> [M, N].

    Without scales: the exact int32 result (out_dtype None or torch.int32; no bias/activation).
    With a_scale [M] and b_scale [N] (fp32, both or neither): y = acc * a_scale[m] * b_scale[n]
    + bias[n], then `activation` ("none" | "relu" | "gelu" (erf) | "silu"), as out_dtype
    (float32 default, float16, bfloat16). `bias` may be float32, float16 or bfloat16; it is read as fp32.
    Inference only (no backward)."""
    device, a_scale, b_scale, bias, out_dtype = check_int8_matmul_args(a_q, b_q, a_scale, b_scale, bias, activation,
                                                                       out_dtype)
    return _common.call("int8_matmul", device, backend, a_q.contiguous(), b_q.contiguous(),
                        a_scale, b_scale, bias, activation, out_dtype)


def check_int8_linear_args(x, weight_q, weight_scale, bias, activation, act_quant, out_dtype):
    """int8_linear's metadata checks (front door and Triton op), x [..., K]; returns (device, bias
    as contiguous fp32 or None)."""
    _common.check_tensor(x, "x", dtypes=_common.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim ([..., K]), got shape {tuple(x.shape)}")
    _common.check_tensor(weight_q, "weight_q", dtypes=(torch.int8,), dim=2)
    _common.check_tensor(weight_scale, "weight_scale", dtypes=(torch.float32,), dim=1)
    n, k = weight_q.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must be [..., K] with K = weight_q.shape[1] = {k}, got shape {tuple(x.shape)}")
    if weight_scale.shape[0] != n:
        raise ValueError(f"weight_scale must have shape [{n}] (N), got {tuple(weight_scale.shape)}")
    bias = _check_bias(bias, n)
    _common.check_choice(activation, "activation", ACTIVATIONS)
    _common.check_choice(act_quant, "act_quant", ACT_QUANTS)
    _check_out_dtype(out_dtype, _common.FLOAT_DTYPES, "")
    device = _common.check_same_device((x, weight_q, weight_scale, bias), ("x", "weight_q", "weight_scale", "bias"))
    return device, bias


def int8_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None = None, *,
                activation: str = "none", act_quant: str = "dynamic", out_dtype: torch.dtype | None = None,
                backend: str | None = None) -> Tensor:
    """y = activation(x @ dequant(weight_q).T + bias) with int8 weights, for x float [..., K]
    (any leading dims, M may be 0) -> [..., N].

    weight_q [N, K] int8 and weight_scale [N] fp32 come from `quantize_weight_int8`.
    act_quant="dynamic" quantizes x per row inside the op and runs the int8 GEMM with the fused
    dequant + bias + activation epilogue; act_quant="none" is weight-only (fp32 math).
    activation: "none" | "relu" | "gelu" (erf) | "silu". out_dtype: default x's dtype.
    Inference only (no backward)."""
    device, bias = check_int8_linear_args(x, weight_q, weight_scale, bias, activation, act_quant, out_dtype)
    n, k = weight_q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k).contiguous()  # not reshape(-1, k): ambiguous when K = 0
    y = _common.call("int8_linear", device, backend, x2, weight_q.contiguous(), weight_scale.contiguous(),
                     bias, activation, act_quant, out_dtype)
    return y.reshape(*lead, n)


# Whether the C++ CPU kernel of int8_linear_packed is there (Int8Linear's CPU fast path); a constant,
# so that torch.compile traces the choice without guards on the registry.
PACKED_CPU_KERNEL = "cpu" in _backend.available_backends("int8_linear_packed", "cpu")


def int8_linear_packed(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None, *,
                       in_features: int, activation: str = "none", act_quant: str = "dynamic",
                       out_dtype: torch.dtype | None = None, backend: str | None = None) -> Tensor:
    """`int8_linear` with the weight prepacked by `pack_weight_int8(weight_q)` (weight_q
    [N, in_features]); N = weight_scale.shape[0]. Same arguments and result as int8_linear."""
    _common.check_tensor(x, "x", dtypes=_common.FLOAT_DTYPES)
    if not isinstance(in_features, int) or isinstance(in_features, bool):
        raise TypeError(f"in_features must be an int, got {type(in_features).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., K] with K = in_features = {in_features}, got shape {tuple(x.shape)}")
    _common.check_tensor(packed_weight, "packed_weight", dtypes=(torch.int8,), dim=2)
    _common.check_tensor(weight_scale, "weight_scale", dtypes=(torch.float32,), dim=1)
    n, k = weight_scale.shape[0], in_features
    if tuple(packed_weight.shape) != (-(-n // 16), -(-k // 2) * 32):
        raise ValueError(f"packed_weight must have shape [{-(-n // 16)}, {-(-k // 2) * 32}] (pack_weight_int8 of an "
                         f"[N, K] = [{n}, {k}] weight), got {tuple(packed_weight.shape)}")
    bias = _check_bias(bias, n)
    _common.check_choice(activation, "activation", ACTIVATIONS)
    _common.check_choice(act_quant, "act_quant", ACT_QUANTS)
    _check_out_dtype(out_dtype, _common.FLOAT_DTYPES, "")
    device = _common.check_same_device((x, packed_weight, weight_scale, bias),
                                       ("x", "packed_weight", "weight_scale", "bias"))
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k).contiguous()
    y = _common.call("int8_linear_packed", device, backend, x2, packed_weight.contiguous(), weight_scale.contiguous(),
                     bias, activation, act_quant, out_dtype)
    return y.reshape(*lead, n)
