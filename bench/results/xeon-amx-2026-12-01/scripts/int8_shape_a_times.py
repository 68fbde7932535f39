import time, torch, sys, statistics as st
import recsys_kernels as rk
torch.set_num_threads(2)
B, L, N, D = 4096, 32, 1_000_000, 128
g = torch.Generator().manual_seed(0)
w = torch.randn(N, D, generator=g)
bits = int(sys.argv[1]) if len(sys.argv) > 1 else 8
q = rk.quantize_rowwise(w, bits)
g = torch.Generator().manual_seed(1)
idx = torch.randint(0, N, (B * L,), generator=g); off = torch.arange(B + 1) * L
op = torch.ops.quantized.embedding_bag_byte_rowwise_offsets if bits == 8 else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
peer = lambda: op(q, idx, off, mode=0, include_last_offset=True)
ours = lambda: rk.embedding_bag(q, idx, off, bits=bits, backend="cpu")
for _ in range(5): peer(); ours()
tp, to = [], []
for _ in range(60):
    t = time.perf_counter(); peer(); tp.append(time.perf_counter() - t)
    t = time.perf_counter(); ours(); to.append(time.perf_counter() - t)
mp, mo = st.median(tp) * 1e3, st.median(to) * 1e3
print(f"bits={bits} torch {mp:.3f} ms ours {mo:.3f} ms ratio {mp/mo:.2f}x  ns/row/thread ours {mo*1e6/(B*L/2):.2f} torch {mp*1e6/(B*L/2):.2f}")
