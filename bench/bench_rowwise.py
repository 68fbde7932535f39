"""quantize_rowwise (8-bit) on a 100k x 128 fp32 table: our backends against PyTorch's own
embedding_bag_byte_prepack (the peer a user would otherwise pick). Memory-bound: the op reads the
table once and writes N x (D + 8) bytes, so '% of bw' is the number to watch.

Run: pytest bench/bench_rowwise.py -q (add --benchmark-json=out.json to keep the numbers)."""
import pytest
import torch

import recsys_kernels as rk
from recsys_kernels import _backend

N, D = 100_000, 128
GROUP = f"quantize_rowwise 8-bit {N}x{D} fp32"
# (device, implementation): our backends, and torch's prepack (CPU only in stock PyTorch)
CASES = [("cpu", "torch_prepack"), ("cpu", "reference"), ("cpu", "cpu"), ("cuda", "reference"), ("cuda", "cuda")]


def _params():
    params = []
    for device, impl in CASES:
        pid = f"{device}-{impl}"
        if device == "cuda" and not torch.cuda.is_available():
            params.append(pytest.param(device, impl, id=pid, marks=pytest.mark.skip(reason="no CUDA GPU")))
        elif impl != "torch_prepack" and impl not in _backend.available_backends("quantize_rowwise", device):
            reason = _backend.availability("quantize_rowwise")[impl]
            params.append(pytest.param(device, impl, id=pid, marks=pytest.mark.skip(reason=reason)))
        else:
            params.append(pytest.param(device, impl, id=pid))
    return params


@pytest.mark.benchmark(group=GROUP, min_rounds=5, max_time=1.0)
@pytest.mark.parametrize("device,impl", _params())
def test_quantize_rowwise_8bit(run_bench, device, impl):
    torch.manual_seed(0)
    w = (torch.randn(N, D) * torch.rand(N, 1) * 10).to(device)
    if impl == "torch_prepack":
        fn = torch.ops.quantized.embedding_bag_byte_prepack
    else:
        def fn(x):
            return rk.quantize_rowwise(x, 8, backend=impl)
        if impl != "reference":  # time only a kernel that gives the right bytes
            assert torch.equal(fn(w).cpu(), torch.ops.quantized.embedding_bag_byte_prepack(w.cpu()))
    # read N*D fp32, write N*(D+8) bytes; ~4 ops an element (min, max, subtract, multiply)
    run_bench(fn, w, bytes_moved=w.numel() * 4 + N * (D + 8), ops=4 * w.numel(), shape=(N, D), impl=impl,
              peer=impl == "torch_prepack", case=device)
