"""embedding_bag_grouped: F embedding-bag lookups (tables of different N, D and formats) in one
kernel launch, written side by side into one [B, sum_f D_f] output (DESIGN.md §4, "Multi-table,
one launch"; FBGEMM's table-batched embedding and TorchRec's EmbeddingBagCollection do the same).

Op contract (every backend; the front door below establishes the preconditions):
- Lookup f reads table weights[f] (the same tensor may serve several lookups), with indices[f],
  offsets[f], per_sample_weights[f] (or None), modes[f], padding_idx[f] (< 0: none), bits[f],
  sparse[f], and the shared `bounds`. Columns [c_f, c_f + D_f) of the output, c_f = sum of the
  earlier D, are exactly embedding_bag(weights[f], ...) computed in fp32 and cast to
  output_dtype (no intermediate rounding to the table's dtype).
- Tables: fp32/fp16/bf16 [N, D] or uint8 row-wise (bits 8 | 4). No fp64: the front door raises
  TypeError (FusedEmbeddingBagCollection keeps the per-table loop for fp64 tables).
- Every offsets[f] is CSR with the same B + 1 entries (ValueError in the front door otherwise).
- Preconditions from the front door: contiguous tensors on one device; indices[f] 1-D and of
  the dtype of offsets[f] (int32 or int64; lookups may differ); per_sample_weights[f] None or
  fp32 [nnz_f] and only with modes[f] == "sum"; padding_idx[f] == -1 or in [0, N_f);
  output_dtype fp32, fp16 or bf16.
- Value errors (offsets, index bounds, clamping into an empty table, non-finite scales) are
  embedding_bag's exceptions with its messages, raised for the first bad lookup in order.

Autograd: the forward is one launch; the backward splits grad_output by columns and calls the
single-table embedding_bag_backward op of the forward's backend once per float lookup (the
gradient of a table shared by several lookups is the sum, accumulated by autograd). Sparse
gradients, per-sample-weight gradients and the quantized-tables-are-inference-only rule are
embedding_bag's.
"""
from __future__ import annotations

import functools
import numbers
from typing import Sequence

import torch
from torch import Tensor

from . import _common
from .embedding import (BACKWARD, BOUNDS, _embedding_bag_ref, direct_lookup, embedding_bag,
                        prepare_lookup, weight_and_psw_grads)
from .rowwise import unpacked_dim

NAME = "embedding_bag_grouped"
SCHEMA = ("(Tensor[] weights, Tensor[] indices, Tensor[] offsets, Tensor?[] per_sample_weights, str[] modes, "
          "int[] padding_idx, int[] bits, bool[] sparse, str bounds, ScalarType output_dtype) -> Tensor")
GROUPED_TABLE_DTYPES = _common.FLOAT_DTYPES + (torch.uint8,)


def lookup_dim(weight: Tensor, bits: int) -> int:
    """D of a lookup: the table's width, or the unpacked width of a uint8 row-wise table."""
    return unpacked_dim(weight.shape[1], bits) if weight.dtype == torch.uint8 else weight.shape[1]


def result_dtype(weight: Tensor) -> torch.dtype:
    """What embedding_bag returns for this table without output_dtype."""
    return torch.float32 if weight.dtype == torch.uint8 else weight.dtype


# ----------------------------------------------------------------------------- reference / fake
def _embedding_bag_grouped_ref(weights, indices, offsets, per_sample_weights, modes, padding_idx, bits, sparse,
                               bounds, output_dtype):
    cols = [_embedding_bag_ref(w, i, o, p, m, pad if pad >= 0 else None, bounds, b, torch.float32, s)
            for w, i, o, p, m, pad, b, s in zip(weights, indices, offsets, per_sample_weights, modes, padding_idx,
                                                 bits, sparse)]
    return torch.cat(cols, dim=1).to(output_dtype).contiguous()


def _embedding_bag_grouped_fake(weights, indices, offsets, per_sample_weights, modes, padding_idx, bits, sparse,
                                bounds, output_dtype):
    total = sum(lookup_dim(w, b) for w, b in zip(weights, bits))
    return weights[0].new_empty(offsets[0].shape[0] - 1, total, dtype=output_dtype)


FORWARD = _common.define_op(NAME, _embedding_bag_grouped_ref, _embedding_bag_grouped_fake, schema=SCHEMA)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    weights, indices, offsets, per_sample_weights, modes, padding_idx, bits, sparse, bounds, _out_dtype = inputs
    n = len(weights)
    ctx.n = n
    ctx.save_for_backward(*weights, *indices, *offsets, *per_sample_weights)
    ctx.args = (list(modes), list(padding_idx), list(bits), list(sparse), bounds)


