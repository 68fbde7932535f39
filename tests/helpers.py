"""Shared test helpers: run a test over every (device, backend) pair that can run an op, so later
issues add backends without touching the tests. Pairs that cannot run show up as skips with the
reason (no GPU, backend not built, no kernel yet), never as passes."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from recsys_kernels import _backend, _loader

DEVICES = ("cpu", "cuda")


def backend_params(op: str, *, include_reference: bool = True):
    """pytest params of (device, backend) for `op`: runnable ones plain, the rest as skips."""
    params = []
    for device in DEVICES:
        for name in _backend.BACKENDS:
            if name == "reference" and not include_reference:
                continue
            pid = f"{device}-{name}"
            if device == "cuda" and not torch.cuda.is_available():
                params.append(pytest.param(device, name, id=pid, marks=pytest.mark.skip(reason="no CUDA GPU")))
                continue
            reason = _backend.availability(op)[name]
            if name in _backend.available_backends(op, device):
                params.append(pytest.param(device, name, id=pid))
            else:
                if reason.startswith("yes"):
                    reason = f"{name} does not run on {device} tensors"
                params.append(pytest.param(device, name, id=pid, marks=pytest.mark.skip(reason=reason)))
    return params


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape filled with NaN (floats) or a sentinel (ints), for outputs a kernel
    must fully overwrite."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, 123)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- CPU instruction sets
ISA_VAR = "RECSYS_KERNELS_CPU_ISA"  # caps the C++ CPU kernels' path; cpu_isa() reads it on every call


def has_avx2() -> bool:
    return has_cpu_feature("avx2")


def has_cpu_feature(name: str) -> bool:
    """name: a key of recsys_kernels._C.cpu_features() (avx2, avx512_vnni, amx_int8, ...)."""
    if "_C" not in _loader.EXTENSIONS:
        return False
    import recsys_kernels._C as C
    return C.cpu_features()[name] == "yes"


ISAS = ["scalar", pytest.param("avx2", marks=pytest.mark.skipif(not has_avx2(), reason="CPU has no AVX2"))]
# embedding_bag also has an AVX-512 kernel (for D a multiple of 16); elsewhere
# test_embedding_bag_avx512_emulated.py runs it on emulated instructions.
AVX512_ISA = pytest.param("avx512", marks=pytest.mark.skipif(not has_cpu_feature("avx512"), reason="CPU has no AVX-512"))
# ... and, from the avx512_vnni path up, a build for 4-bit rows with AVX512_VBMI
AVX512_VBMI_ISA = pytest.param(
    "avx512_vnni", id="avx512_vbmi",
    marks=pytest.mark.skipif(not (has_cpu_feature("avx512_vbmi") and has_cpu_feature("avx512_vnni")),
                             reason="CPU has no AVX512_VBMI with VNNI"))
EMBEDDING_ISAS = ISAS + [AVX512_ISA, AVX512_VBMI_ISA]
# The int8 GEMM also has AVX512-VNNI and AMX kernels: run them where the CPU has them (elsewhere
# test_int8_matmul_wide_emulated.py runs them on emulated instructions).
INT8_GEMM_ISAS = ISAS + [
    pytest.param("avx512_vnni", marks=pytest.mark.skipif(not has_cpu_feature("avx512_vnni"),
                                                         reason="CPU has no AVX512-VNNI")),
    pytest.param("amx", marks=pytest.mark.skipif(not has_cpu_feature("amx_int8"), reason="CPU has no AMX-INT8")),
]


def on_isa(isa, fn):
    """fn() with the CPU path capped at `isa`."""
    old = os.environ.get(ISA_VAR)
    os.environ[ISA_VAR] = isa
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[ISA_VAR]
        else:
            os.environ[ISA_VAR] = old


def on_threads(n, fn):
    """fn() with torch's intra-op thread count at n."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- emulated AVX-512 / AMX
ROOT = Path(__file__).resolve().parents[1]
SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")


