"""embedding_bag_grouped on CPU: a collection of 8 tables of mixed sizes and formats, looked up
with one embedding_bag call per table (the loop FusedEmbeddingBagCollection used to run) against
one embedding_bag_grouped call (one kernel launch), on the C++ CPU backend of each op.

Tables (N x D, format, mode): 200k x 128 fp32 sum, 100k x 64 fp16 sum, 50k x 64 bf16 mean,
500k x 128 int8 sum, 300k x 64 int4 sum, 20k x 32 fp32 max, 10k x 16 fp32 mean (with
per-sample weights on the first), and 1000 x 8 int8 sum; B = 1024 bags, L = 20 uniform indices
per lookup. bytes = the row bytes gathered + indices and offsets + the [B, sum D] output.

The grouped op's CPU kernel is written separately: until it is built, its rows skip with the
reason. Run: pytest bench/bench_embedding_bag_grouped.py -q"""
import functools

import pytest
import torch

import recsys_kernels as rk
from recsys_kernels import _backend

B, L = 1024, 20
# (rows, dim, format, mode)
TABLES = [(200_000, 128, "float32", "sum"), (100_000, 64, "float16", "sum"), (50_000, 64, "bfloat16", "mean"),
          (500_000, 128, "int8", "sum"), (300_000, 64, "int4", "sum"), (20_000, 32, "float32", "max"),
          (10_000, 16, "float32", "mean"), (1_000, 8, "int8", "sum")]


@functools.cache
def _collection():
    """(weights, indices, offsets, per_sample_weights, modes, bits) of the 8 lookups."""
    g = torch.Generator().manual_seed(0)
    weights, indices, offsets, psws, modes, bits = [], [], [], [], [], []
    for k, (n, d, fmt, mode) in enumerate(TABLES):
        w = torch.randn(n, d, generator=g)
        if fmt in ("int8", "int4"):
            bits.append(8 if fmt == "int8" else 4)
            w = rk.quantize_rowwise(w, bits[-1])
        else:
            bits.append(8)
            w = w.to(getattr(torch, fmt))
        weights.append(w)
        idx = torch.randint(0, n, (B * L,), generator=g)
        indices.append(idx.int() if k % 2 else idx)  # both index dtypes in the mix
        offsets.append((torch.arange(B + 1) * L).to(indices[-1].dtype))
        psws.append(torch.rand(B * L, generator=g) if k == 0 else None)
        modes.append(mode)
    return weights, indices, offsets, psws, modes, bits


def _bytes(weights, indices, bits):
    row_bytes = sum(w.shape[1] * w.element_size() for w in weights)
    dims = sum(w.shape[1] if w.dtype != torch.uint8 else (w.shape[1] - 8 if b == 8 else 2 * (w.shape[1] - 4))
               for w, b in zip(weights, bits))
    index_bytes = sum(i.numel() * i.element_size() * (1 + 1 / L) for i in indices)
    return int(B * L * row_bytes + index_bytes + B * dims * 4), dims


def _first_bags(args, n):
    weights, indices, offsets, psws, modes, bits = args
    return (weights, [i[:n * L] for i in indices], [o[:n + 1] for o in offsets],
            [None if p is None else p[:n * L] for p in psws], modes, bits)


def _loop(weights, indices, offsets, psws, modes, bits):
    return torch.cat([rk.embedding_bag(w, i, o, per_sample_weights=p, mode=m, bits=b, output_dtype=torch.float32,
                                       backend="cpu")
                      for w, i, o, p, m, b in zip(weights, indices, offsets, psws, modes, bits)], dim=1)


def _grouped(weights, indices, offsets, psws, modes, bits):
    return rk.embedding_bag_grouped(weights, indices, offsets, per_sample_weights=psws, modes=modes, bits=bits,
                                    backend="cpu")


@pytest.mark.benchmark(group=f"embedding_bag 8 mixed tables B={B} L={L}: per-table loop vs grouped",
                       min_rounds=5, max_time=1.0)
@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_mixed_collection(run_bench, impl):
    op = "embedding_bag" if impl == "loop" else "embedding_bag_grouped"
    if "cpu" not in _backend.available_backends(op, "cpu"):
        pytest.skip(f"{op}: {_backend.availability(op)['cpu']}")
    args = _collection()
    fn = _loop if impl == "loop" else _grouped
    if impl == "grouped":  # same numbers as the loop on the first 64 bags
        torch.testing.assert_close(fn(*_first_bags(args, 64)), _loop(*_first_bags(args, 64)), rtol=1e-5, atol=1e-5)
    nbytes, dims = _bytes(args[0], args[1], args[5])
    run_bench(fn, *args, bytes_moved=nbytes, ops=B * L * dims, shape=(len(TABLES), B, L), impl=impl,
              peer=impl == "loop")
