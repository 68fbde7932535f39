"""Row-wise quantized embedding tables, byte-compatible with PyTorch's (and FBGEMM's) fused
row-wise formats:

  bits=8: a row is D uint8 codes, then fp32 scale, fp32 bias            (D + 8 bytes)
          = torch.ops.quantized.embedding_bag_byte_prepack
  bits=4: a row is ceil(D/2) bytes of codes, two a byte, low nibble first, then fp16 scale,
          fp16 bias (D/2 + 4 bytes) = torch.ops.quantized.embedding_bag_4bit_prepack
  value = code * scale + bias, with bias = the row minimum.

4-bit tables need an even D: the packed width cannot tell D from D - 1, so PyTorch's own
readers assume 2 * bytes; we refuse an odd D rather than return a padded column. D = 0 is
refused too: every reader needs at least one code per row.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _common

_EPS_8BIT = 1e-8  # FBGEMM's kEpsilon: keeps 255 / range finite for a constant row


def packed_width(dim: int, bits: int) -> int:
    """Bytes per packed row for an embedding dimension `dim`."""
    return dim + 8 if bits == 8 else dim // 2 + 4


def unpacked_dim(packed_cols: int, bits: int) -> int:
    """Embedding dimension D of a packed table with `packed_cols` bytes per row."""
    return packed_cols - 8 if bits == 8 else 2 * (packed_cols - 4)


def _quantize_rowwise_ref(weight: Tensor, bits: int) -> Tensor:
    w = weight.float()
    n, d = w.shape
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_rowwise: weight has non-finite values")
    if n == 0 or d == 0:
        return torch.zeros(n, packed_width(d, bits), dtype=torch.uint8, device=w.device)
    lo = w.amin(dim=1, keepdim=True)
    hi = w.amax(dim=1, keepdim=True)
    # Divide by tensors, never by Python numbers: torch turns `x / 255.0` and `255.0 / x` into a
    # multiply by a reciprocal, which is off by an ulp from FBGEMM's true division.
    if bits == 8:
        rng = hi - lo
        scale = rng / torch.full_like(rng, 255.0)
        inv_scale = torch.full_like(rng, 255.0) / (rng + _EPS_8BIT)
        codes = torch.round((w - lo) * inv_scale).clamp_(0, 255).to(torch.uint8)
        tail = torch.cat([scale, lo], dim=1).contiguous().view(torch.uint8)  # [n, 8]
        return torch.cat([codes, tail], dim=1)
    lo = lo.half().float()  # the fp16 bias is what dequantization will see
    rng = hi - lo
    scale = torch.where(rng == 0, torch.ones_like(rng), rng / torch.full_like(rng, 15.0)).half().float()
    if bool((torch.isinf(lo) | torch.isinf(scale)).any()):  # stored as fp16, they would read back as inf
        raise ValueError("quantize_rowwise: weight has non-finite values, or a row whose 4-bit fp16 scale or bias "
                         "would overflow (|min| or (max - min) / 15 beyond 65504)")
    inv_scale = torch.ones_like(scale) / scale
    bad = (scale == 0) | torch.isinf(inv_scale)
    scale = torch.where(bad, torch.ones_like(scale), scale)
    inv_scale = torch.where(bad, torch.ones_like(inv_scale), inv_scale)
    codes = torch.round((w - lo) * inv_scale).clamp_(0, 15).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    tail = torch.cat([scale.half(), lo.half()], dim=1).contiguous().view(torch.uint8)  # [n, 4]
    return torch.cat([packed, tail], dim=1)


def _dequantize_rowwise_ref(packed: Tensor, bits: int, output_dtype: Optional[torch.dtype]) -> Tensor:
    out_dtype = output_dtype or torch.float32
    return dequantize_rows(packed, bits).to(out_dtype)


def _fresh(t: Tensor) -> Tensor:
    """A row-major copy of t at the start of its own storage, so its bytes can be viewed as wider
    types (.contiguous() would return a one-row slice as it is, at its odd storage offset)."""
    return t.clone(memory_format=torch.contiguous_format)


def dequantize_rows(packed: Tensor, bits: int) -> Tensor:
    """fp32 values of packed rows [n, cols] -> [n, D]. Shared by the references of every op
    that reads row-wise tables."""
    n, cols = packed.shape
    d = unpacked_dim(cols, bits)
    if bits == 8:
        codes = packed[:, :d].float()
        tail = _fresh(packed[:, d:]).view(torch.float32)  # [n, 2]
    else:
        nib = packed[:, : d // 2]
        codes = torch.stack([nib & 0xF, nib >> 4], dim=2).reshape(n, d).float()
        tail = _fresh(packed[:, d // 2:]).view(torch.float16).float()  # [n, 2]
    values = codes * tail[:, 0:1] + tail[:, 1:2]
    if not bool(torch.isfinite(tail).all()):
        raise ValueError("packed table has non-finite scales or biases")
    return values


def _quantize_fake(weight, bits):
    return weight.new_empty(weight.shape[0], packed_width(weight.shape[1], bits), dtype=torch.uint8)


def _dequantize_fake(packed, bits, output_dtype):
    return packed.new_empty(packed.shape[0], unpacked_dim(packed.shape[1], bits),
                            dtype=output_dtype or torch.float32)


_common.define_op("quantize_rowwise", _quantize_rowwise_ref, _quantize_fake)
_common.define_op("dequantize_rowwise", _dequantize_rowwise_ref, _dequantize_fake)


def check_packed_table(packed: Tensor, bits: int, name: str = "weight") -> int:
    """Validate a packed row-wise table's metadata; returns its D."""
    _common.check_bits(bits)
    _common.check_tensor(packed, name, dtypes=(torch.uint8,), dim=2)
    min_cols = 9 if bits == 8 else 5
    if packed.shape[1] < min_cols:
        raise ValueError(f"{name}: a {bits}-bit row-wise table needs at least {min_cols} bytes per row, "
                         f"got {packed.shape[1]}")
    return unpacked_dim(packed.shape[1], bits)


def quantize_rowwise(weight: Tensor, bits: int = 8, *, backend: str | None = None) -> Tensor:
    """Quantize a float table [N, D] to the fused row-wise format (see the module docstring)."""
    _common.check_bits(bits)
    _common.check_tensor(weight, "weight", dtypes=_common.FLOAT_DTYPES, dim=2)
    if weight.shape[1] == 0:  # no reader takes a row of only the scale and bias (torch's neither)
        raise ValueError("weight must have an embedding dim >= 1 for row-wise tables, got 0")
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(f"weight: 4-bit row-wise tables need an even embedding dim, got {weight.shape[1]}")
    return _common.call("quantize_rowwise", weight.device, backend, weight.contiguous(), bits)


def dequantize_rowwise(packed: Tensor, bits: int = 8, *, output_dtype: torch.dtype | None = None,
                       backend: str | None = None) -> Tensor:
    """The float table [N, D] that a fused row-wise table stands for."""
    check_packed_table(packed, bits, "packed")
    _common.check_output_dtype(output_dtype, _common.FLOAT_DTYPES)
    return _common.call("dequantize_rowwise", packed.device, backend, packed.contiguous(), bits, output_dtype)