def build_emulated_library(out_dir: Path, sources: list[str], opt: str = "-O2") -> ctypes.CDLL:
    """Compiles sources (paths under the repository) with -DRK_EMULATE_WIDE, where
    tests/emulation/wide_emulation.h (SIMDe's AVX-512, a model of the AMX tile ops) stands in for
    the instructions, one g++ per unit in parallel, into a shared library. Skips the calling test
    without g++, the SIMDe headers, or AVX2 (the kernels' scalar parts and helpers use it)."""
    if shutil.which("g++") is None or not SIMDE_HEADER.exists():
        pytest.skip("needs g++ and the SIMDe headers (Debian: apt-get install libsimde-dev; `make test` does)")
    if not has_avx2():
        pytest.skip("the emulated kernels run their AVX2 parts natively")
    return _build_library(out_dir, sources, [opt, "-mavx2", "-mfma", "-mf16c", "-fwrapv", "-DRK_EMULATE_WIDE"])


def build_cuda_emulated_library(out_dir: Path, sources: list[str], torch_headers: bool = False) -> ctypes.CDLL:
    """Compiles sources that include tests/emulation/cuda_emulation.h (CUDA threads as OS threads)
    into a shared library; torch_headers: with torch's include folders, for a kernel header whose
    host part uses ATen (nothing of libtorch is linked). Skips the calling test without g++."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    flags = ["-O1", "-pthread", "-ffp-contract=off"]
    if torch_headers:
        from torch.utils import cpp_extension

        flags += [f"-I{p}" for p in cpp_extension.include_paths()]
        flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    return _build_library(out_dir, sources, flags)


def _build_library(out_dir: Path, sources: list[str], flags: list[str]) -> ctypes.CDLL:
    """One g++ per unit in parallel (C++20, csrc/ and tests/emulation/ on the include path), linked
    into out_dir/emulated.so."""
    compiler = shutil.which("g++")
    flags = [*flags, "-std=c++20", "-fPIC", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests/emulation'}"]

    def compile_one(src):
        obj = out_dir / (Path(src).stem + ".o")
        done = subprocess.run([compiler, *flags, "-c", str(ROOT / src), "-o", str(obj)], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-4000:]
        return str(obj)

    with ThreadPoolExecutor(len(sources)) as pool:
        objects = list(pool.map(compile_one, sources))
    so_path = out_dir / "emulated.so"
    linked = subprocess.run([compiler, "-shared", "-pthread", *objects, "-o", str(so_path)], capture_output=True,
                            text=True)
    assert linked.returncode == 0, linked.stderr[-4000:]
    return ctypes.CDLL(str(so_path))


# ----------------------------------------------------------------------------- Triton for sm_90, offline
SM90_PRELUDE = r'''
import os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])


def build(fn, sig, consts, num_warps, divisible_by_16=()):
    """(PTX, SASS) of a Triton kernel compiled for sm_90; divisible_by_16 names the arguments that
    a launch would specialize as multiples of 16 (aligned pointers, such sizes and strides)."""
    attrs = {(list(sig).index(n),): [["tt.divisibility", 16]] for n in divisible_by_16}
    c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
    path = os.path.join(sys.argv[1], "k.cubin")
    open(path, "wb").write(c.asm["cubin"])
    sass = subprocess.run([NVDISASM, path], capture_output=True, text=True, check=True).stdout
    return c.asm["ptx"], sass
'''


def run_sm90_compile(script: str, tmp_path) -> str:
    """Run SM90_PRELUDE + script in a fresh interpreter (Triton compiled for sm_90 ahead of time,
    with the ptxas and nvdisasm in the triton wheel: no GPU needed; TRITON_INTERPRET unset) and
    return its output, which must end with "ok". Skips where the wheel lacks the NVIDIA tools."""
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")):
        pytest.skip("triton wheel without the NVIDIA tools")
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", SM90_PRELUDE + script, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr[-3000:]
    return out.stdout
