"""FlopCounterMode counts our ops on every backend: Int8Linear as the nn.Linear it replaces, the
scoring ops as their dot products (recsys_kernels/ops/flops.py)."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import recsys_kernels as rk
from helpers import backend_params


def _flops(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_int8_linear_counts_as_the_linear_it_replaces():
    linear = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    x = torch.randn(3, 5, 64)
    expected = 2 * 15 * (64 * 48 + 48 * 8)
    assert _flops(lambda: linear(x)) == expected
    quantized = rk.quantize_(linear)
    assert _flops(lambda: quantized(x)) == expected


@pytest.mark.parametrize("device,backend", backend_params("int8_linear"))
def test_int8_ops(device, backend):
    x, w = torch.randn(7, 32, device=device), torch.randn(9, 32, device=device)
    wq, ws = rk.quantize_weight_int8(w)
    assert _flops(lambda: rk.int8_linear(x, wq, ws, backend=backend)) == 2 * 7 * 9 * 32
    a, _ = rk.quantize_rows_int8(x)
    assert _flops(lambda: rk.int8_matmul(a, wq, backend=backend)) == 2 * 7 * 9 * 32


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_scoring_ops(device, backend, bits):
    U, I, D, P = 4, 50, 16, 11
    queries = torch.randn(U, D, device=device)
    items = torch.randn(I, D, device=device)
    if bits:
        items = rk.quantize_rowwise(items, 8)
    assert _flops(lambda: rk.topk_scores(queries, items, 5, backend=backend)) == 2 * U * I * D
    offsets, cands = torch.tensor([0, 3, 3, 8, 9], device=device), torch.randint(0, I, (9,), device=device)
    assert _flops(lambda: rk.candidate_scores(queries, items, offsets, cands, backend=backend)) == 2 * 9 * D
    assert _flops(lambda: rk.candidate_topk(queries, items, offsets, cands, 2, backend=backend)) == 2 * 9 * D
    users, picks = torch.randint(0, U, (P,), device=device), torch.randint(0, I, (P,), device=device)
    assert _flops(lambda: rk.pair_scores(queries, items, users, picks, backend=backend)) == 2 * P * D
