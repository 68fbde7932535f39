import torch, recsys_kernels as rk
torch.manual_seed(0)
N, D, B = 2000, 128, 64
w = torch.randn(N, D); q = rk.quantize_rowwise(w, 8)
codes = q[:, :D].double(); sb = q[:, D:].contiguous().view(torch.float32).double()
s, b = sb[:, 0], sb[:, 1]
for L in (20, 32, 100):
    idx = torch.randint(0, N, (B, L))
    exact = (codes[idx] * s[idx, None] + b[idx, None]).sum(1)
    absum = (codes[idx] * s[idx, None] + b[idx, None]).abs().sum(1)
    for fold in (1, 2, 4, 8, 32):
        acc = torch.zeros(B, D, dtype=torch.float32); biases = torch.zeros(B, 1, dtype=torch.float32)
        for j in range(L):
            r = idx[:, j]
            acc = (codes[r] * s[r, None] + acc.double()).float()
            biases = (biases.double() + b[r, None]).float()
            if j % fold == fold - 1 or j == L - 1:
                acc = (acc.double() + biases.double()).float(); biases.zero_()
        e = (acc.double() - exact).abs()
        print(f"L={L} fold every {fold:2d}: mean err {e.mean():.2e} max err/sum|v| {(e/absum).max():.2e}")
    # FBGEMM form
    acc = torch.zeros(B, D, dtype=torch.float32)
    for j in range(L):
        r = idx[:, j]
        t = (acc.double() + b[r, None]).float()
        acc = (codes[r] * s[r, None] + t.double()).float()
    e = (acc.double() - exact).abs(); print(f"L={L} fbgemm form: mean err {e.mean():.2e} max err/sum|v| {(e/absum).max():.2e}")
