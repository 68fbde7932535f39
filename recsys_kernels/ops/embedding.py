"""Embedding bag: gather rows of a table (float, or an int8/int4 fused row-wise table), optionally
weight them per sample, and pool each bag by sum, mean or max (DESIGN.md §4 Embedding).

Conventions, for every backend:
- `offsets` is CSR `[B+1]`: offsets[0] == 0, non-decreasing, offsets[B] == nnz. torch's `[B]`
  offsets (without the trailing nnz) are not accepted here: `[B]` and `[B+1]` cannot be told
  apart without a flag, so the conversion lives in `nn.FusedEmbeddingBag` (include_last_offset),
  like in nn.EmbeddingBag. `lengths [B]` is the alternative to offsets; 2-D indices `[B, L]`
  (one bag per row, no offsets) are accepted as in F.embedding_bag.
- Indices and offsets are int32 or int64; all index arithmetic is int64 (tables and batches
  over 2^31 elements are fine). Mixed index/offset dtypes are promoted to int64.
- Accumulation is fp32 (fp64 for fp64 tables, which are allowed so that gradcheck can run in
  double precision). The output dtype is `output_dtype`, else the table's dtype for float
  tables and float32 for quantized tables.
- Empty bags give 0 in every mode. `padding_idx` rows are skipped and not counted by mean.
- bounds: "raise" -> IndexError naming the bad index and N (negative indices are out of range);
  "zero" -> an out-of-range index contributes nothing and is not counted by mean; "clamp" ->
  clamped to [0, N-1] (padding_idx is compared after clamping: it names a row).
- max mode: the gradient of each output element goes to the first index of the bag that attains
  the maximum (ties -> the earliest position, as torch's CPU kernel).
- Backward: dense grad [N, D], or with sparse=True a coalesced sparse COO gradient: one row per
  table row read, ascending (torch's has one per index); the indices that read nothing (padding,
  out of range under bounds="zero") give no row. Quantized (uint8) tables are inference only.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from . import _common
from .rowwise import check_packed_table, dequantize_rows, unpacked_dim

MODES = ("sum", "mean", "max")
BOUNDS = ("raise", "zero", "clamp")
# fp64 tables are accepted on top of the common float dtypes (gradcheck runs in double)
TABLE_DTYPES = _common.FLOAT_DTYPES + (torch.float64,)


# ----------------------------------------------------------------------------- reference
def _check_offsets(off: Tensor, nnz: int) -> None:
    """Value checks of CSR offsets (int64). Errors also name lengths: the front door turns
    lengths into offsets, so a negative length shows up here as a decreasing offset."""
    if off.numel() == 0:
        raise ValueError("offsets must have B + 1 >= 1 entries, got an empty tensor")
    first, last = int(off[0]), int(off[-1])
    if first != 0:
        raise ValueError(f"offsets[0] must be 0, got {first}")
    steps = off[1:] - off[:-1]
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0, 0])
        if int(off[i]) > nnz:  # e.g. a bag start past the end: name it, not the appended offsets[B]
            raise ValueError(f"offsets must be non-decreasing (lengths >= 0) and end at the number of indices "
                             f"{nnz}, got offsets[{i}]={int(off[i])}")
        raise ValueError(f"offsets must be non-decreasing (lengths >= 0), got offsets[{i}]={int(off[i])} "
                         f"> offsets[{i + 1}]={int(off[i + 1])}")
    if last != nnz:
        raise ValueError(f"offsets[-1] (the sum of lengths) must equal the number of indices {nnz}, got {last}")


def _bags(indices: Tensor, offsets: Tensor, n_rows: int, bounds: str, padding_idx: Optional[int]):
    """What forward and backward share: (row per index, safe to gather; bag per index; mask of the
    indices that contribute). All int64."""
    idx = indices.long()
    off = offsets.long()
    nnz = idx.numel()
    _check_offsets(off, nnz)
    n_bags = off.numel() - 1
    bag = torch.repeat_interleave(torch.arange(n_bags, device=idx.device), off[1:] - off[:-1],
                                  output_size=nnz)
    valid = (idx >= 0) & (idx < n_rows)
    if bounds == "raise":
        if not bool(valid.all()):
            bad = int(idx[~valid][0])
            raise IndexError(f"indices: index {bad} is out of range for a table of {n_rows} rows "
                             f"(valid: 0 <= index < {n_rows}; bounds='raise')")
    elif bounds == "clamp":
        if n_rows == 0 and nnz > 0:
            raise IndexError("indices: bounds='clamp' cannot clamp into an empty table (weight has 0 rows)")
        valid = torch.ones_like(valid)
    row = idx.clamp(0, max(n_rows - 1, 0))
    keep = valid if padding_idx is None else valid & (row != padding_idx)
    return row, bag, keep


def _acc_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _gather(weight: Tensor, row: Tensor, keep: Tensor, bits: int, dim: int, acc: torch.dtype) -> Tensor:
    """The rows [nnz, D] in the accumulation dtype, 0 where an index does not contribute (masked,
    not multiplied, so an inf in a skipped row cannot turn into NaN)."""
    if weight.shape[0] == 0:  # only reachable with bounds="zero", where nothing contributes
        return torch.zeros(row.numel(), dim, dtype=acc, device=weight.device)
    rows = weight[row]
    rows = dequantize_rows(rows, bits) if weight.dtype == torch.uint8 else rows
    return rows.to(acc).masked_fill(~keep[:, None], 0)


def _kept_weights(per_sample_weights: Tensor, keep: Tensor, acc: torch.dtype) -> Tensor:
    """The per-sample weights in the accumulation dtype, 0 where an index does not contribute (a
    skipped index's weight, even inf or NaN, contributes nothing: F.embedding_bag's rule)."""
    return per_sample_weights.to(acc).masked_fill(~keep, 0)


def _max_pool(vals: Tensor, bag: Tensor, keep: Tensor, n_bags: int):
    """Per (bag, column): the max over contributing indices, and the position of the first index
    attaining it (nnz where the bag has none)."""
    nnz, dim = vals.shape
    src = vals.masked_fill(~keep[:, None], float("-inf"))
    where = bag[:, None].expand(nnz, dim)
    best = src.new_full((n_bags, dim), float("-inf")).scatter_reduce_(0, where, src, "amax")
    is_best = (src == best[bag]) & keep[:, None]
    pos = torch.arange(nnz, device=vals.device)[:, None].expand(nnz, dim)
    first = torch.full((n_bags, dim), nnz, dtype=torch.long, device=vals.device)
    first.scatter_reduce_(0, where, torch.where(is_best, pos, nnz), "amin")
    return best, first


def _counts(bag: Tensor, keep: Tensor, n_bags: int) -> Tensor:
    return torch.zeros(n_bags, dtype=torch.long, device=bag.device).index_add_(0, bag, keep.long())


def _embedding_bag_ref(weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                       mode: str, padding_idx: Optional[int], bounds: str, bits: int,
                       output_dtype: Optional[torch.dtype], sparse: bool) -> Tensor:
    quantized = weight.dtype == torch.uint8
    dim = unpacked_dim(weight.shape[1], bits) if quantized else weight.shape[1]
    acc = _acc_dtype(weight)
    row, bag, keep = _bags(indices, offsets, weight.shape[0], bounds, padding_idx)
    n_bags = offsets.numel() - 1
    vals = _gather(weight, row, keep, bits, dim, acc)
    if per_sample_weights is not None:
        vals = vals * _kept_weights(per_sample_weights, keep, acc)[:, None]
    counts = _counts(bag, keep, n_bags)
    if mode == "max":
        out, _ = _max_pool(vals, bag, keep, n_bags)
        out = torch.where(counts[:, None] > 0, out, 0)
    else:
        out = torch.zeros(n_bags, dim, dtype=acc, device=weight.device).index_add_(0, bag, vals)
        if mode == "mean":
            out = out / counts.clamp(min=1)[:, None]
    return out.to(output_dtype or (torch.float32 if quantized else weight.dtype)).contiguous()


def _embedding_bag_backward_ref(grad_output: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor,
                                per_sample_weights: Optional[Tensor], mode: str, padding_idx: Optional[int],
                                bounds: str, sparse: bool) -> tuple[Tensor, Tensor]:
    n_rows, dim = weight.shape
    acc = _acc_dtype(weight)
    row, bag, keep = _bags(indices, offsets, n_rows, bounds, padding_idx)
    n_bags = offsets.numel() - 1
    grad = grad_output.to(acc)[bag].masked_fill(~keep[:, None], 0)  # [nnz, D]: d out[bag[p]] / d row p
    if mode == "mean":
        grad = grad / _counts(bag, keep, n_bags).clamp(min=1)[bag, None]
    elif mode == "max":
        _, first = _max_pool(_gather(weight, row, keep, 8, dim, acc), bag, keep, n_bags)
        pos = torch.arange(row.numel(), device=grad.device)[:, None]
        grad = torch.where(first[bag] == pos, grad, 0)
    grad_psw = weight.new_empty(0)
    if per_sample_weights is not None:
        rows = _gather(weight, row, keep, 8, dim, acc)
        grad_psw = (grad * rows).sum(1).to(per_sample_weights.dtype)
        grad = grad * _kept_weights(per_sample_weights, keep, acc)[:, None]
    if sparse:
        grad_weight = grad.to(weight.dtype)
    else:
        grad_weight = torch.zeros(n_rows, dim, dtype=acc, device=weight.device)
        if n_rows > 0:  # an empty table only has (masked) out-of-range indices
            grad_weight.index_add_(0, row, grad)
        grad_weight = grad_weight.to(weight.dtype)
    return grad_weight.contiguous(), grad_psw.contiguous()


# ----------------------------------------------------------------------------- fake kernels
def _embedding_bag_fake(weight, indices, offsets, per_sample_weights, mode, padding_idx, bounds, bits,
                        output_dtype, sparse):
    quantized = weight.dtype == torch.uint8
    dim = unpacked_dim(weight.shape[1], bits) if quantized else weight.shape[1]
    dtype = output_dtype or (torch.float32 if quantized else weight.dtype)
    return weight.new_empty(offsets.shape[0] - 1, dim, dtype=dtype)


def _embedding_bag_backward_fake(grad_output, weight, indices, offsets, per_sample_weights, mode, padding_idx,
                                 bounds, sparse):
    rows = indices.shape[0] if sparse else weight.shape[0]
    grad_weight = weight.new_empty(rows, weight.shape[1])
    if per_sample_weights is None:
        return grad_weight, weight.new_empty(0)
    return grad_weight, per_sample_weights.new_empty(indices.shape[0])


FORWARD = _common.define_op("embedding_bag", _embedding_bag_ref, _embedding_bag_fake)
BACKWARD = _common.define_op("embedding_bag_backward", _embedding_bag_backward_ref, _embedding_bag_backward_fake)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    weight, indices, offsets, per_sample_weights, mode, padding_idx, bounds, _bits, _out_dtype, sparse = inputs
    ctx.save_for_backward(weight, indices, offsets, per_sample_weights)
    ctx.args = (mode, padding_idx, bounds, sparse)


def weight_and_psw_grads(backward_op, grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor,
                         per_sample_weights: Optional[Tensor], mode: str, padding_idx: Optional[int], bounds: str,
                         sparse: bool) -> tuple[Tensor, Tensor]:
    """(grad_weight, grad_per_sample_weights) of one lookup through `backward_op` (a backend's
    embedding_bag_backward). sparse=True gives a coalesced sparse COO gradient: each row the lookup
    read once, ascending, holding the sum of its gradients in index order; like FBGEMM's
    deduplicated backward, and unlike torch's one row per index, which every optimizer then has to
    coalesce (SparseAdam, Adagrad) or scatter row by row (SGD). It is the dense gradient of a
    compact table: one spare row, named as padding_idx by the indices that read nothing (padding,
    or out of range under bounds="zero": they get no row, since SparseAdam would move a row with a
    zero gradient by its momentum), then the rows read. No data-dependent branch, so it traces."""
    if not sparse:
        return backward_op(grad, weight, indices, offsets, per_sample_weights, mode, padding_idx, bounds, False)
    n_rows, dim = weight.shape
    idx = indices.long()
    if bounds == "clamp" and n_rows > 0:  # (the forward refused clamping into an empty table)
        idx = idx.clamp(0, n_rows - 1)
    reads = (idx >= 0) & (idx < n_rows)
    if padding_idx is not None:
        reads &= idx != padding_idx
    spare = idx.new_full((1,), -1)  # sorts first: the compact table's row 0
    rows, place = torch.unique(torch.cat([spare, torch.where(reads, idx, -1)]), sorted=True, return_inverse=True)
    # narrow, not [1:]: traced, a slice of the unique rows' data-dependent size got a size symbol of
    # its own under torch 2.11, and the sparse tensor could not tell its indices and values agree
    n_read = rows.shape[0] - 1
    rows_read = rows.narrow(0, 1, n_read)
    if mode == "max" or per_sample_weights is not None:  # the only gradients that read the table
        compact = torch.cat([weight.new_zeros(1, dim), weight[rows_read]])
    else:
        compact = weight.new_empty(rows.shape[0], dim)  # read for its shape only
    grad_compact, grad_psw = backward_op(grad, compact, place[1:], offsets.long(), per_sample_weights, mode, 0,
                                         "raise", False)
    grad_weight = torch.sparse_coo_tensor(rows_read[None], grad_compact.narrow(0, 1, n_read), (n_rows, dim),
                                          is_coalesced=True, check_invariants=False)
    return grad_weight, grad_psw


def _make_backward(pick):
    """The autograd formula of embedding_bag; pick(is_cuda) gives the backward op to call."""
    def backward(ctx, grad):
        weight, indices, offsets, per_sample_weights = ctx.saved_tensors
        mode, padding_idx, bounds, sparse = ctx.args
        if weight.dtype == torch.uint8:
            raise NotImplementedError("embedding_bag: quantized (uint8) tables are inference only; "
                                      "there is no gradient through them")
        grad_weight, grad_psw = weight_and_psw_grads(pick(weight.is_cuda), grad.contiguous(), weight, indices,
                                                     offsets, per_sample_weights, mode, padding_idx, bounds, sparse)
        if not ctx.needs_input_grad[0]:
            grad_weight = None
        if per_sample_weights is None or not ctx.needs_input_grad[3]:
            grad_psw = None
        return grad_weight, None, None, grad_psw, None, None, None, None, None, None

    return backward


_common.register_autograd_with_backward_op(FORWARD, BACKWARD, "embedding_bag_backward", _make_backward,
                                           _setup_context)


# ----------------------------------------------------------------------------- front door
_TABLE_TYPES = (Tensor, torch.nn.Parameter)  # not a subclass with its own dispatch (DTensor, ...)


def direct_lookup(weight, indices, offsets, mode, padding_idx, bits, sparse) -> bool:
    """Whether prepare_lookup would pass this lookup (1-D indices, CSR offsets, no lengths or
    per-sample weights) on unchanged, on CPU tensors: what lets a front door hand it to the C++
    op as it is (the op's own normal form is less: a negative padding_idx names no row there).
    The table may be a Parameter that requires grad."""
    return (type(weight) in _TABLE_TYPES and weight.dim() == 2 and weight.is_cpu and type(indices) is Tensor
            and type(offsets) is Tensor and indices.dim() == 1 and offsets.dim() == 1
            and indices.dtype == offsets.dtype and indices.dtype in _common.INDEX_DTYPES and offsets.shape[0] > 0
            and (bits == 8 or bits == 4) and mode in MODES and type(sparse) is bool
            and (weight.dtype in TABLE_DTYPES
                 or (weight.dtype == torch.uint8 and weight.shape[1] >= (9 if bits == 8 else 5)))
            and (padding_idx is None or (type(padding_idx) is int and 0 <= padding_idx < weight.shape[0])))


def _direct_op(weight, indices, offsets, mode, padding_idx, bounds, bits, sparse, backend):
    """The C++ CPU op when the front door may hand it a call (with lengths, per_sample_weights
    and output_dtype None) as it is (direct_lookup, _common.direct_cpu_op), else None. The
    checks and the normal form cost ~4 us a call, as much as a 20-row bag's kernel."""
    if bounds not in BOUNDS or not direct_lookup(weight, indices, offsets, mode, padding_idx, bits, sparse):
        return None
    return _common.direct_cpu_op("embedding_bag", backend, indices, offsets)


def embedding_bag(weight: Tensor, indices: Tensor, offsets: Tensor | None = None, *,
                  lengths: Tensor | None = None, per_sample_weights: Tensor | None = None,
                  mode: str = "sum", padding_idx: int | None = None, bounds: str = "raise", bits: int = 8,
                  output_dtype: torch.dtype | None = None, sparse: bool = False,
                  backend: str | None = None) -> Tensor:
    """Pooled embedding lookup -> [B, D]. See the module docstring for the conventions.

    weight: float32/float16/bfloat16/float64 [N, D], or a uint8 fused row-wise table read with
    `bits` (8 or 4; see recsys_kernels.ops.rowwise). indices: int32/int64 [nnz], or [B, L] (one
    bag per row, with neither offsets nor lengths). offsets: CSR [B+1]; or lengths [B].
    per_sample_weights: float [nnz] (or [B, L] with 2-D indices), mode="sum" only.
    sparse: the weight gradient is a coalesced sparse COO tensor (one row per table row read).
    """
    op = (_direct_op(weight, indices, offsets, mode, padding_idx, bounds, bits, sparse, backend)
          if lengths is None and per_sample_weights is None and output_dtype is None else None)
    if op is not None:
        return _common.run_direct(op, weight, indices, offsets, None, mode, padding_idx, bounds, bits, None, sparse)
    _common.check_choice(bounds, "bounds", BOUNDS)
    _common.check_output_dtype(output_dtype, TABLE_DTYPES)
    weight, indices, offsets, per_sample_weights, padding_idx = prepare_lookup(
        weight, indices, offsets, lengths, per_sample_weights, mode, padding_idx, bits, sparse)
    device = _common.check_same_device((weight, indices, offsets, per_sample_weights),
                                       ("weight", "indices", "offsets", "per_sample_weights"))
    return _common.call("embedding_bag", device, backend, weight.contiguous(), indices.contiguous(),
                        offsets.contiguous(), None if per_sample_weights is None else per_sample_weights.contiguous(),
                        mode, padding_idx, bounds, bits, output_dtype, sparse)


def padding_int(padding_idx) -> int:
    """padding_idx as a Python int: an int or another integer scalar (numpy's, as nn.EmbeddingBag
    takes them); not a bool."""
    if not isinstance(padding_idx, numbers.Integral) or isinstance(padding_idx, bool):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    return int(padding_idx)


def check_raw_lookup(weight, indices, offsets, per_sample_weights, mode, padding_idx, bounds, bits, sparse):
    """prepare_lookup's checks for a lookup already in the ops' normal form (1-D indices, CSR
    offsets), raising the same errors, for the Triton ops called directly: their kernels trust
    the shapes (the C++ kernels check them themselves). padding_idx keeps the ops' meaning (a
    negative one names no row). Returns (indices, offsets, per_sample_weights) in one index dtype."""
    _common.check_tensor(indices, "indices", dtypes=_common.INDEX_DTYPES, dim=1)  # (the ops take no [B, L])
    _, indices, offsets, per_sample_weights, _ = prepare_lookup(weight, indices, offsets, None, per_sample_weights,
                                                                mode, None, bits, sparse)
    _common.check_choice(bounds, "bounds", BOUNDS)
    if padding_idx is not None:
        padding_idx = padding_int(padding_idx)
        if padding_idx >= weight.shape[0]:  # the C++ ops' rule
            raise ValueError(f"padding_idx must be < {weight.shape[0]} for a table of {weight.shape[0]} rows "
                             f"(or negative: none), got {padding_idx}")
    return indices, offsets, per_sample_weights


def prepare_lookup(weight, indices, offsets, lengths, per_sample_weights, mode, padding_idx, bits, sparse):
    """The metadata checks of one lookup (embedding_bag's and embedding_bag_grouped's front doors)
    and its normal form: (weight, 1-D indices, CSR offsets of the indices' dtype, 1-D
    per_sample_weights or None, padding_idx in [0, N) or None). Traceable: no value is read."""
    _common.check_tensor(weight, "weight", dim=2)
    quantized = weight.dtype == torch.uint8
    _common.check_bits(bits)
    if quantized:
        check_packed_table(weight, bits, "weight")
    elif weight.dtype not in TABLE_DTYPES:
        raise TypeError(f"weight must be a float32, float16, bfloat16 or float64 table, or a uint8 row-wise "
                        f"table, got {str(weight.dtype).replace('torch.', '')}")
    _common.check_tensor(indices, "indices", dtypes=_common.INDEX_DTYPES, dim=(1, 2))
    _common.check_choice(mode, "mode", MODES)
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be a bool, got {type(sparse).__name__}")
    if indices.dim() == 2:  # [B, L]: every row is a bag of L indices, as in F.embedding_bag
        if offsets is not None or lengths is not None:
            raise ValueError("offsets and lengths must be None when indices is 2-D [B, L] (one bag per row), "
                             f"got indices of shape {tuple(indices.shape)}")
        n_bags, bag_len = indices.shape
        offsets = torch.arange(n_bags + 1, device=indices.device, dtype=indices.dtype) * bag_len
        if per_sample_weights is not None and per_sample_weights.shape == indices.shape:
            per_sample_weights = per_sample_weights.reshape(-1)
        indices = indices.reshape(-1)
    elif (offsets is None) == (lengths is None):
        raise ValueError("give exactly one of offsets (CSR [B+1]) and lengths ([B]) with 1-D indices")
    elif lengths is not None:
        _common.check_tensor(lengths, "lengths", dtypes=_common.INDEX_DTYPES, dim=1)
        # cumsum, not a Python loop: stays traceable; a negative length or a wrong total is caught
        # by the op's offset checks
        offsets = torch.cat([lengths.new_zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0, dtype=torch.int64)])
    else:
        _common.check_tensor(offsets, "offsets", dtypes=_common.INDEX_DTYPES, dim=1)
        if offsets.shape[0] == 0:
            raise ValueError("offsets must have B + 1 >= 1 entries (CSR, offsets[0] = 0, offsets[B] = nnz), "
                             "got an empty tensor")
    if offsets.dtype != indices.dtype:  # one index dtype for the kernels; int64 loses nothing
        indices, offsets = indices.long(), offsets.long()

    if per_sample_weights is not None:
        _common.check_tensor(per_sample_weights, "per_sample_weights", dtypes=TABLE_DTYPES, dim=1)
        if mode != "sum":
            raise ValueError(f"per_sample_weights is only supported with mode='sum', got mode={mode!r}")
        if per_sample_weights.shape[0] != indices.shape[0]:
            raise ValueError(f"per_sample_weights must have one weight per index ({indices.shape[0]}), "
                             f"got shape {tuple(per_sample_weights.shape)}")
        if quantized and per_sample_weights.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError("embedding_bag: quantized (uint8) tables are inference only; "
                                      "per_sample_weights must not require grad with them")
    if padding_idx is not None:
        padding_idx = padding_int(padding_idx)
        n_rows = weight.shape[0]
        if not -n_rows <= padding_idx < n_rows:
            raise ValueError(f"padding_idx must be within [-{n_rows}, {n_rows}) for a table of {n_rows} rows, "
                             f"got {padding_idx}")
        padding_idx = padding_idx % n_rows  # negative counts from the end, as in nn.EmbeddingBag
    return weight, indices, offsets, per_sample_weights, padding_idx
