"""What every op family shares: defining the op variants and registering them as backends, and
the argument checks of the bad-input policy (DESIGN.md §5).

Each public op `X` exists as up to three torch custom ops:
  recsys_kernels::X            schema in csrc/ops.cpp; C++ kernels on the CPU / CUDA dispatch keys
  recsys_kernels::X_reference  the pure-PyTorch reference (same schema), runs on any device
  recsys_kernels::X_triton     the Triton kernel (torch.library.triton_op), where there is one
All share one fake kernel and one autograd formula. Metadata checks (dtype, rank, device, shape)
run in the Python front door, where torch.compile can trace them; checks of values (offsets,
index bounds, finite scales) run inside every kernel, where they are opaque to the compiler.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import warnings
from typing import Callable, Iterable, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import _backend, _loader

LIB = "recsys_kernels"


def native_op(name: str):
    """The op whose schema csrc/ops.cpp defines, or None when the C++ extension is not loaded (or
    is a build older than the op's schema)."""
    if "_C" not in _loader.EXTENSIONS or not hasattr(torch.ops.recsys_kernels, name):
        return None
    return getattr(torch.ops.recsys_kernels, name).default


def _native_reason(name: str, key: str) -> str | None:
    if "_C" not in _loader.EXTENSIONS:
        return _loader.LOAD_ERRORS.get("_C", "the C++ extension is not loaded")
    if not hasattr(torch.ops.recsys_kernels, name):
        return f"the C++ extension predates {name} (no schema); {_loader._REBUILD_HINT}"
    if key == "CUDA" and "_C_cuda" not in _loader.EXTENSIONS:
        return _loader.LOAD_ERRORS.get("_C_cuda", "the CUDA extension was not built")
    if not _loader.has_native_kernel(name, key):
        return f"no {'C++ CPU' if key == 'CPU' else 'CUDA C++'} kernel for {name} yet"
    return None


def _outside_autocast(reference: Callable) -> Callable:
    """The reference body with torch.autocast off: the ops compute in their inputs' dtypes on every
    backend (a custom op has no autocast rule, so autocast would reach the body's matmuls)."""
    @functools.wraps(reference)
    def body(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return reference(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return reference(*args, **kwargs)
    return body


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """torch.autocast's dtype where it is on for this device type, else None. The modules that
    stand in for nn.Linear give their output in it, as nn.Linear does; the ops themselves compute in
    their inputs' dtypes."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def define_op(name: str, reference: Callable, fake: Callable, schema: str | None = None):
    """Define X_reference from the `reference` function (its type hints give the schema, which
    must equal csrc/ops.cpp's; `schema`, "(args) -> ret", where type hints cannot say it, e.g.
    str[]), give every variant the fake kernel, register the backends.
    Returns {backend: op} for the variants that exist, for autograd registration."""
    schema = schema or torch.library.infer_schema(reference, mutates_args=())  # (the wrapper's hints are strings)
    ref_op = torch.library.custom_op(f"{LIB}::{name}_reference", _outside_autocast(reference), mutates_args=(),
                                     schema=schema)
    ref_op.register_fake(fake)
    _backend.register(name, "reference", ref_op, devices=("cpu", "cuda"))
    variants = {"reference": ref_op}
    native = native_op(name)
    if native is not None:
        torch.library.register_fake(f"{LIB}::{name}")(fake)
        variants["cpu"] = variants["cuda"] = native
    cpu_reason = _native_reason(name, "CPU")
    _backend.register(name, "cpu", native, devices=("cpu",), reason=cpu_reason)
    if cpu_reason is None:
        _CPU_OPS[name] = native
    _backend.register(name, "cuda", native, devices=("cuda",), reason=_native_reason(name, "CUDA"))
    return variants


def triton_devices() -> tuple[str, ...]:
    """Triton runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how it is tested
    on machines without a GPU)."""
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def triton_kernels(module: str):
    """(the kernel module recsys_kernels._triton.<module>, None), or (None, why it cannot be
    imported): no triton, or a triton that cannot import."""
    try:
        return importlib.import_module(f"recsys_kernels._triton.{module}"), None
    except Exception as e:  # noqa: BLE001
        return None, f"triton cannot be imported: {type(e).__name__}: {e}"


def cuda_device_of(t: torch.Tensor):
    """The context a Triton kernel on `t` launches in: `t`'s GPU as the current CUDA device.
    Triton launches on the current device, and an eager custom op sets none (the C++ ops take a
    CUDAGuard), so with tensors on cuda:1 and cuda:0 current the kernel ran on the wrong GPU.
    Nothing to do for CPU tensors (the interpreter). (Eager only: launch_triton leaves a launch
    under torch.compile alone, whose generated code sets the device itself.)"""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch_triton(kernel, grid):
    """`torch.library.wrap_triton(kernel)[grid]`, launched on the GPU of its first tensor argument
    (see cuda_device_of)."""
    launcher = torch.library.wrap_triton(kernel)[grid]

    def launch(*args, **kwargs):
        if torch.compiler.is_compiling():
            return launcher(*args, **kwargs)
        first = next(a for a in args if isinstance(a, torch.Tensor))
        with cuda_device_of(first):
            return launcher(*args, **kwargs)
    return launch


def keep_opaque_to_compile(op) -> None:
    """Keep a triton_op opaque to the compiler, as torch.export does for triton ops: the compiled
    graph calls it eagerly instead of tracing its body. Needed under TRITON_INTERPRET=1, where
    wrap_triton returns the kernel itself and tracing would launch it on fake tensors, and for ops
    whose body branches on an int argument (a SymInt while tracing: each value would compile a
    graph of its own). Otherwise, on a GPU, the body is traced and Inductor sees the kernel."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def opaque(mode, func, types, args, kwargs):
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, opaque)


def register_autograd(variants: dict, backward: Callable, setup_context: Callable) -> None:
    """One autograd formula for every variant op (native, reference, triton)."""
    for op in {id(op): op for op in variants.values()}.values():
        _register_autograd(op, backward, setup_context)


_AFTER_AUTOGRAD_KEYS = torch._C._after_autograd_keyset
_AUTOGRAD_FUNCTIONS: dict = {}  # OpOverload -> the autograd.Function _register_autograd gave it
_AUTOGRAD_LIB = torch.library.Library(LIB, "FRAGMENT")
# torch versions before Library.impl(allow_override=...) cannot replace a registered kernel
_CAN_REPLACE_KERNELS = "allow_override" in inspect.signature(torch.library.Library.impl).parameters


def _register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """torch.library.register_autograd(op, backward, setup_context), without its per-call cost for
    the C++ ops: torch's autograd kernel first puts back any argument the dispatcher dropped for
    equalling its default, by rebuilding the schema's argument list (pybind objects) once per
    argument, ~25 us a call for a 10-argument op, while the kernel of a 20-row embedding_bag takes
    4. Our schemas (csrc/ops.cpp) give no defaults, so there is nothing to put back. It replaces
    the kernel torch.library.custom_op installs on the reference and Triton ops too (where torch
    allows it). Kept on torch's registration: ops with Tensor[] arguments (embedding_bag_grouped,
    one call for many tables), which need torch's flattening of the lists into autograd inputs."""
    overload = op if isinstance(op, torch._ops.OpOverload) else op._opoverload  # a CustomOpDef's
    arguments = overload._schema.arguments
    if (any(torch._library.utils.is_tensorlist_like_type(a.type) for a in arguments)
            or (overload is not op and not _CAN_REPLACE_KERNELS)):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
        return
    if any(a.kwarg_only or a.has_default_value() for a in arguments):
        raise AssertionError(f"{overload}: the autograd kernel below expects every argument positional, "
                             "without default")

    op_name = overload._name.replace("::", ".")

    def below_autograd(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & _AFTER_AUTOGRAD_KEYS, *args)

    class Function(torch.autograd.Function):
        # inputs: the op's arguments, then the dispatch key set (which needs no gradient). One
        # forward with the context, as torch's: a separate setup_context staticmethod makes apply
        # bind the arguments to forward's signature with inspect, ~15 us a call.
        @staticmethod
        def forward(ctx, *inputs):
            args, keyset = inputs[:-1], inputs[-1]
            # run_direct's call goes straight to the CPU kernel; forward runs without grad mode,
            # so the kernel records nothing without the guard
            output = (overload.redispatch(keyset, *args) if keyset is _CPU_KERNEL_KEYS
                      else below_autograd(keyset, args))
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = needs[:-1]  # the formula sees the op's arguments only
            try:
                result = backward(ctx, *grads)
            finally:
                ctx.needs_input_grad = needs
            return (*result, None) if isinstance(result, tuple) else (result, None)

    _AUTOGRAD_FUNCTIONS[overload] = Function

    def autograd_kernel(keyset, *args):
        refuse_forward_ad(op_name, args)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Function.apply(*args, keyset)
        return below_autograd(keyset, args)

    # a CustomOpDef's kernel is replaced on purpose: torch 2.11 refuses without allow_override and
    # warns with it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        _AUTOGRAD_LIB.impl(overload.__name__.split(".")[0], autograd_kernel, "Autograd", with_keyset=True,
                           allow_override=True)


