"""The Triton backend of embedding_bag: recsys_kernels::embedding_bag_triton and
recsys_kernels::embedding_bag_backward_triton, torch.library.triton_ops with the schemas of the
reference ops, around the kernels in kernels/embedding_bag.py (recsys_kernels._triton). The
forward's autograd formula is embedding.py's, calling the Triton backward op.

The backward is deterministic (no float atomics, so no mode switch): one kernel writes the
per-index gradient rows G [nnz, D], the result itself for sparse=True, and the per-sample-weight
gradient in one part per column block, added up in torch. The dense gradient is reduced from G
by row: a stable torch.sort of the rows (index order kept within a row) and a segment kernel in
which the lane of the first slot of a row's run sums its G rows in index order and writes the
row once. That is index_add_'s order, so the fp32 gradient has the bits of the reference on CPU and
of the CPU backend, on every run; a row with more than DENSE_CHUNK indices (a hot row) is summed
in chunks of that size, then the chunk sums in order (the CUDA backend's grouping): other bits
than index_add_ there, but still the same on every run. The price over atomics is G in the
accumulation dtype (nnz x D), a sort of nnz keys and two more launches (not measured on a GPU).

Value checks. A Triton kernel cannot raise, so the checks of values that the reference makes
(offsets CSR, indices in range under bounds="raise", clamping into an empty table, finite scales
of the gathered rows of a quantized table) run in torch before the launch, with one host sync:
every condition is reduced into one flag, and only when it is set are the errors worked out in
the reference's order and with its wording (same exception types). They live in a separate
custom op, recsys_kernels::embedding_bag_triton_check: a triton_op's body is traced by
torch.compile, and a data-dependent `if` there would break fullgraph compilation; a custom op is
opaque to the compiler. It returns an empty "token" tensor that is passed to the kernel launch
(unused by the kernel): without that data dependency, tracing drops the check as dead code.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .. import _backend
from . import _common
from .embedding import (BACKWARD, TABLE_DTYPES, _acc_dtype, _check_offsets, _embedding_bag_backward_fake,
                        _embedding_bag_fake, _make_backward, _setup_context, check_raw_lookup)
from .rowwise import unpacked_dim

_k, _REASON = _common.triton_kernels("embedding_bag")


# ----------------------------------------------------------------------------- value checks
def _index_error(indices: Tensor, n_rows: int) -> None:
    idx = indices.long()
    valid = (idx >= 0) & (idx < n_rows)
    if not bool(valid.all()):
        bad = int(idx[~valid][0])
        raise IndexError(f"indices: index {bad} is out of range for a table of {n_rows} rows "
                         f"(valid: 0 <= index < {n_rows}; bounds='raise')")


def _gathered_tails(weight: Tensor, indices: Tensor, bits: int) -> Tensor:
    """The fp32 scale and bias of every row the reference gathers (index clamped) [nnz, 2]; only
    the tail bytes are gathered."""
    n_rows = weight.shape[0]
    dim = unpacked_dim(weight.shape[1], bits)
    tail = weight[:, dim:] if bits == 8 else weight[:, dim // 2:]
    tails = tail.index_select(0, indices.long().clamp(0, n_rows - 1)).contiguous()
    return tails.view(torch.float32) if bits == 8 else tails.view(torch.float16).float()


def value_error_flag(weight: Tensor, indices: Tensor, offsets: Tensor, bounds: str, bits: int) -> Tensor:
    """A 0-d bool tensor on the inputs' device, True when the reference would raise a value error
    for this lookup (read it with one host sync; then raise_value_errors says which). Empty
    offsets (no B + 1 >= 1 entries) raise at once."""
    n_rows = weight.shape[0]
    nnz = indices.numel()
    if offsets.numel() == 0:
        _check_offsets(offsets.long(), nnz)  # raises
    off = offsets.long() if offsets.dtype != torch.int64 else offsets
    bad = (off[0] != 0) | (off[-1] != nnz)
    if bounds == "clamp" and n_rows == 0 and nnz > 0:  # raised after the offset errors, as the reference
        bad = bad | True
    if off.numel() > 1:
        bad = bad | (off[1:] < off[:-1]).any()
    if bounds == "raise" and nnz > 0:
        out_of_range = indices < 0
        if n_rows <= torch.iinfo(indices.dtype).max:  # else no int32 index can reach n_rows
            out_of_range = out_of_range | (indices >= n_rows)
        bad = bad | out_of_range.any()
    if weight.dtype == torch.uint8 and n_rows > 0 and nnz > 0:
        tails = _gathered_tails(weight, indices, bits)
        bad = bad | ~torch.isfinite(tails).all()
    return bad


def raise_value_errors(weight: Tensor, indices: Tensor, offsets: Tensor, bounds: str, bits: int) -> None:
    """For a lookup whose value_error_flag is set: raise the reference's error, in its order."""
    _check_offsets(offsets.long(), indices.numel())
    if bounds == "clamp" and weight.shape[0] == 0 and indices.numel() > 0:
        raise IndexError("indices: bounds='clamp' cannot clamp into an empty table (weight has 0 rows)")
    if bounds == "raise":
        _index_error(indices, weight.shape[0])
    if weight.dtype == torch.uint8:
        raise ValueError("packed table has non-finite scales or biases")


