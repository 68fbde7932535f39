"""Our CPU kernels on every vector path this machine has, side by side with the issues' peers.

    python bench/cpu_paths.py [--threads 2] [--rounds 15] [--only linear|embedding|topk]

Int8Linear: for each shape of bench_int8_linear.py and each path (RECSYS_KERNELS_CPU_ISA = avx2,
avx512_vnni, amx, where the CPU has them), the module path (prepacked weight, dynamic activation
quantization) against torch.ao's dynamic quantized Linear (onednn engine) and F.linear in fp32 /
bf16 (casts included). embedding_bag, shape A of issue 3 (1M x 128, 4096 bags of 32 uniform
indices, sum): fp32 / int8 / int4 tables on avx2 and avx512 against F.embedding_bag and torch's
quantized row-wise ops. topk_scores at issue 5's retrieval shape (1024 queries, 1M x 64, k = 100):
fp32 on avx2 / avx512, int8 on avx2 / avx512_vnni, against torch's chunked mm + topk. Each round times every implementation once, in turn (the order
alternating); the table gives the median time and the median of the per-round ratios (> 1: ours
faster). The outputs of our paths are checked to be bit-equal first. bench/gpu_check.sh runs it on
the GPU machine, whose CPU has AVX-512, VNNI and AMX; the 2-core development machines have AVX2 only.
"""
import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import recsys_kernels._C as C
from recsys_kernels.nn.linear import Int8Linear

SHAPES = [(4096, 1024, 1024), (256, 1024, 4096), (4096, 128, 128), (1, 1024, 1024)]
ISA_VAR = "RECSYS_KERNELS_CPU_ISA"


def available_paths(names):
    f = C.cpu_features()
    return ["avx2"] + [n for n in names if f[{"amx": "amx_int8"}.get(n, n)] == "yes"]


def on_path(path, fn):
    def run(x):
        os.environ[ISA_VAR] = path
        try:
            return fn(x)
        finally:
            del os.environ[ISA_VAR]
    return run


def linear_implementations(linear, paths):
    module = Int8Linear.from_float(linear)
    impls = {f"ours[{p}]": on_path(p, module) for p in paths}
    with torch.no_grad():
        w16, b16 = linear.weight.bfloat16(), linear.bias.bfloat16()
    impls["fp32 F.linear"] = lambda x: F.linear(x, linear.weight, linear.bias)
    impls["bf16 F.linear"] = lambda x: F.linear(x.bfloat16(), w16, b16).float()
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
        impls["ao dynamic onednn"] = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear},
                                                                            dtype=torch.qint8)
    return impls