def register_autograd_with_backward_op(forward_variants: dict, backward_variants: dict, backward_name: str,
                                       make_backward: Callable, setup_context: Callable) -> None:
    """One autograd formula on every forward variant, each calling the backward op of its own
    backend. `make_backward(pick)` builds the formula; `pick(is_cuda)` returns the backward op to
    call: the reference backward where the forward's backend has no backward kernel for that
    device (a native forward kernel may land before its backward). A later backend (triton)
    calls this again with only its own variants."""
    reference = backward_variants["reference"]
    for key, fwd in {id(op): (k, op) for k, op in forward_variants.items()}.values():
        own = backward_variants.get(key, reference)
        native = key in ("cpu", "cuda")

        def pick(is_cuda: bool, own=own, native=native):
            if native and not _loader.has_native_kernel(backward_name, "CUDA" if is_cuda else "CPU"):
                return reference
            return own

        _register_autograd(fwd, make_backward(pick), setup_context)
    # The backward ops have no formula of their own. Without one, the native ops fell through
    # torch's "autograd kernel was not registered" fallback: a second backward through them (after
    # create_graph=True) returned wrong second derivatives with only a deprecation warning.
    for op in {id(op): op for op in backward_variants.values()}.values():
        if id(op) not in _WITHOUT_DOUBLE_BACKWARD:
            _WITHOUT_DOUBLE_BACKWARD.add(id(op))
            _register_autograd(op, raising_backward(
                f"recsys_kernels.{backward_name}: a gradient of a gradient (double backward, after "
                f"create_graph=True) is not supported through recsys_kernels' ops"), setup_nothing)


