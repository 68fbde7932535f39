"""torch.autocast: the ops compute in their inputs' dtypes on every backend (autocast reaches no
matmul inside them); the modules that stand in for nn.Linear give nn.Linear's output dtype; the
graph passes refuse a forward that enters autocast (torch.fx cannot record it)."""
import copy

import pytest
import torch
from torch import nn

import recsys_kernels as rk
from recsys_kernels import graph
from recsys_kernels.compress.sparse import sparsify_

from helpers import backend_params

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("topk_scores"))
def test_topk_scores_ignores_autocast(device, backend, dtype):
    # item 1 outscores item 0 by 2^-10: a bf16 product would tie them (and the reference's
    # body ran its matmul in bf16 under autocast, until 2026-11-30: a shape error, or with a
    # bias a wrong order)
    q = torch.ones(1, 4, device=device)
    items = torch.tensor([[0.25] * 4, [0.25 + 2 ** -12] * 4] + [[-1.0] * 4] * 48, device=device)
    for bias in (None, torch.zeros(50, device=device)):
        expected = rk.topk_scores(q, items, k=2, item_bias=bias, backend=backend)
        assert expected[1].tolist() == [[1, 0]]
        with torch.autocast(device, dtype=dtype):
            got = rk.topk_scores(q, items, k=2, item_bias=bias, backend=backend)
        assert got[0].dtype == torch.float32
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("int8_linear"))
def test_int8_linear_weight_only_ignores_autocast(device, backend, dtype):
    x = torch.randn(40, 24, device=device)
    w = torch.randint(-127, 128, (16, 24), dtype=torch.int8, device=device)
    scale = torch.rand(16, device=device) / 100
    expected = rk.int8_linear(x, w, scale, act_quant="none", backend=backend)
    with torch.autocast(device, dtype=dtype):
        got = rk.int8_linear(x, w, scale, act_quant="none", backend=backend)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("pair_scores"))
def test_pair_scores_ignores_autocast(device, backend, dtype):
    users, items = torch.randn(6, 32, device=device), torch.randn(9, 32, device=device)
    u, i = torch.randint(0, 6, (20,), device=device), torch.randint(0, 9, (20,), device=device)
    expected = rk.pair_scores(users, items, u, i, backend=backend)
    with torch.autocast(device, dtype=dtype):
        got = rk.pair_scores(users, items, u, i, backend=backend)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_int8_linear_module_gives_nn_linears_dtype(backend, dtype):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quantized = rk.quantize_(copy.deepcopy(model))
    for m in quantized.modules():
        if isinstance(m, rk.Int8Linear):
            m.backend = backend
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = quantized[0](x).to(dtype)  # the same GEMM, rounded once to the autocast dtype
        with torch.autocast("cpu", dtype=dtype):
            want, first, got = model(x), quantized[0](x), quantized(x)
            compiled = torch.compile(quantized[0], fullgraph=True)(x)
    assert got.dtype == want.dtype == first.dtype == compiled.dtype == dtype
    assert torch.equal(first, expected) and torch.equal(compiled, expected)
    assert (got.float() - want.float()).abs().max() < 0.05


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_sparse_linear_under_autocast_and_in_half_models(dtype):
    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight[torch.rand(32, 64) < 0.9] = 0
    dense = copy.deepcopy(model)
    sparsify_(model, min_sparsity=0.5)
    assert isinstance(model[0], rk.compress.SparseLinear)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = dense(x)
        with torch.autocast("cpu", dtype=dtype):  # torch's CPU sparse kernels take no fp16 / bf16
            got = model(x)
        assert got.dtype == dtype  # as nn.Linear under autocast
        torch.testing.assert_close(got, expected.to(dtype))
        half, half_dense = copy.deepcopy(model).to(dtype), copy.deepcopy(dense).to(dtype)
        got = half(x.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got, half_dense(x.to(dtype)), rtol=1e-2, atol=1e-2)


def test_graph_passes_refuse_a_forward_that_enters_autocast():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.a(x)
            return self.b(h.float())

    with pytest.raises(NotImplementedError, match="enters or leaves torch.autocast"):
        graph.trace(Mixed())
    with pytest.raises(NotImplementedError, match="enters or leaves torch.autocast"):
        graph.optimize_graph(Mixed())
    # a model called inside autocast as a whole traces: its graph runs inside autocast too
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = graph.trace(plain)
        assert torch.equal(gm(x), plain(x))
