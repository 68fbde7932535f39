import time, torch, sys, statistics as st
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..', '..'))
import torch.nn.functional as F
import recsys_kernels as rk
import bench_embedding_bag as b
torch.set_num_threads(2)
w = b._table(50000, 64); idx, off = b._bags(50000, 'zipf')
peer = lambda: F.embedding_bag(idx, w, off, mode="sum", include_last_offset=True)
ours = lambda: rk.embedding_bag(w, idx, off, backend="cpu")
out = torch.empty(4096, 64)
for _ in range(5): peer(); ours()
tp, to = [], []
for _ in range(100):
    t = time.perf_counter(); peer(); tp.append(time.perf_counter() - t)
    t = time.perf_counter(); ours(); to.append(time.perf_counter() - t)
print(f"torch {st.median(tp)*1e6:.1f} us (min {min(tp)*1e6:.1f}), ours {st.median(to)*1e6:.1f} us (min {min(to)*1e6:.1f})")
