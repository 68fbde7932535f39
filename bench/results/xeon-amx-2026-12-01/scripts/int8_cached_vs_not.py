import time, torch, sys, statistics as st
import recsys_kernels as rk
torch.set_num_threads(2)
B, L, N, D = 4096, 32, 1_000_000, 128
g = torch.Generator().manual_seed(0)
w = torch.randn(N, D, generator=g)
bits = 8
q = rk.quantize_rowwise(w, bits)
g = torch.Generator().manual_seed(1)
sets = [torch.randint(0, N, (B * L,), generator=g) for _ in range(30)]
off = torch.arange(B + 1) * L
op = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
peer = lambda idx: op(q, idx, off, mode=0, include_last_offset=True)
ours = lambda idx: rk.embedding_bag(q, idx, off, bits=bits, backend="cpu")
def t(f, idx):
    s = time.perf_counter(); f(idx); return (time.perf_counter() - s) * 1e3
for name, f in (("torch", peer), ("ours", ours), ("torch", peer), ("ours", ours)):
    fixed = [t(f, sets[0]) for _ in range(30)]
    fresh = [t(f, sets[i % 30]) for i in range(1, 61)]
    small = [t(f, sets[0] % 20000) for _ in range(30)]
    print(f"{name}: same rows each call {st.median(fixed):.3f} ms, fresh rows {st.median(fresh):.3f} ms, 20k-row subset {st.median(small):.3f} ms")
