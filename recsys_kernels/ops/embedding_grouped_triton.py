"""The Triton backend of embedding_bag_grouped: recsys_kernels::embedding_bag_grouped_triton, around
the one kernel in kernels/embedding_bag_grouped.py (recsys_kernels._triton).

An opaque torch.library.custom_op, not a triton_op. The kernel finds each lookup's tensors
through raw addresses in a small int64 table built per call from `.data_ptr()`; a triton_op's
body is traced by torch.compile on fake tensors, which have no address, and Inductor would not
know that the kernel reads tensors it is not given as arguments. As a custom op the body runs
eagerly on real tensors, torch.compile(fullgraph=True) calls it as one node (its fake kernel
gives the output), and opcheck applies. What is lost: Inductor cannot fuse into the kernel,
which for a gather whose output is a fresh buffer costs nothing worth having.

Value checks: those of embedding_bag's Triton backend (embedding_triton.value_error_flag /
raise_value_errors), per lookup, with one host sync for all lookups; on failure the first bad
lookup in order raises embedding_bag's error.

Autograd: embedding_grouped.py's formula, calling the Triton single-table backward per lookup.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from . import _common, embedding_triton
from .embedding import BACKWARD, BOUNDS, check_raw_lookup
from .embedding_grouped import (NAME, SCHEMA, _embedding_bag_grouped_fake, _make_backward, _setup_context,
                                check_lookup_count, lookup_dim)

_k, _REASON = _common.triton_kernels("embedding_bag_grouped")

_FORMATS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _check_values(weights, indices, offsets, bounds, bits) -> None:
    """embedding_bag's value errors, for the first bad lookup in order; one host sync when all is
    well. value_error_flag raises at once for empty offsets (the front door never sends them):
    the lookups before such a one are read first."""
    flags = []

    def raise_first_flagged():
        if flags and bool(torch.stack(flags).any()):
            for f, flag in enumerate(flags):
                if bool(flag):
                    embedding_triton.raise_value_errors(weights[f], indices[f], offsets[f], bounds, bits[f])

    for f in range(len(weights)):
        try:
            flags.append(embedding_triton.value_error_flag(weights[f], indices[f], offsets[f], bounds, bits[f]))
        except (IndexError, ValueError):
            raise_first_flagged()
            raise
    raise_first_flagged()


def _format(weight: Tensor, bits: int) -> int:
    if weight.dtype == torch.uint8:
        return _k.FORMAT_CODES["int8" if bits == 8 else "int4"]
    if weight.dtype not in _FORMATS:
        raise TypeError(f"embedding_bag_grouped: tables must be float32, float16, bfloat16 or uint8 row-wise, "
                        f"got {weight.dtype}")
    return _k.FORMAT_CODES[_FORMATS[weight.dtype]]


def _embedding_bag_grouped_triton(weights: list[Tensor], indices: list[Tensor], offsets: list[Tensor],
                                  per_sample_weights: list[Tensor | None], modes: list[str], padding_idx: list[int],
                                  bits: list[int], sparse: list[bool], bounds: str,
                                  output_dtype: torch.dtype) -> Tensor:
    n = len(weights)
    for name, values in (("indices", indices), ("offsets", offsets), ("per_sample_weights", per_sample_weights),
                         ("modes", modes), ("padding_idx", padding_idx), ("bits", bits), ("sparse", sparse)):
        check_lookup_count(n, name, len(values))
    n_bags = offsets[0].shape[0] - 1
    if any(o.shape[0] - 1 != n_bags for o in offsets):
        raise ValueError("embedding_bag_grouped: every offsets[f] needs the same number of entries (B + 1)")
    # the front door already gives this form; the op called directly may not
    _common.check_choice(bounds, "bounds", BOUNDS)
    _common.check_output_dtype(output_dtype, _common.FLOAT_DTYPES)
    lookups = []
    for f in range(n):
        try:
            lookups.append(check_raw_lookup(weights[f], indices[f], offsets[f], per_sample_weights[f], modes[f],
                                            padding_idx[f], bounds, bits[f], sparse[f]))
        except (TypeError, ValueError, NotImplementedError) as e:
            raise type(e)(f"lookup {f}: {e}") from None
    weights = [w.contiguous() for w in weights]
    indices = [i.contiguous() for i, _, _ in lookups]
    offsets = [o.contiguous() for _, o, _ in lookups]
    psws = [None if p is None else p.to(torch.float32).contiguous() for _, _, p in lookups]

    _check_values(weights, indices, offsets, bounds, bits)
    dims = [lookup_dim(w, b) for w, b in zip(weights, bits)]
    device = weights[0].device
    out = torch.empty(max(n_bags, 0), sum(dims), dtype=output_dtype, device=device)
    cfg = _k.launch_config(max(dims), device.type == "cuda")
    tasks = _k.tasks(dims, cfg["BLOCK_D"])
    if n_bags <= 0 or not tasks:
        return out
    rows = []
    col = 0
    for f in range(n):
        w, psw = weights[f], psws[f]
        row = [0] * _k.N_FIELDS
        row[_k.F_WEIGHT] = w.data_ptr()
        row[_k.F_INDICES] = indices[f].data_ptr()
        row[_k.F_OFFSETS] = offsets[f].data_ptr()
        row[_k.F_PSW] = 0 if psw is None else psw.data_ptr()
        row[_k.F_HAS_PSW] = int(psw is not None)
        row[_k.F_ROWS] = w.shape[0]
        row[_k.F_ROW_STRIDE] = w.stride(0)
        row[_k.F_DIM] = dims[f]
        row[_k.F_FORMAT] = _format(w, bits[f])
        row[_k.F_INDEX64] = int(indices[f].dtype == torch.int64)
        row[_k.F_MODE] = _k.MODE_CODES[modes[f]]
        row[_k.F_PAD] = padding_idx[f] if padding_idx[f] >= 0 else -1
        row[_k.F_OUT_COL] = col
        rows.append(row)
        col += dims[f]
    meta = torch.tensor(rows, dtype=torch.int64).to(device)
    task_table = torch.tensor(tasks, dtype=torch.int32).to(device)
    with _common.cuda_device_of(out):
        _k._embedding_bag_grouped_fwd_kernel[_k.grid(n_bags, len(tasks))](
            meta, task_table, out, len(tasks), out.stride(0),
            NF=_k.N_FIELDS, BOUNDS=_k.BOUNDS_CODES[bounds], GPU_RN=_k.compiled_on_gpu(out), **cfg)
    return out


if _k is not None:
    OP = torch.library.custom_op(f"{_common.LIB}::{NAME}_triton", _embedding_bag_grouped_triton, mutates_args=(),
                                 schema=SCHEMA)
    OP.register_fake(_embedding_bag_grouped_fake)
    _common.register_autograd_with_backward_op({"triton": OP}, {**BACKWARD, "triton": embedding_triton.BACKWARD_OP},
                                               "embedding_bag_backward", _make_backward, _setup_context)
else:
    OP = None
_backend.register(NAME, "triton", OP, devices=_common.triton_devices(), reason=_REASON)