def _make_backward(pick):
    """The autograd formula; pick(is_cuda) gives the single-table backward op to call."""
    def backward(ctx, grad):
        n = ctx.n
        saved = ctx.saved_tensors
        weights, indices, offsets, psws = (list(saved[k * n:(k + 1) * n]) for k in range(4))
        modes, padding_idx, bits, sparse, bounds = ctx.args
        needs_weight = ctx.needs_input_grad[0]
        # a Tensor?[] that holds a None is not an autograd input (torch.library passes it whole);
        # the front door never sends one with a per-sample weight that requires grad
        psw_is_input = isinstance(ctx.needs_input_grad[3], (list, tuple))
        needs_psw = ctx.needs_input_grad[3] if psw_is_input else [False] * n
        grad_weights, grad_psws = [None] * n, [None] * n
        col = 0
        for f in range(n):
            weight = weights[f]
            dim = lookup_dim(weight, bits[f])
            start, col = col, col + dim
            if not (needs_weight[f] or needs_psw[f]):
                continue
            if weight.dtype == torch.uint8:  # (the front door refuses this; the raw op gets here)
                raise NotImplementedError("embedding_bag_grouped: quantized (uint8) tables are inference only; "
                                          "per_sample_weights must not require grad with them")
            pad = padding_idx[f] if padding_idx[f] >= 0 else None
            grad_weight, grad_psw = weight_and_psw_grads(pick(weight.is_cuda), grad[:, start:col].contiguous(),
                                                         weight, indices[f], offsets[f], psws[f], modes[f], pad,
                                                         bounds, sparse[f])
            if needs_weight[f]:
                grad_weights[f] = grad_weight
            if needs_psw[f]:
                grad_psws[f] = grad_psw
        return (grad_weights, [None] * n, [None] * n, grad_psws if psw_is_input else None,
                None, None, None, None, None, None)

    return backward


_common.register_autograd_with_backward_op(FORWARD, BACKWARD, "embedding_bag_backward", _make_backward,
                                           _setup_context)


# ----------------------------------------------------------------------------- front door
def check_lookup_count(n: int, name: str, got: int) -> None:
    """n tables (at least one) and a per-lookup list `name` of `got` entries; the C++ ops raise
    the same messages."""
    if n == 0:
        raise ValueError("weights must hold at least one table (one per lookup), got an empty list")
    if got != n:
        raise ValueError(f"{name} must have one entry per lookup ({n}), got {got}")


def _per_lookup(value, name: str, n: int, scalar_types) -> list:
    """A per-lookup list from one value for every lookup or a sequence of n values. Integer
    scalars of other types (numpy's) become ints where scalar_types is numbers.Integral (bools
    are left for the checks to refuse)."""
    if isinstance(value, scalar_types) or value is None:
        values = [value] * n
    elif not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of {n} values (one per lookup) or a single value, "
                        f"got {type(value).__name__}")
    else:
        check_lookup_count(n, name, len(value))
        values = list(value)
    if scalar_types is numbers.Integral:
        values = [int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v for v in values]
    return values


def _all_none(value) -> bool:
    """None, or a list of Nones (as FusedEmbeddingBagCollection passes lengths and weights)."""
    return value is None or (type(value) in (list, tuple) and all(v is None for v in value))


def _direct_op(weights, indices, offsets, modes, pads, bits, sparse, backend):
    """The C++ CPU op when the front door may hand it the lookups as they are (every one passes
    direct_lookup, the same number of bags, no float64 table; _common.direct_cpu_op), else None.
    The checks and the normal form cost ~35 us of a ~64 us call of 8 one-bag lookups."""
    n_bags = offsets[0].shape[0] if type(offsets[0]) is Tensor else None
    for f in range(len(weights)):
        if not (direct_lookup(weights[f], indices[f], offsets[f], modes[f], pads[f], bits[f], sparse[f])
                and weights[f].dtype != torch.float64 and offsets[f].shape[0] == n_bags):
            return None
    return _common.direct_cpu_op(NAME, backend, *indices, *offsets)


