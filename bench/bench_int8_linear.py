"""int8 Linear on CPU: our C++ kernels against the peers a user would otherwise pick.

Shapes (M, K, N): (4096, 1024, 1024) and (256, 1024, 4096) (compute-bound), (4096, 128, 128)
(small layer, quantization and output traffic matter), (1, 1024, 1024) (one row: weight traffic).
fp32 x in, fp32 y out; the activation quantization is inside every int8 timing.

Peers: F.linear fp32; F.linear in bf16 with the casts of x and y (weights pre-cast); torch.ao
dynamic quantized Linear (quantize_dynamic, qint8 per-tensor weights) under each quantized engine
this torch supports (onednn, x86, fbgemm); torch._int_mm with our per-row quantization and the
dequant around it (eager). Ours: the int8_linear op (packs the weight on each call) and the
Int8Linear module path (weight prepacked once: int8_linear_packed), both act_quant="dynamic".

GOP/s counts 2 M K N. The CPU path follows RECSYS_KERNELS_CPU_ISA (set it to "scalar" to time
the fallback). Run: pytest bench/bench_int8_linear.py -q (or --benchmark-disable for a smoke run)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recsys_kernels as rk
from recsys_kernels import _backend
from recsys_kernels.nn.linear import Int8Linear

from conftest import temporarily  # bench/ is on the path, as for the other benchmarks

SHAPES = [(4096, 1024, 1024), (256, 1024, 4096), (4096, 128, 128), (1, 1024, 1024)]
IMPLS = ["fp32_linear", "bf16_linear", "ao_dynamic_onednn", "ao_dynamic_x86", "ao_dynamic_fbgemm",
         "int_mm", "ours_int8_linear", "ours_module_packed"]


@functools.cache
def _data(m, k, n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        linear.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return x, linear.eval()


@functools.cache
def _reference(m, k, n):
    x, linear = _data(m, k, n)
    with torch.no_grad():
        return linear(x)


def _make(impl, x, linear):
    """The callable fn(x) an implementation runs (weights prepared outside the timing)."""
    if impl == "fp32_linear":
        w, b = linear.weight.detach(), linear.bias.detach()
        return lambda x: F.linear(x, w, b)
    if impl == "bf16_linear":
        w, b = linear.weight.detach().bfloat16(), linear.bias.detach().bfloat16()
        return lambda x: F.linear(x.bfloat16(), w, b).float()
    if impl.startswith("ao_dynamic_"):
        engine = impl.removeprefix("ao_dynamic_")
        if engine not in torch.backends.quantized.supported_engines:
            pytest.skip(f"quantized engine {engine} is not supported by this torch")
        with temporarily(torch.backends.quantized, "engine", engine):
            q = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)

        def run(x):
            with temporarily(torch.backends.quantized, "engine", engine):
                return q(x)
        return run
    if impl == "int_mm":
        wq, ws = rk.quantize_weight_int8(linear.weight.detach(), backend="reference")
        w_kn, b = wq.T.contiguous(), linear.bias.detach()  # _int_mm takes [K, N]

        def run(x):
            xq, xs = rk.quantize_rows_int8(x)
            acc = torch._int_mm(xq, w_kn)
            return acc.float() * xs[:, None] * ws + b
        if x.shape[0] <= 16:
            pytest.skip("torch._int_mm needs M > 16 on CPU")
        return run
    if impl in ("ours_int8_linear", "ours_module_packed"):
        if "cpu" not in _backend.available_backends("int8_linear", "cpu"):
            pytest.skip(_backend.availability("int8_linear")["cpu"])
        module = Int8Linear.from_float(linear)
        if impl == "ours_module_packed":
            return module
        wq, ws, b = module.weight_q, module.weight_scale, module.bias
        return lambda x: rk.int8_linear(x, wq, ws, b, backend="cpu")
    raise ValueError(impl)


@pytest.mark.benchmark(min_rounds=5, max_time=1.0)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_linear(run_bench, benchmark, impl, m, k, n):
    benchmark.group = f"linear fp32 in/out M={m} K={k} N={n}"
    x, linear = _data(m, k, n)
    fn = _make(impl, x, linear)
    with torch.no_grad():
        ref = _reference(m, k, n)
        got = fn(x)
        # every int8 peer is within a few % of the float layer (a wiring check, not accuracy)
        assert ((got - ref).norm() / ref.norm()).item() < 5e-2

    def call(x):
        with torch.no_grad():
            return fn(x)

    run_bench(call, x, bytes_moved=4 * m * k + n * k + 4 * m * n, ops=2 * m * k * n, shape=(m, k, n), impl=impl,
              peak={"fp32_linear": "fp32", "bf16_linear": None}.get(impl, "int8"), peer=not impl.startswith("ours"))


@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_paired_vs_peers(paired_ratio, m, k, n):
    """The issue's ratios measured the steadier way (conftest's paired_ratio): our module path
    against the onednn-engine dynamic quantized Linear (the fastest peer for the big shapes), the
    fbgemm engine (M = 1's target) and fp32 F.linear, each pair called in turn on the same x."""
    x, linear = _data(m, k, n)
    ours = _make("ours_module_packed", x, linear)
    engines = torch.backends.quantized.supported_engines
    for peer in ("ao_dynamic_onednn", "ao_dynamic_fbgemm", "fp32_linear"):
        if peer.startswith("ao_dynamic_") and peer.removeprefix("ao_dynamic_") not in engines:
            continue
        with torch.no_grad():
            paired_ratio(f"linear {m}x{k}x{n} vs {peer}", functools.partial(_make(peer, x, linear), x),
                         {"ours_module_packed": functools.partial(ours, x)}, rounds=20 if m * n > 4096 else 200)
