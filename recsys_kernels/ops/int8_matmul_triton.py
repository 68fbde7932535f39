"""The Triton backend of the int8 matmul family: recsys_kernels::quantize_rows_int8_triton,
int8_matmul_triton and int8_linear_triton, torch.library.triton_ops with the schemas of the
reference ops, around the kernels in kernels/int8_matmul.py (recsys_kernels._triton).

Launches: quantize_rows_int8 = one kernel; int8_matmul = one kernel (GEMM + fused epilogue);
int8_linear act_quant="dynamic" = two kernels (quantize x, then the GEMM with the epilogue: the
int8 copy of x makes one round trip through memory, M * K bytes), act_quant="none" = one
weight-only kernel.

Value checks (a Triton kernel cannot raise), as in embedding_triton.py: finiteness of x and of
the scales is checked in torch before the launch, in a separate opaque custom op
(int8_triton_check_finite: one reduction, one host sync) that returns an empty token passed to
the launch so that tracing keeps it. int8_matmul without scales and K <= 131071 needs no check
and never syncs. For K > 131071 without scales the kernel sets a one-int overflow flag that
int8_triton_check_overflow reads after the launch (one sync); the output is made to depend on
its token the same way.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _common
from .int8_matmul import (_int8_linear_fake, _int8_matmul_fake, _no_backward, _quantize_rows_int8_fake,
                          check_int8_linear_args, check_int8_matmul_args)

_k, _REASON = _common.triton_kernels("int8_matmul")

_X_NAME = "quantize_rows_int8: x"  # the reference's wording for a non-finite x


# ----------------------------------------------------------------------------- value checks
def _int8_triton_check_finite(tensors: list[Tensor], names: str) -> Tensor:
    """ValueError "<name> has non-finite values (inf or nan)" for the first of `tensors` (names:
    ';'-separated, one per tensor) holding an inf or a NaN; one host sync for all of them."""
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors])
    if bool(bad.any()):
        first = int(bad.int().argmax())
        raise ValueError(f"{names.split(';')[first]} has non-finite values (inf or nan)")
    return tensors[0].new_empty(0, dtype=torch.float32)


def _int8_triton_check_finite_fake(tensors, names):
    return tensors[0].new_empty(0, dtype=torch.float32)


def _int8_triton_check_overflow(flag: Tensor) -> Tensor:
    """ValueError when the GEMM kernel flagged an int32 result that does not fit."""
    if bool(flag.any()):
        raise ValueError("int8_matmul: the exact result does not fit in int32 (K too large for these "
                         "values); pass scales to get a float result")
    return flag.new_empty(0)


def _int8_triton_check_overflow_fake(flag):
    return flag.new_empty(0)


CHECK_FINITE = torch.library.custom_op(f"{_common.LIB}::int8_triton_check_finite", _int8_triton_check_finite,
                                       mutates_args=())
CHECK_FINITE.register_fake(_int8_triton_check_finite_fake)
CHECK_OVERFLOW = torch.library.custom_op(f"{_common.LIB}::int8_triton_check_overflow", _int8_triton_check_overflow,
                                         mutates_args=())
CHECK_OVERFLOW.register_fake(_int8_triton_check_overflow_fake)


def _keep(t: Tensor, token: Tensor) -> Tensor:
    """t, made to depend on a check's (empty) token so that tracing cannot drop the check."""
    return t + token.sum().to(t.dtype)


