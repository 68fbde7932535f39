import torch, recsys_kernels as rk
torch.manual_seed(0)
for L in (20, 32, 200, 10000):
    N, D, B = 2000, 128, 64 if L < 1000 else 4
    w = torch.randn(N, D)
    q = rk.quantize_rowwise(w, 8)
    deq = rk.dequantize_rowwise(q, 8)  # float32: fl(fl(q*s)+b)
    codes = q[:, :D].double(); sb = q[:, D:].contiguous().view(torch.float32).double()
    exact_rows = codes * sb[:, :1] + sb[:, 1:]  # exact dequantized values (no rounding) in fp64
    idx = torch.randint(0, N, (B * L,)); off = torch.arange(B + 1) * L
    exact = torch.nn.functional.embedding_bag(idx, exact_rows, off, mode="sum", include_last_offset=True)
    absum = torch.nn.functional.embedding_bag(idx, exact_rows.abs(), off, mode="sum", include_last_offset=True)
    ref = rk.embedding_bag(deq, idx, off, backend="reference").double()
    ours = rk.embedding_bag(q, idx, off, bits=8, backend="cpu").double()
    fb = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(q, idx, off, mode=0, include_last_offset=True).double()
    for name, x in (("reference", ref), ("ours", ours), ("fbgemm", fb)):
        e = (x - exact).abs()
        print(f"L={L:5d} {name:9s} max abs err {e.max():.2e}  max err / sum|v| {(e / absum).max():.2e}  mean err {e.mean():.2e}")