def timed(fn, x):
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def _same(a, b):
    """Bit equality of two results: tensors, or tuples of them (topk_scores' ids and scores)."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def compare(title, impls, x, rounds, base_name, rate):
    """Times impls (name -> fn(x)) in alternating rounds; prints median times and the ratios of
    base_name's time to each, per round. rate(seconds) -> the throughput column's text."""
    with torch.no_grad():
        ours = [fn(x) for name, fn in impls.items() if name.startswith("ours")]
        assert all(_same(ours[0], o) for o in ours[1:]), f"{title}: our CPU paths disagree"
        times = {name: [] for name in impls}
        for fn in impls.values():  # warm-up
            fn(x)
        for r in range(rounds):
            order = list(impls.items())
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                times[name].append(timed(fn, x))
    print(f"\n{title}  (ratio: {base_name} time / this time, median over rounds)")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(b / t for b, t in zip(times[base_name], ts))
        print(f"  {name:24s} {med * 1e3:9.3f} ms  {rate(med)}  {ratio:6.2f}x")


def run_linear(rounds):
    paths = available_paths(["avx512_vnni", "amx"])
    for m, k, n in SHAPES:
        g = torch.Generator().manual_seed(0)
        linear = nn.Linear(k, n).eval()
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        x = torch.randn(m, k, generator=g)
        impls = linear_implementations(linear, paths)
        base = "ao dynamic onednn" if "ao dynamic onednn" in impls else "fp32 F.linear"
        compare(f"Int8Linear M={m} K={k} N={n}", impls, x, rounds, base,
                lambda t: f"{2 * m * k * n / t / 1e9:8.1f} GOP/s")


def run_embedding(rounds):
    import recsys_kernels as rk
    paths = available_paths(["avx512"])
    n_rows, dim, n_bags, bag_len = 1_000_000, 128, 4096, 32
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n_rows, dim, generator=g)
    indices = torch.randint(0, n_rows, (n_bags * bag_len,), generator=g)
    offsets = torch.arange(0, n_bags * bag_len + 1, bag_len)
    idx32, off32 = indices.int(), offsets.int()
    # One table per format for both sides: torch's prepacked rows are our format, byte for byte.
    # (With a copy each, every call would find in L3 the rows of whichever table the previous call
    # read: a call after one on the other table runs up to 1.3x slower on these L3-resident rows.)
    q8 = torch_q8 = torch.ops.quantized.embedding_bag_byte_prepack(weight)
    q4 = torch_q4 = torch.ops.quantized.embedding_bag_4bit_prepack(weight)
    cases = {
        "fp32": (weight, 8, lambda _: F.embedding_bag(idx32, weight, off32[:-1], mode="sum"), "F.embedding_bag",
                 4 * dim),
        "int8": (q8, 8, lambda _: torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            torch_q8, indices, offsets, mode=0, include_last_offset=True), "torch byte_rowwise", dim + 8),
        "int4": (q4, 4, lambda _: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
            torch_q4, indices, offsets, mode=0, include_last_offset=True), "torch 4bit_rowwise", dim // 2 + 4),
    }
    for fmt, (table, bits, peer, peer_name, row_bytes) in cases.items():
        impls = {f"ours[{p}]": on_path(p, lambda _, t=table, b=bits: rk.embedding_bag(t, idx32, off32, bits=b,
                                                                                      backend="cpu"))
                 for p in paths}
        impls[peer_name] = peer
        compare(f"embedding_bag {fmt} 1M x {dim}, {n_bags} bags x {bag_len}", impls, None, rounds, peer_name,
                lambda t: f"{n_bags * bag_len * row_bytes / t / 1e9:8.1f} GB/s")


def run_topk(rounds):
    import recsys_kernels as rk
    from bench_scoring import D, N_ITEMS, TOPK_K, TOPK_U, torch_topk  # bench/ is the script's directory
    g = torch.Generator().manual_seed(0)
    items = torch.randn(N_ITEMS, D, generator=g)
    packed = rk.quantize_rowwise(items, 8)
    q = torch.randn(TOPK_U, D, generator=g)
    flops = 2 * TOPK_U * N_ITEMS * D
    for fmt, table, paths in (("fp32", items, available_paths(["avx512"])),
                              ("int8", packed, available_paths(["avx512_vnni"]))):
        impls = {f"ours[{p}]": on_path(p, lambda _, t=table: rk.topk_scores(q, t, TOPK_K, backend="cpu"))
                 for p in paths}
        impls["torch mm + topk (fp32)"] = lambda _: torch_topk(q, items, TOPK_K)
        compare(f"topk_scores {fmt} catalog {N_ITEMS} x {D}, {TOPK_U} queries, k={TOPK_K}", impls, None, rounds,
                "torch mm + topk (fp32)", lambda t: f"{flops / t / 1e9:8.1f} GFLOP/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", choices=["linear", "embedding", "topk"])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao's deprecation notices
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; CPU features {C.cpu_features()}")
    for name, run in (("linear", run_linear), ("embedding", run_embedding), ("topk", run_topk)):
        if args.only in (None, name):
            run(args.rounds if name != "topk" else max(3, args.rounds // 2))


if __name__ == "__main__":
    main()
