import os, sys, torch
import recsys_kernels as rk
from recsys_kernels import _loader
def p(*a):
    print(*a, flush=True)
maps = open('/proc/self/maps').read().splitlines()
p("libs:", sorted({l.split()[-1] for l in maps if any(s in l for s in ("libstdc++", "libgcc_s", "_C_cuda", "recsys_kernels/_C"))}))
def attempt(name, fn):
    try:
        fn(); p(name, "NO ERROR")
    except Exception as e:
        p(name, "raised", type(e).__name__, str(e).splitlines()[0][:150])
step = sys.argv[1] if len(sys.argv) > 1 else "all"
ops = torch.ops.recsys_kernels
if step in ("all", "cpu"):
    attempt("cpu embedding_bag bad index", lambda: rk.embedding_bag(torch.randn(4, 3), torch.tensor([9]), torch.tensor([0, 1]), backend="cpu"))
if step in ("all", "cuda_pre"):
    a = torch.zeros(4, 8, dtype=torch.int8, device="cuda"); b = torch.zeros(4, 9, dtype=torch.int8, device="cuda")
    attempt("cuda int8_matmul shape check (no launch)", lambda: ops.int8_matmul.default(a, b, None, None, None, "none", None))
if step in ("all", "cuda_post"):
    attempt("cuda embedding_bag bad index (after launch)", lambda: rk.embedding_bag(torch.randn(4, 3, device="cuda"), torch.tensor([9], device="cuda"), torch.tensor([0, 1], device="cuda"), backend="cuda"))
p("done", step)