def _embedding_bag_triton_check(weight: Tensor, indices: Tensor, offsets: Tensor, bounds: str,
                                bits: int) -> Tensor:
    if bool(value_error_flag(weight, indices, offsets, bounds, bits)):  # the one host sync
        raise_value_errors(weight, indices, offsets, bounds, bits)
    return indices.new_empty(0)


def _embedding_bag_triton_check_fake(weight, indices, offsets, bounds, bits):
    return indices.new_empty(0)


CHECK = torch.library.custom_op(f"{_common.LIB}::embedding_bag_triton_check", _embedding_bag_triton_check,
                                mutates_args=())
CHECK.register_fake(_embedding_bag_triton_check_fake)


# ----------------------------------------------------------------------------- the op
def _embedding_bag_triton(weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                          mode: str, padding_idx: Optional[int], bounds: str, bits: int,
                          output_dtype: Optional[torch.dtype], sparse: bool) -> Tensor:
    indices, offsets, per_sample_weights = check_raw_lookup(weight, indices, offsets, per_sample_weights, mode,
                                                            padding_idx, bounds, bits, sparse)
    _common.check_output_dtype(output_dtype, TABLE_DTYPES)
    quantized = weight.dtype == torch.uint8
    dim = unpacked_dim(weight.shape[1], bits) if quantized else weight.shape[1]
    n_rows = weight.shape[0]
    n_bags = offsets.shape[0] - 1
    out_dtype = output_dtype or (torch.float32 if quantized else weight.dtype)
    token = CHECK(weight, indices, offsets, bounds, bits)
    if n_rows == 0 or n_bags <= 0 or dim == 0:
        # an empty table (bounds="zero" only, after the check): nothing contributes. Adding the
        # (empty) token's sum keeps the check alive under compilation.
        zeros = torch.zeros(max(n_bags, 0), dim, dtype=out_dtype, device=weight.device)
        return zeros + token.sum().to(out_dtype)
    weight, indices, offsets = weight.contiguous(), indices.contiguous(), offsets.contiguous()
    psw = None if per_sample_weights is None else per_sample_weights.contiguous()
    out = torch.empty(n_bags, dim, dtype=out_dtype, device=weight.device)
    cfg = _k.launch_config(dim, weight.is_cuda)
    _common.launch_triton(_k._embedding_bag_fwd_kernel, _k.grid(n_bags, dim, cfg["BLOCK_D"]))(
        weight, indices, offsets, psw if psw is not None else token, out, token,
        n_rows, weight.stride(0), dim,
        -1 if padding_idx is None else padding_idx,
        MODE=_k.MODE_CODES[mode], BOUNDS=_k.BOUNDS_CODES[bounds], HAS_PAD=padding_idx is not None,
        HAS_PSW=psw is not None, BITS=bits if quantized else 0, ROW_ALIGN=row_alignment(weight),
        ACC64=weight.dtype == torch.float64,
        GPU_RN=_k.compiled_on_gpu(weight),
        **cfg)
    return out


def row_alignment(weight: Tensor) -> int:
    """The largest of 8, 4, 2 bytes that the address and the row stride of a packed uint8 table
    are multiples of (so is every row start), or 1: the forward kernel's ROW_ALIGN. A view into a
    table may start anywhere, and rows of D + 8 bytes for an odd D are not aligned. A fake tensor
    (torch.compile tracing the op's body on a GPU) has no address: its offset into its storage
    stands in, the storage's start being aligned by torch's allocators (to 64 bytes or more)."""
    if weight.dtype != torch.uint8:
        return 1
    start = weight.storage_offset() if is_fake(weight) else weight.data_ptr()
    for align in (8, 4, 2):
        if start % align == 0 and weight.stride(0) % align == 0:
            return align
    return 1


