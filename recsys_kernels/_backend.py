"""Backend registry and selection (DESIGN.md §3).

Backends: "cuda" (CUDA C++), "triton", "cpu" (C++), "reference" (pure PyTorch, the executable
specification). Selection, most specific first: the op's `backend=` argument, then
`set_backend()` (whose default comes from the env var RECSYS_KERNELS_BACKEND, read at import),
then "auto": on CUDA tensors cuda -> triton -> reference, on CPU tensors cpu -> reference.
A backend asked for by name that cannot run raises BackendUnavailableError with the reason;
"auto" falls back silently. Meta tensors take the reference op (shapes only). Availability is
read from what is really registered or importable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "RECSYS_KERNELS_BACKEND"
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run this op on these tensors."""


@dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: frozenset  # device types ("cpu", "cuda") whose tensors it accepts
    reason: str | None  # None when available, else why not


_REGISTRY: dict[str, dict[str, Impl]] = {}


def check_name(name: str, source: str = "backend") -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown {source} {name!r}; choose one of {('auto',) + BACKENDS}")
    return name


_selected = check_name(os.environ.get(ENV_VAR, "auto") or "auto", source=ENV_VAR)


def set_backend(name: str | None) -> str:
    """Select the backend for every op that gets no `backend=` argument ("auto" or None resets).
    Returns the previous selection, so `prev = set_backend("reference"); ...; set_backend(prev)`."""
    global _selected
    previous = _selected
    _selected = check_name(name or "auto")
    return previous


def get_backend() -> str:
    return _selected


def register(op: str, backend: str, fn: Callable, devices, reason: str | None = None) -> None:
    """Register `fn` as `backend`'s implementation of `op`. `reason` says why it cannot run."""
    check_name(backend)
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, frozenset(devices), reason)


def resolve(op: str, device_type: str, backend: str | None = None) -> tuple[str, Callable]:
    """The (backend name, callable) that runs `op` on tensors of `device_type`. Meta tensors (a
    model built under `torch.device("meta")` to be materialised later) take the reference op
    whatever the selection: on them every variant runs the op's one fake kernel (shapes only)."""
    name = check_name(backend or _selected)
    impls = _REGISTRY[op]
    if device_type == "meta":
        return "reference", impls["reference"].fn
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            impl = impls.get(candidate)
            if impl is not None and impl.reason is None and device_type in impl.devices:
                return candidate, impl.fn
        raise BackendUnavailableError(f"{op}: no backend can run on {device_type} tensors")
    impl = impls.get(name)
    if impl is None:
        raise BackendUnavailableError(f"{op}: the {name} backend has no implementation of this op yet")
    if impl.reason is not None:
        raise BackendUnavailableError(f"{op}: the {name} backend is unavailable: {impl.reason}")
    if device_type not in impl.devices:
        raise BackendUnavailableError(
            f"{op}: the {name} backend runs on {sorted(impl.devices)} tensors, got {device_type} tensors")
    return name, impl.fn


def ops() -> list[str]:
    return sorted(_REGISTRY)


def availability(op: str) -> dict[str, str]:
    """backend -> "yes (devices)" or the reason it is unavailable, for every backend."""
    out = {}
    for name in BACKENDS:
        impl = _REGISTRY.get(op, {}).get(name)
        if impl is None:
            out[name] = "not implemented"
        elif impl.reason is not None:
            out[name] = impl.reason
        else:
            out[name] = "yes (" + ", ".join(sorted(impl.devices)) + ")"
    return out


def available_backends(op: str, device_type: str) -> list[str]:
    """Backends that can run `op` on `device_type` tensors, in auto order first."""
    result = []
    for name in BACKENDS:
        impl = _REGISTRY.get(op, {}).get(name)
        if impl is not None and impl.reason is None and device_type in impl.devices:
            result.append(name)
    return result
