import torch, recsys_kernels as rk, sys
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..', '..', '..', 'tests'))
from helpers import on_isa
for seed in range(3):
  g = torch.Generator().manual_seed(seed)
  for L in (32, 1000):
    N, D = 500, 64
    w = torch.randn(N, D, generator=g) * torch.rand(N, 1, generator=g) * 3 + torch.randn(N, 1, generator=g)
    q = rk.quantize_rowwise(w, 8)
    codes = q[:, :D].double(); sb = q[:, D:].contiguous().view(torch.float32).double()
    exact_rows = codes * sb[:, :1] + sb[:, 1:]
    B = 64 if L == 32 else 4
    idx = torch.randint(0, N, (B * L,), generator=g); off = torch.arange(B + 1) * L
    exact = torch.nn.functional.embedding_bag(idx, exact_rows, off, mode="sum", include_last_offset=True)
    ref = rk.embedding_bag(q, idx, off, bits=8, backend="reference").double()
    eref = (ref - exact).abs().mean()
    for isa in ("scalar", "avx2", "avx512"):
        ours = on_isa(isa, lambda: rk.embedding_bag(q, idx, off, bits=8, backend="cpu")).double()
        e = (ours - exact).abs().mean()
        print(seed, L, isa, f"ours/ref mean err {e/eref:.2f}")
