"""embedding_bag on the GPU: the CUDA C++ (csrc/embedding_bag/embedding_bag_cuda.cu) and Triton
(kernels/embedding_bag.py) kernels against nn.EmbeddingBag's CUDA kernel (F.embedding_bag).

Shape A scaled to B = 65,536 bags (issue 3's GPU target): a 1,000,000 x 128 fp32 table, L = 32
uniform indices per bag, mode="sum". 2.1 M random 512-byte rows = 1.07 GB gathered, so the
row bytes dominate and "% of bw" is the share of the measured HBM read bandwidth. The 8-bit and
4-bit row-wise tables (same table, quantized) sit in the same group and case: their ratio is
against fp32 torch, as a user choosing a format would compare them; there is no CUDA peer for
the packed formats in PyTorch itself.
Skipped without a GPU. Each case first checks its result, then times it.

Run: pytest bench/bench_embedding_bag_cuda.py -q (add --benchmark-json=out.json to keep the numbers)."""
import functools

import pytest
import torch
import torch.nn.functional as F

import recsys_kernels as rk
from recsys_kernels import _backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

N, D = 1_000_000, 128
B, L = 65_536, 32


@functools.cache
def _table():
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.randn(N, D, generator=g, device="cuda")


@functools.cache
def _packed(bits):
    return rk.quantize_rowwise(_table(), bits)


@functools.cache
def _bags():
    g = torch.Generator(device="cuda").manual_seed(1)
    return torch.randint(0, N, (B * L,), generator=g, device="cuda"), torch.arange(B + 1, device="cuda") * L


@pytest.mark.benchmark(group=f"embedding_bag cuda sum {N}x{D} B={B} L={L} uniform", min_rounds=5, max_time=0.5)
@pytest.mark.parametrize("impl", ["torch_fp32", "cuda_fp32", "triton_fp32", "cuda_fp32_clamp",
                                  "cuda_int8", "triton_int8", "cuda_int4", "triton_int4"])
def test_forward(run_bench, impl):
    idx, off = _bags()
    if impl == "torch_fp32":
        table = _table()

        def fn(w, i, o):
            return F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)
    else:
        backend, kind, *rest = impl.split("_")
        if backend not in _backend.available_backends("embedding_bag", "cuda"):
            pytest.skip(_backend.availability("embedding_bag")[backend])
        bits = 8 if kind == "fp32" else int(kind[3:])
        table = _table() if kind == "fp32" else _packed(bits)
        bounds = rest[0] if rest else "raise"

        def fn(w, i, o):
            return rk.embedding_bag(w, i, o, bits=bits, bounds=bounds, backend=backend)
        n_check = 4096  # bags checked against the reference (dequantized for the packed formats)
        ref_table = _table() if kind == "fp32" else rk.dequantize_rowwise(table, bits)
        expected = F.embedding_bag(idx[:n_check * L], ref_table, off[:n_check + 1], mode="sum",
                                   include_last_offset=True)
        torch.testing.assert_close(fn(table, idx[:n_check * L], off[:n_check + 1]), expected, rtol=1e-4, atol=1e-4)
    row_bytes = table.shape[1] * table.element_size()
    run_bench(fn, table, idx, off, bytes_moved=idx.numel() * (row_bytes + 8) + (B + 1) * 8 + B * D * 4,
              ops=idx.numel() * D, shape=(N, D, B, L), impl=impl, peer=impl.startswith("torch"))
