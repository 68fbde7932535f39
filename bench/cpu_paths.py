"""Int8Linear on every CPU path this machine has, side by side with the issue's peers.

    python bench/cpu_paths.py [--threads 2] [--rounds 15]

For each shape of bench_int8_linear.py and each path (RECSYS_KERNELS_CPU_ISA = avx2, avx512_vnni,
amx, where the CPU has them), the module path (prepacked weight, dynamic activation quantization)
against torch.ao's dynamic quantized Linear (onednn engine) and F.linear in fp32 / bf16 (casts
included). Each round times every implementation once, in turn; the table gives the median time and
the median of the per-round ratios (> 1: ours faster). The outputs of the paths are checked to be
bit-equal first (they share the row quantization and the epilogue). bench/gpu_check.sh runs it on
the GPU machine, whose CPU has AVX512-VNNI and AMX; the 2-core development machines have AVX2 only.
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


def available_paths():
    f = C.cpu_features()
    return ["avx2"] + (["avx512_vnni"] if f["avx512_vnni"] == "yes" else []) + (
        ["amx"] if f["amx_int8"] == "yes" else [])


def on_path(path, fn):
    def run(x):
        os.environ[ISA_VAR] = path
        try:
            return fn(x)
        finally:
            del os.environ[ISA_VAR]
    return run


def implementations(linear, paths):
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao's deprecation notices
    torch.set_num_threads(args.threads)
    paths = available_paths()
    print(f"threads {args.threads}; CPU features {C.cpu_features()}")
    for m, k, n in SHAPES:
        g = torch.Generator().manual_seed(0)
        linear = nn.Linear(k, n).eval()
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        x = torch.randn(m, k, generator=g)
        impls = implementations(linear, paths)
        with torch.no_grad():
            outs = [impls[f"ours[{p}]"](x) for p in paths]
            assert all(torch.equal(outs[0], o) for o in outs[1:]), "the CPU paths disagree"
            times = {name: [] for name in impls}
            for name, fn in impls.items():  # warm-up
                fn(x)
            for r in range(args.rounds):
                order = list(impls.items())
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    times[name].append(timed(fn, x))
        base = times.get("ao dynamic onednn", times["fp32 F.linear"])
        base_name = "ao dynamic onednn" if "ao dynamic onednn" in times else "fp32 F.linear"
        print(f"\nM={m} K={k} N={n}  (ratio: {base_name} time / this time, median over rounds)")
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = statistics.median(b / t for b, t in zip(base, ts))
            print(f"  {name:20s} {med * 1e3:9.3f} ms  {2 * m * k * n / med / 1e9:8.1f} GOP/s  {ratio:6.2f}x")


if __name__ == "__main__":
    main()
