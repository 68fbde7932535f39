"""The CUDA C++ (csrc/int8_matmul/) and Triton (kernels/int8_matmul.py) int8 kernels against their
PyTorch peers on the GPU:
  * int8 GEMM 4096^3 (int32 out): ours (CUDA: mma.sync m16n8k32; Triton: tl.dot) vs torch._int_mm (cuBLASLt). Matrix
    bound: 2 * 4096^3 = 137 G int8 ops; the bytes (16 MiB + 16 MiB in, 64 MiB out) are minor.
  * int8_linear (dynamic activation quantization, bf16 in/out) vs bf16 F.linear, at M = 16 (decode:
    the GEMV path; bound by reading the N x K weight, int8 halves those bytes) and M = 4096.
Skipped without a GPU. Each case first checks that the result is right, then times it.

Run: pytest bench/bench_int8_linear_cuda.py -q (add --benchmark-json=out.json to keep the numbers)."""
import pytest
import torch
import torch.nn.functional as F

import recsys_kernels as rk
from recsys_kernels import _backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

S = 4096


def _need_backend(op, backend):
    if backend not in _backend.available_backends(op, "cuda"):
        pytest.skip(_backend.availability(op)[backend])


@pytest.mark.benchmark(group=f"int8 GEMM {S}^3 int32", min_rounds=5, max_time=0.5)
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch_int_mm"])
def test_int8_gemm(run_bench, impl):
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (S, S), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (S, S), dtype=torch.int8, device="cuda")  # [N, K]
    if impl != "torch_int_mm":
        _need_backend("int8_matmul", impl)

        def fn(x, w):
            return rk.int8_matmul(x, w, backend=impl)
        assert torch.equal(fn(a, b), torch._int_mm(a, b.t()))  # exact: must be bit-identical
    else:
        def fn(x, w):
            return torch._int_mm(x, w.t())
    run_bench(fn, a, b, bytes_moved=2 * S * S + 4 * S * S, ops=2 * S ** 3, shape=(S, S, S), impl=impl, peak="int8")


@pytest.mark.benchmark(group=f"int8_linear bf16 K=N={S}", min_rounds=5, max_time=0.5)
@pytest.mark.parametrize("m", [16, S])
@pytest.mark.parametrize("impl", ["cuda_dynamic", "triton_dynamic", "torch_bf16_linear"])
def test_int8_linear_vs_bf16_linear(run_bench, m, impl):
    torch.manual_seed(0)
    x = torch.randn(m, S, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(S, S, device="cuda") / S ** 0.5
    bias = torch.randn(S, device="cuda")
    if impl.endswith("_dynamic"):
        backend = impl.split("_")[0]
        _need_backend("int8_linear", backend)
        wq, ws = rk.quantize_weight_int8(w, backend=backend)

        def fn(t):
            return rk.int8_linear(t, wq, ws, bias, backend=backend)
        ref = F.linear(x.float(), w, bias)
        rel = ((fn(x).float() - ref).norm() / ref.norm()).item()
        assert rel < 2e-2, rel  # int8 quantization error, not a wrong result
        weight_bytes = S * S + 4 * S
    else:
        wb, bb = w.bfloat16(), bias.bfloat16()

        def fn(t):
            return F.linear(t, wb, bb)
        weight_bytes = 2 * S * S
    run_bench(fn, x, bytes_moved=weight_bytes + 2 * m * S * 2, ops=2 * m * S * S, shape=(m, S, S), impl=impl)