def embedding_bag_grouped(weights: Sequence[Tensor], indices: Sequence[Tensor],
                          offsets: Sequence[Tensor | None] | None = None, *,
                          lengths: Sequence[Tensor | None] | None = None,
                          per_sample_weights: Sequence[Tensor | None] | None = None,
                          modes: str | Sequence[str] = "sum",
                          padding_idx: int | None | Sequence[int | None] = None,
                          bits: int | Sequence[int] = 8, sparse: bool | Sequence[bool] = False,
                          bounds: str = "raise", output_dtype: torch.dtype | None = None,
                          backend: str | None = None) -> Tensor:
    """F pooled embedding lookups in one launch -> [B, sum_f D_f], lookup f in columns
    [sum of the earlier D, + D_f).

    Lookup f is embedding_bag(weights[f], indices[f], offsets[f], lengths=lengths[f],
    per_sample_weights=per_sample_weights[f], mode=modes[f], padding_idx=padding_idx[f],
    bits=bits[f], sparse=sparse[f], bounds=bounds), with the same argument conventions (CSR
    offsets or lengths, 2-D indices, negative padding_idx), accumulated in fp32. modes,
    padding_idx, bits and sparse take one value for every lookup or a list of F. Every lookup
    must have the same number of bags B. Tables: float32/float16/bfloat16 or uint8 row-wise (no
    float64: use embedding_bag). output_dtype: float32/float16/bfloat16, default the promotion of
    what each embedding_bag would return (float32 for quantized tables).
    """
    if not isinstance(weights, (list, tuple)) or not isinstance(indices, (list, tuple)):
        raise TypeError("weights and indices must be lists of tensors (one per lookup)")
    n = len(weights)
    check_lookup_count(n, "indices", len(indices))
    offsets = _per_lookup(offsets, "offsets", n, Tensor)
    modes = _per_lookup(modes, "modes", n, str)
    pads = _per_lookup(padding_idx, "padding_idx", n, numbers.Integral)
    bits = _per_lookup(bits, "bits", n, numbers.Integral)
    sparse = _per_lookup(sparse, "sparse", n, bool)
    if _all_none(lengths) and _all_none(per_sample_weights) and output_dtype is None and bounds in BOUNDS:
        op = _direct_op(weights, indices, offsets, modes, pads, bits, sparse, backend)
        if op is not None:
            return _common.run_direct(op, list(weights), list(indices), offsets, [None] * n, modes,
                                      [-1 if p is None else p for p in pads], bits, sparse, bounds,
                                      functools.reduce(torch.promote_types, {result_dtype(w) for w in weights}))
    lengths = _per_lookup(lengths, "lengths", n, Tensor)
    psws = _per_lookup(per_sample_weights, "per_sample_weights", n, Tensor)
    _common.check_choice(bounds, "bounds", BOUNDS)
    _common.check_output_dtype(output_dtype, _common.FLOAT_DTYPES)

    lookups = []
    for f in range(n):
        try:
            lookup = prepare_lookup(weights[f], indices[f], offsets[f], lengths[f], psws[f], modes[f], pads[f],
                                    bits[f], sparse[f])
        except (TypeError, ValueError, NotImplementedError) as e:
            raise type(e)(f"lookup {f}: {e}") from None
        if lookup[0].dtype == torch.float64:
            raise TypeError(f"lookup {f}: embedding_bag_grouped takes float32, float16, bfloat16 or uint8 row-wise "
                            "tables, got a float64 table (use embedding_bag)")
        lookups.append(lookup)
    n_bags = lookups[0][2].shape[0] - 1
    for f, (_, _, off, _, _) in enumerate(lookups):
        if off.shape[0] - 1 != n_bags:
            raise ValueError(f"lookup {f}: every lookup needs the same number of bags; lookup {f} has "
                             f"{off.shape[0] - 1}, lookup 0 has {n_bags}")
    device = _common.check_same_device(
        [t for lk in lookups for t in lk[:4]],
        lambda: [f"{name}[{f}]" for f in range(n) for name in ("weights", "indices", "offsets", "per_sample_weights")])
    if output_dtype is None:
        output_dtype = functools.reduce(torch.promote_types, {result_dtype(lk[0]) for lk in lookups})

    if torch.is_grad_enabled() and any(lk[3] is not None and lk[3].requires_grad for lk in lookups) \
            and any(lk[3] is None for lk in lookups):
        # torch.library differentiates a Tensor?[] argument only when it holds no None: keep the
        # per-sample weights' gradients with the per-lookup loop (same values: fp32, then cast)
        return torch.cat([embedding_bag(w, i, o, per_sample_weights=p, mode=modes[f], padding_idx=pad, bounds=bounds,
                                        bits=bits[f], output_dtype=torch.float32, sparse=sparse[f], backend=backend)
                          for f, (w, i, o, p, pad) in enumerate(lookups)], dim=1).to(output_dtype)

    return _common.call(
        NAME, device, backend,
        [lk[0].contiguous() for lk in lookups], [lk[1].contiguous() for lk in lookups],
        [lk[2].contiguous() for lk in lookups],
        [None if lk[3] is None else lk[3].to(torch.float32).contiguous() for lk in lookups],
        list(modes), [-1 if lk[4] is None else lk[4] for lk in lookups], list(bits), list(sparse), bounds,
        output_dtype)
