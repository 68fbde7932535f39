"""What this installation can do: versions, extensions, CPU features, CUDA archs, backends per op."""
from __future__ import annotations

import torch

from . import _backend, _loader


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def info() -> dict:
    c_ext = _loader.EXTENSIONS.get("_C")
    cuda_ext = _loader.EXTENSIONS.get("_C_cuda")
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": _triton_version(),
        "extensions": {name: ("loaded" if name in _loader.EXTENSIONS else _loader.LOAD_ERRORS.get(name, "not loaded"))
                       for name in ("_C", "_C_cuda")},
        "cpu_features": dict(c_ext.cpu_features()) if c_ext else {},
        "cuda_archs": cuda_ext.cuda_archs() if cuda_ext else None,
        "selected_backend": _backend.get_backend(),
        "backends": {op: _backend.availability(op) for op in _backend.ops()},
    }


def format_info(d: dict | None = None) -> str:
    d = d or info()
    lines = [
        f"torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'}), triton {d['triton'] or 'not installed'}",
        f"GPU: {d['gpu'] or 'none visible'}",
        "extensions: " + "; ".join(f"{k}: {v}" for k, v in d["extensions"].items()),
        "CPU features: " + (", ".join(f"{k}={v}" for k, v in d["cpu_features"].items()) or "unknown (no _C)"),
        f"CUDA archs compiled: {d['cuda_archs'] or 'none'}",
        f"backend selection: {d['selected_backend']}",
        "",
    ]
    names = _backend.BACKENDS
    here = {"cpu"} | ({"cuda"} if d["cuda_available"] else set())
    width = max([len(op) for op in d["backends"]] + [2])
    lines.append(f"{'op':<{width}}  " + "  ".join(f"{n:<9}" for n in names))
    for op, avail in d["backends"].items():
        lines.append(f"{op:<{width}}  " + "  ".join(f"{_cell(avail[n], here):<9}" for n in names))
    lines.append("(yes = runs here; no GPU = built, runs on CUDA tensors only; '-' = not built, no kernel yet, "
                 "or unavailable: see info()['backends'])")
    return "\n".join(lines)


def _cell(availability: str, here: set[str]) -> str:
    """One backend's cell: availability() says "yes (cpu, cuda)" or why not."""
    if not availability.startswith("yes"):
        return "-"
    devices = set(availability[availability.find("(") + 1:availability.rfind(")")].split(", "))
    return "yes" if devices & here else "no GPU"
