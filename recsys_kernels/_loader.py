"""Loads the compiled extensions. Missing or stale builds degrade to the reference backend with a
clear warning instead of an ImportError, so the package always imports."""
from __future__ import annotations

import importlib
import warnings

import torch

# name -> loaded module, or the reason it is not loaded
EXTENSIONS: dict[str, object] = {}
LOAD_ERRORS: dict[str, str] = {}

# (a wheel user has no checkout: the hint says where the command runs)
_REBUILD_HINT = ("build it from a source checkout with `pip install --no-build-isolation -e .` in this "
                 "environment (RECSYS_KERNELS_CUDA=1 for the CUDA extension)")


def _load(name: str, what: str) -> None:
    try:
        module = importlib.import_module(f"recsys_kernels.{name}")
    except ImportError as exc:
        msg = str(exc)
        if "undefined symbol" in msg or "version" in msg.lower():
            reason = f"{what} was built against another torch ({msg.splitlines()[0]}); {_REBUILD_HINT}"
        else:
            reason = f"{what} is not built ({msg.splitlines()[0]}); {_REBUILD_HINT}"
        LOAD_ERRORS[name] = reason
        return
    built_with = getattr(module, "built_with_torch", lambda: torch.__version__)()
    if built_with.split("+")[0] != torch.__version__.split("+")[0]:
        LOAD_ERRORS[name] = f"{what} was built against torch {built_with}, running {torch.__version__}; {_REBUILD_HINT}"
        return
    EXTENSIONS[name] = module


def load_extensions() -> None:
    _load("_C", "the C++ extension recsys_kernels._C")
    if "_C" in EXTENSIONS:  # the CUDA kernels register against the schemas that _C defines
        _load("_C_cuda", "the CUDA extension recsys_kernels._C_cuda")
    if "_C" in LOAD_ERRORS:
        warnings.warn(f"recsys_kernels: {LOAD_ERRORS['_C']}. Falling back to the reference backend.",
                      RuntimeWarning, stacklevel=3)


def has_native_kernel(op: str, dispatch_key: str) -> bool:
    """True when a C++/CUDA kernel is registered for recsys_kernels::<op> under dispatch_key."""
    if "_C" not in EXTENSIONS:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"recsys_kernels::{op}", dispatch_key)
