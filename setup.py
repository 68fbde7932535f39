"""Build recsys_kernels: the C++ CPU extension always, the CUDA extension when it can.

Environment switches:
  RECSYS_KERNELS_CUDA=auto|0|1   auto (default): build CUDA sources when torch is a CUDA build and
                                 a CUDA toolkit is found; 0: never (fast CPU-only iteration);
                                 1: always, and fail loudly if that is impossible.
  TORCH_CUDA_ARCH_LIST           honoured as usual; default below.
  MAX_JOBS                       parallel compile jobs (ninja), honoured by torch's build_ext.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    # pip's isolated build environment has no torch (pyproject.toml does not ask for one): an
    # extension built there against another torch would not load in the target environment
    sys.exit("recsys_kernels compiles against the torch installed in the environment it goes to: install "
             "torch first, then build with `pip install --no-build-isolation ...`")

ROOT = os.path.dirname(os.path.abspath(__file__))
# SASS for Ampere (sm_80; it also runs on sm_86/sm_89: same major version) and Hopper (sm_90),
# plus PTX of the newest for later cards. Two SASS targets instead of four halve the nvcc time.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_build_requested():
    switch = os.environ.get("RECSYS_KERNELS_CUDA", "auto").lower()
    if switch in ("0", "off", "false", "no"):
        return False, "disabled by RECSYS_KERNELS_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME)")
    elif not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        # (torch's finder takes /usr/local/cuda whenever it exists, a runtime-only one too)
        problems.append(f"no nvcc in CUDA_HOME={cpp_extension.CUDA_HOME}")
    if problems:
        if switch in ("1", "on", "true", "yes"):
            sys.exit("RECSYS_KERNELS_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, ""


def cuda_include_dirs():
    """cuBLAS/cuSPARSE/CCCL headers shipped by the nvidia-* pip wheels that torch depends on."""
    dirs = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cublas/include"):
            path = os.path.join(site, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


# Naming convention: *.cpp -> the CPU extension _C; *.cu and *.cc (host code of the CUDA
# extension, e.g. its module init) -> _C_cuda.
def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True))


# Link the C++ runtime as a shared library whatever the compiler driver finds: the GPU machine's g++
# is a wrapper (-B/opt/gcc/lib/gcc/x86_64-linux-gnu/13/) under which both the driver's -lstdc++ and
# our own resolved to a static libstdc++.a, a second C++ runtime inside the extension beside the one
# torch loads; formatting a number into an error message then crashed the process (2026-11-28/30).
# The file itself, the libstdc++ this python has loaded with torch, is always linked as a shared
# library (after -Bdynamic, in case a driver switched to -Bstatic before our arguments).
def shared_libstdcxx():
    try:
        with open("/proc/self/maps") as maps:
            loaded = [line.split()[-1] for line in maps if "/libstdc++.so" in line]
    except OSError:  # not Linux
        loaded = []
    return ["-Wl,-Bdynamic", loaded[0]] if loaded else ["-lstdc++"]


SHARED_LIBSTDCXX = shared_libstdcxx()


# Python's own build flags carry -g: with it the CPU extension was 115 MB (8 MB without the debug
# info) and its heaviest unit compiled in 75 s instead of 47-54 s. RECSYS_KERNELS_DEBUG_INFO=1
# keeps it (for perf annotate with source lines, gdb).
NO_DEBUG_INFO = [] if os.environ.get("RECSYS_KERNELS_DEBUG_INFO") == "1" else ["-g0"]


def extensions():
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", *NO_DEBUG_INFO]
    include_dirs = [os.path.join(ROOT, "csrc")]
    exts = [
        cpp_extension.CppExtension(
            "recsys_kernels._C",
            sources("**/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp", *SHARED_LIBSTDCXX],
        )
    ]
    build_cuda, why_not = cuda_build_requested()
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        exts.append(
            cpp_extension.CUDAExtension(
                "recsys_kernels._C_cuda",
                sources("**/*.cu") + sources("**/*.cc"),
                include_dirs=include_dirs + cuda_include_dirs(),
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++20", *NO_DEBUG_INFO],
                    "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
                },
                extra_link_args=SHARED_LIBSTDCXX,
            )
        )
        print(f"recsys_kernels: building the CUDA extension for archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        print(f"recsys_kernels: not building the CUDA extension ({why_not})")
    return exts


# The extension loads only with the torch it was compiled against (recsys_kernels/_loader.py
# checks): the package asks for that release.
TORCH_RELEASE = torch.__version__.split("+")[0]

setup(
    install_requires=[f"torch=={TORCH_RELEASE}", "numpy"],
    packages=find_packages(include=["recsys_kernels", "recsys_kernels.*"]) + ["recsys_kernels._triton"],
    package_dir={"recsys_kernels._triton": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
