"""One call of each CUDA embedding_bag forward at issue 3's GPU shape (a 1,000,000 x 128 table,
65,536 bags of 32 uniform indices, sum), fp32 / int8 / int4 rows, each inside an NVTX range named
profile_<format>, for Nsight Compute's hardware counters (bench/gpu_check.sh runs it under ncu):
why quantized rows, a quarter or an eighth of the bytes, took as long as fp32 rows on the H200
(0.335 / 0.310 ms against 0.328, 2026-11-30). Without ncu it just runs the three calls."""
import torch

import recsys_kernels as rk

N, D, B, L = 1_000_000, 128, 65_536, 32


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(N, D, generator=g, device="cuda")
    indices = torch.randint(0, N, (B * L,), generator=g, device="cuda")
    offsets = torch.arange(B + 1, device="cuda") * L
    for name, weight, bits in (("fp32", table, 8), ("int8", rk.quantize_rowwise(table, 8), 8),
                               ("int4", rk.quantize_rowwise(table, 4), 4)):
        for _ in range(3):  # warm-up, outside the profiled range
            rk.embedding_bag(weight, indices, offsets, bits=bits, backend="cuda")
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(f"profile_{name}")
        rk.embedding_bag(weight, indices, offsets, bits=bits, backend="cuda")
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(f"{name}: profiled one call")


if __name__ == "__main__":
    main()
