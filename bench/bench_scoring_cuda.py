"""The GPU scoring kernels, CUDA C++ (csrc/scoring/*_cuda.cu) and Triton (kernels/scoring.py), against
what a user would otherwise run on the GPU:
  * topk_scores: U = 16384 queries against a 1,000,000 x 64 fp32 catalog, k = 100. Peer: torch
    (queries @ items_chunk.T + topk, chunked over the items with a running top-k; ties in torch's
    order). Ours (each backend) on the fp32 catalog and on its int8 row-wise table (same case, so both ratios are
    against fp32 torch). Matrix work: 2 * U * I * D = 2.1 TFLOP in fp32.
  * pair_scores: 4,000,000 random (user, item) pairs over two 1,000,000 x 64 fp32 tables. Peer:
    gather + multiply + sum.
Skipped without a GPU. Each case first checks that the result is right, then times it.

Run: pytest bench/bench_scoring_cuda.py -q (add --benchmark-json=out.json to keep the numbers)."""
import functools

import pytest
import torch

import recsys_kernels as rk
from recsys_kernels import _backend
from recsys_kernels.ops import scoring

from bench_scoring import check_topk, torch_topk  # the same peer and check as on the CPU

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

N_ITEMS, D = 1_000_000, 64
TOPK_U, TOPK_K = 16384, 100
PAIRS = 4_000_000
TORCH_CHUNK = 16384  # items per torch mm + topk step: a [16384, 16384] fp32 score block (1 GiB)


def _need_backend(op, backend):
    if backend not in _backend.available_backends(op, "cuda"):
        pytest.skip(_backend.availability(op)[backend])


@functools.cache
def _items():
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.randn(N_ITEMS, D, generator=g, device="cuda")


@functools.cache
def _packed():
    return rk.quantize_rowwise(_items(), 8)


@functools.cache
def _queries(n):
    g = torch.Generator(device="cuda").manual_seed(1)
    return torch.randn(n, D, generator=g, device="cuda")


@pytest.mark.benchmark(group=f"topk_scores cuda U={TOPK_U} I={N_ITEMS} D={D} k={TOPK_K}", min_rounds=1,
                       max_time=1.0)
@pytest.mark.parametrize("impl", ["torch_mm_topk", "cuda_fp32", "cuda_int8", "triton_fp32", "triton_int8"])
def test_topk_scores(run_bench, impl):
    q, items = _queries(TOPK_U), _items()
    info = {}
    if impl == "torch_mm_topk":
        fn, table = (lambda q, t: torch_topk(q, t, TOPK_K, TORCH_CHUNK)), items
    else:
        backend, kind = impl.split("_")
        _need_backend("topk_scores", backend)
        table = items if kind == "fp32" else _packed()

        def fn(q, t):
            return scoring.topk_scores(q, t, TOPK_K, backend=backend)
        info["recall_at_k"] = check_topk(fn, q[:64], items, table, TOPK_K, kind == "fp32", TORCH_CHUNK)
    row_bytes = table.shape[1] * table.element_size()
    run_bench(fn, q, table, bytes_moved=N_ITEMS * row_bytes + q.numel() * 4 + TOPK_U * TOPK_K * 12,
              ops=2 * TOPK_U * N_ITEMS * D, shape=(TOPK_U, N_ITEMS, D, TOPK_K), impl=impl,
              peer=impl.startswith("torch"), peak="int8" if impl.endswith("int8") else "fp32", **info)


@functools.cache
def _pairs():
    g = torch.Generator(device="cuda").manual_seed(2)
    return (torch.randint(0, N_ITEMS, (PAIRS,), generator=g, device="cuda"),
            torch.randint(0, N_ITEMS, (PAIRS,), generator=g, device="cuda"))


@pytest.mark.benchmark(group=f"pair_scores cuda P={PAIRS} tables {N_ITEMS}x{D}", min_rounds=5, max_time=0.5)
@pytest.mark.parametrize("impl", ["torch_gather_mul_sum", "cuda", "triton"])
def test_pair_scores(run_bench, impl):
    users, items = _items(), _items().flip(0)  # two tables (the flip is a copy)
    ui, ii = _pairs()
    if impl == "torch_gather_mul_sum":
        def fn(u, v, a, b):
            return (u.index_select(0, a) * v.index_select(0, b)).sum(1)
    else:
        _need_backend("pair_scores", impl)

        def fn(u, v, a, b):
            return scoring.pair_scores(u, v, a, b, backend=impl)
        torch.testing.assert_close(fn(users, items, ui[:1000], ii[:1000]),
                                   (users[ui[:1000]] * items[ii[:1000]]).sum(1), rtol=1e-5, atol=1e-4)
    run_bench(fn, users, items, ui, ii, bytes_moved=PAIRS * (2 * D * 4 + 16 + 4), ops=2 * PAIRS * D,
              shape=(PAIRS, N_ITEMS, D), impl=impl, peer=impl.startswith("torch"))