def _embedding_bag_backward_triton(grad_output: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor,
                                   per_sample_weights: Optional[Tensor], mode: str, padding_idx: Optional[int],
                                   bounds: str, sparse: bool) -> tuple[Tensor, Tensor]:
    indices, offsets, per_sample_weights = check_raw_lookup(weight, indices, offsets, per_sample_weights, mode,
                                                            padding_idx, bounds, 8, sparse)
    if weight.dtype == torch.uint8:
        raise TypeError("embedding_bag_backward: the gradient is for float tables, got a uint8 row-wise table")
    n_rows, dim = weight.shape
    _common.check_tensor(grad_output, "grad_output", dtypes=TABLE_DTYPES, dim=2)
    if tuple(grad_output.shape) != (offsets.shape[0] - 1, dim):
        raise ValueError(f"grad_output must have shape [B, D] = [{offsets.shape[0] - 1}, {dim}], "
                         f"got {tuple(grad_output.shape)}")
    nnz = indices.shape[0]
    n_bags = offsets.shape[0] - 1
    acc = _acc_dtype(weight)
    token = CHECK(weight, indices, offsets, bounds, 8)
    psw = None if per_sample_weights is None else per_sample_weights.contiguous()
    if n_rows == 0 or n_bags <= 0 or dim == 0 or nnz == 0:
        # nothing contributes; the token's sum keeps the check alive under compilation
        grad_weight = torch.zeros(nnz if sparse else n_rows, dim, dtype=weight.dtype, device=weight.device)
        grad_weight = grad_weight + token.sum().to(weight.dtype)
        grad_psw = torch.zeros(nnz, dtype=psw.dtype, device=weight.device) if psw is not None else weight.new_empty(0)
        return grad_weight, grad_psw
    grad_output, weight = grad_output.contiguous(), weight.contiguous()
    indices, offsets = indices.contiguous(), offsets.contiguous()
    cfg = _k.launch_config(dim, weight.is_cuda)
    grid = _k.grid(n_bags, dim, cfg["BLOCK_D"])
    # the per-index gradient rows: the result itself when sparse, else in the accumulation dtype
    # for the reduction below (zeroed where max routes nothing)
    rows_dtype = weight.dtype if sparse else acc
    grad_rows = (torch.zeros if mode == "max" else torch.empty)(nnz, dim, dtype=rows_dtype, device=weight.device)
    # one part of the per-sample-weight gradient per column block, added up below (no atomics)
    psw_parts = torch.empty(grid[1] if psw is not None else 0, nnz, dtype=acc, device=weight.device)
    row_of = torch.empty(0 if sparse else nnz, dtype=torch.int64, device=weight.device)
    _common.launch_triton(_k._embedding_bag_bwd_rows_kernel, grid)(
        grad_output, weight, indices, offsets, psw if psw is not None else token, grad_rows, psw_parts, row_of, token,
        n_rows, nnz, dim,
        -1 if padding_idx is None else padding_idx,
        MODE=_k.MODE_CODES[mode], BOUNDS=_k.BOUNDS_CODES[bounds], HAS_PAD=padding_idx is not None,
        HAS_PSW=psw is not None, WRITE_ROWS=not sparse, ACC64=acc == torch.float64, **cfg)
    if sparse:
        grad_weight = grad_rows
    else:
        # deterministic reduction of the rows into [N, D]: a stable sort keeps index order within
        # a row; every shape here is static (no unique / nonzero), so the body stays traceable
        sorted_rows, perm = torch.sort(row_of, stable=True)
        seg_start = torch.searchsorted(sorted_rows, sorted_rows, right=False)
        seg_end = torch.searchsorted(sorted_rows, sorted_rows, right=True)
        grad_weight = torch.zeros(n_rows, dim, dtype=weight.dtype, device=weight.device)
        seg_cfg = _k.segment_config(nnz, cfg["BLOCK_D"], weight.is_cuda)
        seg_grid = ((nnz + seg_cfg["BLOCK_S"] - 1) // seg_cfg["BLOCK_S"], grid[1])
        seg_args = (grad_rows, grad_weight, sorted_rows, perm, seg_start, seg_end, nnz, dim)
        seg_cfg["CHUNK"] = _k.DENSE_CHUNK
        _common.launch_triton(_k._embedding_bag_bwd_segment_kernel, seg_grid)(*seg_args, **seg_cfg)
        _common.launch_triton(_k._embedding_bag_bwd_combine_kernel, seg_grid)(*seg_args, **seg_cfg)
    if psw is None:
        grad_psw = weight.new_empty(0)
    else:
        grad_psw = (psw_parts[0] if psw_parts.shape[0] == 1 else psw_parts.sum(0)).to(psw.dtype)
    return grad_weight, grad_psw


if _k is not None:
    OP = torch.library.triton_op(f"{_common.LIB}::embedding_bag_triton", _embedding_bag_triton, mutates_args=())
    BACKWARD_OP = torch.library.triton_op(f"{_common.LIB}::embedding_bag_backward_triton",
                                          _embedding_bag_backward_triton, mutates_args=())
    # the fake kernels the other variants share (a triton_op's own would trace the body)
    OP.register_fake(_embedding_bag_fake)
    BACKWARD_OP.register_fake(_embedding_bag_backward_fake)
    if _k.interpreted():
        _common.keep_opaque_to_compile(OP)
        _common.keep_opaque_to_compile(BACKWARD_OP)
    _common.register_autograd_with_backward_op({"triton": OP}, {**BACKWARD, "triton": BACKWARD_OP},
                                               "embedding_bag_backward", _make_backward, _setup_context)
else:
    OP = BACKWARD_OP = None
_backend.register("embedding_bag", "triton", OP, devices=_common.triton_devices(), reason=_REASON)
_backend.register("embedding_bag_backward", "triton", BACKWARD_OP, devices=_common.triton_devices(), reason=_REASON)