# ----------------------------------------------------------------------------- launches
def _launch_quantize(x: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, _keep(scale, token)
    cfg = _k.quantize_config(k, not _k.interpreted())
    _common.launch_triton(_k._quantize_rows_kernel, _k.quantize_grid(m, cfg["BLOCK_M"]))(
        x, q, scale, token, m, k, **cfg)
    return q, scale


def _launch_gemm(a: Tensor, b: Tensor, a_scale: Optional[Tensor], b_scale: Optional[Tensor],
                 bias: Optional[Tensor], activation: str, out_dtype: torch.dtype, token: Tensor) -> Tensor:
    """The int8 GEMM; int32 out without scales (with the overflow check for big K)."""
    m, k = a.shape
    n = b.shape[0]
    scaled = a_scale is not None
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return _keep(c, token)
    big_k = k > _k.INT32_SAFE_K
    overflow = torch.zeros(1, dtype=torch.int32, device=a.device) if big_k and not scaled else c
    if _k.interpreted():
        kernel, cfg = _k._int8_gemm_kernel, _k.interpreter_gemm_config(m, n, k)
    else:
        kernel, cfg = _k.int8_gemm_tuned, {}
    _common.launch_triton(kernel, _k.gemm_grid(m, n))(
        a, b, c,
        a_scale if scaled else c, b_scale if scaled else c, bias if bias is not None else c,
        overflow, token,
        m, n, k, _k.m_bucket(m),
        HAS_SCALES=scaled, HAS_BIAS=bias is not None, ACT=_k.ACT_CODES[activation], BIG_K=big_k,
        BF16_RNE_BY_HAND=_k.interpreted(), **cfg)
    if big_k and not scaled:
        c = _keep(c, CHECK_OVERFLOW(overflow))
    return c


def _launch_weight_only(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor], activation: str,
                        out_dtype: torch.dtype, token: Tensor) -> Tensor:
    m, k = x.shape
    n = w.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return _keep(c, token)
    if _k.interpreted():
        kernel, cfg = _k._weight_only_kernel, _k.interpreter_gemm_config(m, n, k)
    else:
        kernel, cfg = _k.weight_only_tuned, {}
    _common.launch_triton(kernel, _k.gemm_grid(m, n))(
        x, w, c, w_scale, bias if bias is not None else w_scale, token,
        m, n, k, _k.m_bucket(m),
        HAS_BIAS=bias is not None, ACT=_k.ACT_CODES[activation],
        DOT_FP32=x.dtype == torch.float32 or _k.interpreted(), BF16_RNE_BY_HAND=_k.interpreted(), **cfg)
    return c


# ----------------------------------------------------------------------------- the ops
def _quantize_rows_int8_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    _common.check_tensor(x, "x", dtypes=_common.FLOAT_DTYPES, dim=2)  # the kernel trusts the shape
    token = CHECK_FINITE([x], _X_NAME)
    return _launch_quantize(x.contiguous(), token)


def _int8_matmul_triton(a: Tensor, b: Tensor, a_scale: Optional[Tensor], b_scale: Optional[Tensor],
                        bias: Optional[Tensor], activation: str, out_dtype: Optional[torch.dtype]) -> Tensor:
    # the front door's metadata rules, for direct calls of the op (the kernels trust the shapes)
    _, a_scale, b_scale, bias, out_dtype = check_int8_matmul_args(a, b, a_scale, b_scale, bias, activation, out_dtype)
    a, b = a.contiguous(), b.contiguous()
    if a_scale is None:
        return _launch_gemm(a, b, None, None, None, "none", torch.int32, a.new_empty(0))
    token = CHECK_FINITE([a_scale, b_scale], "a_scale;b_scale")
    return _launch_gemm(a, b, a_scale, b_scale, bias, activation, out_dtype or torch.float32, token)


def _int8_linear_triton(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                        activation: str, act_quant: str, out_dtype: Optional[torch.dtype]) -> Tensor:
    _common.check_tensor(x, "x", dtypes=_common.FLOAT_DTYPES, dim=2)  # the op's x is [M, K]
    _, bias = check_int8_linear_args(x, weight_q, weight_scale, bias, activation, act_quant, out_dtype)
    out_dtype = out_dtype or x.dtype
    x, weight_q, weight_scale = x.contiguous(), weight_q.contiguous(), weight_scale.contiguous()
    if act_quant == "none":
        token = CHECK_FINITE([weight_scale], "weight_scale")
        return _launch_weight_only(x, weight_q, weight_scale, bias, activation, out_dtype, token)
    token = CHECK_FINITE([weight_scale, x], f"weight_scale;{_X_NAME}")  # the reference's order
    x_q, x_scale = _launch_quantize(x, token)
    return _launch_gemm(x_q, weight_q, x_scale, weight_scale, bias, activation, out_dtype, token)


OPS = {}
for _name, _fn, _fake in (("quantize_rows_int8", _quantize_rows_int8_triton, _quantize_rows_int8_fake),
                          ("int8_matmul", _int8_matmul_triton, _int8_matmul_fake),
                          ("int8_linear", _int8_linear_triton, _int8_linear_fake)):
    _op = None
    if _k is not None:
        _op = torch.library.triton_op(f"{_common.LIB}::{_name}_triton", _fn, mutates_args=())
        _op.register_fake(_fake)  # the shared fake kernel (a triton_op's own would trace the body)
        if _k.interpreted():
            _common.keep_opaque_to_compile(_op)
        _common.register_autograd({"triton": _op}, _no_backward(_name), _common.setup_nothing)
    OPS[_name] = _op
    _backend.register(_name, "triton", _op, devices=_common.triton_devices(), reason=_REASON)