def refuse_forward_ad(what: str, args) -> None:
    """NotImplementedError when an argument carries a forward-mode tangent (torch.func.jvp,
    torch.autograd.forward_ad): the ops have no forward-mode formula, and without this check the
    tangent was dropped (jvp returned zeros), where torch's own ops raise. Costs one global read
    outside a dual level."""
    if _forward_ad._current_level < 0:
        return
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    if any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{what}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
                                  "supported by recsys_kernels' ops; use reverse mode (backward, torch.autograd.grad)")


_WITHOUT_DOUBLE_BACKWARD: set[int] = set()  # ids of the backward ops given raising_backward


def raising_backward(message: str) -> Callable:
    """An autograd formula that raises RuntimeError(message): for ops without a gradient."""
    def backward(ctx, *grads):
        raise RuntimeError(message)
    return backward


def setup_nothing(ctx, inputs, output) -> None:
    """The setup_context of a formula that needs nothing saved (raising_backward)."""


_CPU_KERNEL_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


# the types of the ops' non-tensor arguments: anything else (a tensor subclass, an unknown object)
# goes through the dispatcher
_PLAIN_ARG_TYPES = (type(None), str, int, float, bool, torch.dtype)


def plain_eager(*args) -> bool:
    """Whether a call with these arguments may go straight to an op's C++ CPU kernel
    (`redispatch_cpu`), past the dispatcher's autograd, tracing and mode layers: in eager mode
    (not under torch.compile, which is tested first so that Dynamo does not trace the rest, nor
    torch.jit.trace, which would record nothing), with no dispatch or torch-function mode active
    (FakeTensorMode, FlopCounterMode, `with torch.device(...)` must see the op), no vmap / grad
    transform or forward-AD dual level, only plain tensors (no subclass) and no gradient to
    record. It runs on every call of a small op, hence type identities rather than isinstance
    (0.1 us each)."""
    if (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
            or torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
            or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
        return False
    for a in args:
        t = type(a)
        if t is not torch.Tensor and t not in _PLAIN_ARG_TYPES:
            return False
    return True


_CPU_OPS: dict = {}  # name -> the C++ op, for the ops with a CPU kernel (define_op fills it)


def direct_cpu_op(name: str, backend: str | None, *args):
    """The C++ op `name` when a front door may hand it `args` as they are (to run with
    run_direct, or through call_cpu_op_directly); else None. For the ops whose C++ kernels repeat
    the front door's checks (the same exception types naming the same argument, in its order; a
    shape prints as [1, 4], not (1, 4)) and its normal form (one index dtype, contiguous tensors,
    the bias as fp32). Where the backend is auto or cpu, every tensor is on the CPU and
    plain_eager holds (eager, nothing to record for autograd, no mode or transform). The checks
    cost ~4 us of a ~10 us call on small inputs."""
    op = _CPU_OPS.get(name)
    if op is None or (backend or _backend.get_backend()) not in ("auto", "cpu") or not plain_eager(*args):
        return None
    for a in args:
        if type(a) is torch.Tensor and not a.is_cpu:  # (.device costs 0.3 us, .is_cpu 0.07)
            return None
    return op


def call_cpu_op_directly(name: str, backend: str | None, *args):
    """The result of the C++ op `name` run straight on `args` when direct_cpu_op allows it (its
    plain_eager check leaves no gradient to record), else None: the scoring front doors' fast
    path (they return what this gives, or go on to their checks)."""
    op = direct_cpu_op(name, backend, *args)
    return None if op is None else redispatch_cpu(op, *args)


def redispatch_cpu(op, *args):
    """Run the C++ CPU kernel of `op` (an OpOverload) directly; only where plain_eager(*args)."""
    return op.redispatch(_CPU_KERNEL_KEYS, *args)


def run_direct(op, *args):
    """Run the op direct_cpu_op returned for the embedding front doors straight on its CPU kernel.
    Where an argument needs its gradient recorded (a trainable table, which they do not hand to
    direct_cpu_op): through the op's autograd.Function (_register_autograd's) applied here, what
    the dispatcher would reach through the op's autograd kernel, ~12 us a call sooner (a trainable
    20-row bag: 33 -> 21 us; torch's own 13); through the dispatcher for an op on torch's
    registration (embedding_bag_grouped)."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        function = _AUTOGRAD_FUNCTIONS.get(op)
        return op(*args) if function is None else function.apply(*args, _CPU_KERNEL_KEYS)
    return redispatch_cpu(op, *args)


def call(name: str, device: torch.device, backend: str | None, *args):
    """Run op `name` through the backend that the selection rules pick."""
    _, fn = _backend.resolve(name, device.type, backend)
    refuse_forward_ad(f"{LIB}.{name}", args)  # (here for embedding_bag_grouped too, whose kernel is torch's)
    if (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
        # No gradient to record: go straight below the Autograd key, which is all the op's
        # autograd kernel (Python: _register_autograd's or torch's) would do here; torch's cost
        # ~4 us a call (a 32-row embedding_bag: 8.1 -> 4.1 us). Under torch.compile the op stays
        # as traced; under vmap, whose batched tensors do not report requires_grad, neither (below
        # the Autograd key the gradient of a batched trainable input was lost without an error).
        # (Plain eager CPU calls of embedding_bag and the scoring ops do not get here:
        # their front doors hand them to the C++ op unchecked, direct_cpu_op.)
        with torch._C._AutoDispatchBelowAutograd():
            return fn(*args)
    return fn(*args)


# ----------------------------------------------------------------------------- argument checks
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_output_dtype(output_dtype, allowed) -> None:
    """TypeError unless output_dtype is None or one of the float dtypes `allowed`."""
    if output_dtype is not None and output_dtype not in allowed:
        names = " or ".join(_dtype_names(allowed).rsplit(", ", 1))
        raise TypeError(f"output_dtype must be {names}, got {output_dtype}")


def check_tensor(t, name: str, *, dtypes=None, dim=None) -> None:
    """TypeError unless `t` is a tensor of one of `dtypes`; ValueError unless it has `dim` dims
    (an int or a tuple of allowed ranks)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and (t.dim() != dim if type(dim) is int else t.dim() not in dim):  # every call: no tuple
        allowed = (dim,) if isinstance(dim, int) else tuple(dim)
        raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in allowed)}, got shape {tuple(t.shape)}")


def check_same_device(tensors: Sequence, names) -> torch.device | None:
    """ValueError unless all the given (non-None) tensors are on one device; returns it. names:
    the tensors' names for the message, or a function returning them (built only on error). A
    plain loop over a tuple: it runs on every call (a keyword dict cost 0.1 us more)."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            listing = ", ".join(f"{k} on {v.device}" for k, v in zip(names() if callable(names) else names, tensors)
                                if v is not None)
            raise ValueError(f"all tensors must be on one device, got {listing}")
    return device


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bits(bits) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
