"""pytest-benchmark setup shared by every benchmark in bench/ (DESIGN.md §7).

- Files named bench_*.py are collected (their functions are still test_*).
- The `run_bench` fixture times a call with pytest-benchmark, synchronising CUDA around each call
  when any tensor argument is on a GPU (so the time is the kernel's, not the launch's), and records
  in `extra_info` the shape, the bytes the op must move (each input read once, each output written
  once), its operation count, and this machine's measured memory bandwidth.
- The memory bandwidth is measured once per device and session, in the same run as the benchmarks:
  the best of a few full reads (a sum) of a large tensor. Gathers and pooling ops mostly read, so
  their limit is the read bandwidth.
- A benchmark marked peer=True is what a user would otherwise run (PyTorch, FBGEMM, ...); the
  others are compared against the fastest peer of their group and `case`: "x peer" = the peer's
  median time / this one's (> 1: faster than the best peer).
- A compute-bound benchmark names the arithmetic it runs (`peak="fp32"` or `"int8"`); that
  peak is measured once per device and session, in the same run: the best GOP/s of a vendor
  GEMM, M x K x N = 4096 x 1024 x 1024 on CPU, the better of 4096^3 and 8192^3 on CUDA (fp32:
  torch.mm, without TF32; int8: on CPU oneDNN's u8 x s8 GEMM inside torch.ao's dynamic quantized
  Linear, on CUDA torch._int_mm, i.e. cuBLASLt). "% of peak" is against what the library reaches here, not a
  data sheet.
- At the end, a table prints each benchmark's median time, GB/s, % of the measured bandwidth,
  GOP/s, % of the measured peak and the ratio to the peer. The same numbers are in
  --benchmark-json's extra_info.
- The `paired_ratio` fixture measures a ratio to the peer the steadier way: the peer and ours are
  called in turn, round after round, and the ratio is taken per round. On these shared machines the
  speed drifts by tens of percent between tests, so two medians from separate tests can disagree
  by that much (torch's own int64 and int32 embedding_bag medians once differed by 1.6x); two calls
  a few milliseconds apart see the same machine. Its table prints after the throughput table.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import pytest
import torch

_BANDWIDTH_GBPS: dict[str, float] = {}  # device type -> measured read bandwidth, GB/s
# paired_ratio's results: (case, impl, rounds, q1, median, q3, total: summed peer time / summed impl time)
_PAIRED: list[tuple[str, str, int, float, float, float, float]] = []
_PROBE_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


def pytest_collect_file(parent, file_path):
    # a file named on the command line is collected by pytest itself: collecting it here too would
    # run (and report) every benchmark in it twice
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, runs: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measured_bandwidth(device: torch.device | str) -> float:
    """GB/s of reading a large device-local tensor (a sum: one read, no write), best of several runs."""
    device = torch.device(device)
    if device.type not in _BANDWIDTH_GBPS:
        nbytes = _PROBE_BYTES.get(device.type, 256 << 20)
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()  # not zeros
        _BANDWIDTH_GBPS[device.type] = nbytes / _best_time(src.sum, device, runs=7) / 1e9
        del src
    return _BANDWIDTH_GBPS[device.type]


_PEAK_GOPS: dict[tuple[str, str], float] = {}  # (device type, "fp32" | "int8") -> measured GOP/s


@contextlib.contextmanager
def temporarily(obj, name: str, value):
    """obj.name = value inside the block (a backend setting: the quantized engine, TF32)."""
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


def _int8_gemm_cpu(m: int, n: int):
    """oneDNN's u8 x s8 GEMM as a user reaches it: torch.ao's dynamic quantized Linear (the
    activation quantization it includes is 1/n of the work); None without a quantized engine."""
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("onednn", "x86", "fbgemm") if e in engines), None)
    if engine is None:
        return None
    with temporarily(torch.backends.quantized, "engine", engine):
        layer = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(n, n)), {torch.nn.Linear},
                                                       dtype=torch.qint8)
    x = torch.randn(m, n)

    def run():
        with temporarily(torch.backends.quantized, "engine", engine):
            layer(x)
    return run


def measured_peak(device: torch.device | str, kind: str) -> float:
    """GOP/s of a vendor GEMM of `kind` ("fp32" or "int8") on this device, best of several runs
    and, on a GPU, of two sizes (nan where there is none): on the H200 torch._int_mm reached
    777 TOP/s at 4096^3 and 127 at 8192^3 (2026-11-30), so one size can say far too little."""
    device = torch.device(device)
    key = (device.type, kind)
    if key not in _PEAK_GOPS:
        sizes = [(4096, 1024)] if device.type == "cpu" else [(4096, 4096), (8192, 8192)]
        rates = []
        for m, n in sizes:
            fn = None
            if kind == "fp32":
                a, b = torch.randn(m, n, device=device), torch.randn(n, n, device=device)

                def fn():
                    a @ b
            elif kind == "int8" and device.type == "cpu":
                fn = _int8_gemm_cpu(m, n)
            elif kind == "int8":
                a = torch.randint(-128, 128, (m, n), dtype=torch.int8, device=device)
                b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)

                def fn():
                    torch._int_mm(a, b)
            if fn is not None:
                with temporarily(torch.backends.cuda.matmul, "allow_tf32", False):  # fp32 means fp32
                    rates.append(2 * m * n * n / _best_time(fn, device) / 1e9)
        _PEAK_GOPS[key] = max(rates, default=float("nan"))
    return _PEAK_GOPS[key]


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


@pytest.fixture
def run_bench(benchmark):
    """run_bench(fn, *args, bytes_moved=..., ops=0, shape=..., peer=False, case="", peak=None)
    -> fn's result.

    Times fn(*args) after one untimed warm-up call. `bytes_moved`: the fewest bytes the op must
    move through memory; `ops`: its arithmetic operations (0 where counting makes no sense);
    `peer`: this is a competitor's implementation; `case`: benchmarks of a group are compared
    within the same case (e.g. "int8" and "int4" in one group); `peak`: "fp32" or "int8", the
    arithmetic whose measured peak the GOP/s are compared with."""

    def run(fn, *args, bytes_moved: int, ops: int = 0, shape=None, peer: bool = False, case: str = "",
            peak: str | None = None, **info):
        device = _device_of(args)
        if peak is not None:
            benchmark.extra_info.update(peak=peak, peak_GOPs=round(measured_peak(device, peak), 2))
        benchmark.extra_info.update(
            device=device.type,
            shape=list(shape) if shape is not None else None,
            bytes=int(bytes_moved),
            ops=int(ops),
            bandwidth_GBps=round(measured_bandwidth(device), 2),
            peer=bool(peer),
            case=str(case),
            **info,
        )
        if device.type == "cuda":
            benchmark.extra_info["gpu"] = torch.cuda.get_device_name(device)

            def call():
                out = fn(*args)
                torch.cuda.synchronize(device)
                return out
        else:
            def call():
                return fn(*args)

        call()  # warm-up outside the timing: lazy init, allocator, first-touch page faults
        _sync(device)
        return benchmark(call)

    return run


@pytest.fixture
def paired_ratio(request):
    """paired_ratio(case, peer_fn, impls, rounds=40) -> {impl name: median ratio} (CPU calls).

    Calls peer_fn and each of impls (a dict name -> function) in turn, `rounds` times (in reverse
    order every other round), and keeps per round the peer's time / the impl's (> 1: faster than
    the peer); records the median and quartiles for the summary table. Under --benchmark-disable
    (the smoke run) it makes 2 rounds."""
    smoke = request.config.getoption("benchmark_disable", False)

    def run(case: str, peer_fn, impls: dict, rounds: int = 40) -> dict:
        n = 2 if smoke else rounds
        fns = {"peer": peer_fn, **impls}
        for fn in fns.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for i in range(n):
            order = list(fns.items())
            for name, fn in order if i % 2 == 0 else order[::-1]:  # who goes first alternates
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        medians = {}
        for name in impls:
            ratios = [p / t for p, t in zip(times["peer"], times[name])]
            q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            total = sum(times["peer"]) / sum(times[name])  # what a loop of such calls gains, its slow rounds included
            _PAIRED.append((case, name, n, q1, med, q3, total))
            medians[name] = med
        return medians

    return run


def _write_paired(tr) -> None:
    tr.write_sep("-", "paired ratios (per round: the peer's time / ours, called in turn; > 1: ours faster; "
                      "total: the peer's summed time / ours)")
    width = max(len(case) + len(name) + 3 for case, name, *_ in _PAIRED)
    tr.write_line(f"{'case':<{width}}  {'rounds':>6} {'median':>7} {'q1':>6} {'q3':>6} {'total':>6}")
    for case, name, n, q1, med, q3, total in _PAIRED:
        tr.write_line(f"{case + ' / ' + name:<{width}}  {n:>6} {med:6.2f}x {q1:5.2f}x {q3:5.2f}x {total:5.2f}x")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    results = [b for b in (session.benchmarks if session else []) if b and "bytes" in b.extra_info]
    if results:
        _write_throughput(terminalreporter, results)
    if _PAIRED:
        _write_paired(terminalreporter)


def _write_throughput(tr, results) -> None:
    tr.write_sep("-", "throughput (median time; bytes = inputs read once + outputs written once)")
    for dev, bw in sorted(_BANDWIDTH_GBPS.items()):
        tr.write_line(f"measured {dev} read bandwidth: {bw:.1f} GB/s "
                      f"(sum of {_PROBE_BYTES.get(dev, 256 << 20) >> 20} MiB, this run)")
    for (dev, kind), gops in sorted(_PEAK_GOPS.items()):
        tr.write_line(f"measured {dev} {kind} peak: {gops:.1f} GOP/s (vendor GEMM, this run)")
    best_peer: dict[tuple, float] = {}
    for b in results:
        if b.extra_info.get("peer"):
            key = (b.group, b.extra_info.get("case", ""))
            best_peer[key] = min(best_peer.get(key, float("inf")), b.stats.median)
    width = max(len(b.name) for b in results)
    tr.write_line(f"{'benchmark':<{width}}  {'device':<6} {'median':>10} {'GB/s':>9} {'% of bw':>8} {'GOP/s':>9} "
                  f"{'% peak':>7} {'x peer':>7}")
    for b in results:
        info, median = b.extra_info, b.stats.median
        gbps = info["bytes"] / median / 1e9
        pct = 100 * gbps / info["bandwidth_GBps"] if info.get("bandwidth_GBps") else float("nan")
        gops = f"{info['ops'] / median / 1e9:9.2f}" if info.get("ops") else f"{'-':>9}"
        of_peak = (f"{100 * info['ops'] / median / 1e9 / info['peak_GOPs']:6.1f}%"
                   if info.get("ops") and info.get("peak_GOPs") else f"{'-':>7}")
        peer = best_peer.get((b.group, info.get("case", "")))
        ratio = "peer" if info.get("peer") else (f"{peer / median:6.2f}x" if peer else "-")
        tr.write_line(f"{b.name:<{width}}  {info['device']:<6} {median * 1e3:8.3f}ms {gbps:9.2f} {pct:7.1f}% {gops} "
                      f"{of_peak} {ratio:>7}")
