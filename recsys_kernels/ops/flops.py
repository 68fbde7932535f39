"""FLOP counts of the ops for torch.utils.flop_counter.FlopCounterMode, registered for every
variant (native, reference, Triton), so that a model's count (MFU estimates, profilers) includes
Int8Linear and the scoring ops as it includes the nn.Linear they replace. Two FLOPs per
multiply-add, as torch counts aten.mm; the int8 GEMMs count their integer multiply-adds. The
embedding bags and the row-wise (de)quantization count nothing, as torch's embedding_bag does."""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula


def _variants(name: str) -> list:
    ops = torch.ops.recsys_kernels
    return [getattr(ops, n) for n in (name, f"{name}_reference", f"{name}_triton") if hasattr(ops, n)]


@register_flop_formula(_variants("int8_matmul") + _variants("int8_linear") + _variants("int8_linear_packed"))
def _linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """x [M, K] (or a, int8) -> out [M, N]: the out shape gives N, x gives K."""
    return 2 * math.prod(out_shape) * x_shape[-1]


@register_flop_formula(_variants("topk_scores"))
def _topk_flops(queries_shape, items_shape, *args, out_shape=None, **kwargs) -> int:
    """Every query against every item: U x I dot products of D."""
    return 2 * queries_shape[0] * items_shape[0] * queries_shape[1]


@register_flop_formula(_variants("pair_scores"))
def _pair_flops(user_shape, item_shape, user_idx_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * user_idx_shape[0] * user_shape[1]


@register_flop_formula(_variants("candidate_scores") + _variants("candidate_topk"))
def _candidate_flops(queries_shape, items_shape, offsets_shape, cand_items_shape, *args, out_shape=None,
                     **kwargs) -> int:
    return 2 * cand_items_shape[0] * queries_shape[1]
