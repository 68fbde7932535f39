"""Int8Linear: a drop-in inference replacement for nn.Linear with int8 weights."""
from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from .. import _backend
from ..ops import _common
from ..ops.int8_matmul import (ACT_QUANTS, ACTIVATIONS, PACKED_CPU_KERNEL, int8_linear, int8_linear_packed,
                               pack_weight_int8, quantize_weight_int8)


# the op behind Int8Linear's CPU fast path (it exists only with the C++ extension)
_PACKED_OP = torch.ops.recsys_kernels.int8_linear_packed.default if PACKED_CPU_KERNEL else None


def _normalize_activation(activation) -> str:
    activation = "none" if activation is None else activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    return activation


class Int8Linear(nn.Module):
    """y = activation(x @ W.T + b) with W stored as symmetric per-output-channel int8.

    Buffers (saved in the state dict): `weight_q` int8 [out, in], `weight_scale` fp32 [out]
    (W ≈ weight_q * weight_scale[:, None]) and `bias` fp32 [out] or None. `act_quant="dynamic"`
    quantizes each input row to int8 and runs the int8 GEMM; `"none"` keeps x in float
    (weight-only, for small batches). The activation ("none" | "relu" | "gelu" (erf) | "silu")
    is fused into the GEMM epilogue. Output dtype: `out_dtype`, default x's dtype, or inside
    torch.autocast the autocast dtype, as nn.Linear gives (the int8 GEMM itself is the same).

    On the CPU (backend "auto" or "cpu", C++ kernels built) the forward runs
    `int8_linear_packed` on `weight_packed`, the weight in the CPU kernels' panel layout, packed
    once instead of on every call. `weight_packed` is a cache, not state: a non-persistent buffer
    rebuilt by `from_float` and `load_state_dict`, carried along by `.to()`, and rebuilt in eager
    mode whenever `weight_q` was changed in place or given new data (`.data = ...`, a copy). An
    edit that the tensor's version counter does not see is not noticed: through `.data` or a NumPy
    view, by another process sharing the memory, or of an inference tensor (made under
    torch.inference_mode, which has no version counter); call `repack()` after one. A call that
    finds another `weight_q` than the one packed (swapped in by `torch.func.functional_call` or a
    parametrization) multiplies by that `weight_q` itself; once the packed tensor is gone (a new
    `weight_q` assigned for good) the next call packs the new one. A graph from torch.compile /
    torch.export takes `weight_packed` as it was traced: after loading other weights into an
    exported module (`ExportedProgram.module()`), export it again.

    Inference only: backward through it raises. There is no `.weight` attribute; code that reads
    `linear.weight` directly (nn.MultiheadAttention's out_proj, fused transformer fast paths)
    needs the float layer, which is why `quantize_` leaves those alone. Build one with
    `Int8Linear.from_float(linear)`; `Int8Linear(in, out)` makes an empty one to load a state
    dict into. Convert after casting a model (`model.half()` would round the scales to fp16).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "none",
                 act_quant: str = "dynamic", device=None, out_dtype: torch.dtype | None = None,
                 backend: str | None = None):
        super().__init__()
        if act_quant not in ACT_QUANTS:
            raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = _normalize_activation(activation)
        self.act_quant = act_quant
        self.out_dtype = out_dtype
        self.backend = backend
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)
        self.register_buffer("weight_packed", None, persistent=False)
        self.repack()

    @torch.no_grad()
    def repack(self) -> None:
        """Rebuild `weight_packed` from `weight_q` (done by from_float, load_state_dict and the
        forward after an in-place change of weight_q)."""
        # recorded before packing: an edit made while it packs (another thread) is seen by the next call
        record = self._weight_q_record()
        self.weight_packed = pack_weight_int8(self.weight_q)
        self._packed_from = record

    def _weight_q_record(self) -> tuple:
        """What identifies the weight_q there now, held weakly (a weight_q replaced for good is
        not kept alive): the tensor; its storage (`.data = ...` gives it another, and a storage
        object that is gone cannot come back, where a freed address can) and data pointer (another
        view of it); its version counter (bumped by every in-place change; inference tensors have
        none)."""
        weight_q = self.weight_q
        return (weakref.ref(weight_q), weakref.ref(weight_q.untyped_storage()), weight_q.data_ptr(),
                None if weight_q.is_inference() else weight_q._version)

    def _mark_packed(self) -> None:
        """Remember that weight_packed holds the weight_q there now."""
        self._packed_from = self._weight_q_record()

    def _packed_is_current(self) -> bool:
        """Whether weight_packed holds the weight_q there now; repacks it first if weight_q was
        changed in place, got other data, or replaced the packed tensor for good (that one is
        gone). False when the packed tensor is alive and weight_q is another (for the one call,
        e.g. torch.func.functional_call with a state dict)."""
        packed_q, storage, data_ptr, version = self._packed_from
        weight_q = self._buffers.get("weight_q")
        if weight_q is None:  # a parametrization computes it: another tensor on every call
            return False
        packed_q = packed_q()
        if packed_q is not weight_q:
            if packed_q is not None:
                return False
        elif (storage() is weight_q.untyped_storage() and data_ptr == weight_q.data_ptr()
              and (version is None or version == weight_q._version)):
            return True
        self.repack()
        return True

    def __getstate__(self):
        # a pickle or deepcopy packs again on arrival (the record's weak references do not travel)
        state = super().__getstate__()
        state.pop("_packed_from", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.repack()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.repack()

    def _apply(self, *args, **kwargs):
        # .to(), .cuda(), to_empty(), share_memory(): the same function takes both buffers along,
        # so a pack that was current stays so (share_memory keeps its shared buffer)
        current = self._packed_is_current()
        module = super()._apply(*args, **kwargs)
        if current:
            self._mark_packed()
        else:
            self.repack()
        return module

    @classmethod
    def from_float(cls, linear: nn.Linear, activation: str | None = None, act_quant: str = "dynamic", *,
                   out_dtype: torch.dtype | None = None, backend: str | None = None) -> "Int8Linear":
        """Quantize `linear` (per output channel, scale = absmax / 127) into a new Int8Linear on
        the same device, fusing `activation` (None | "relu" | "gelu" | "silu") after it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     activation=activation, act_quant=act_quant, device=weight.device,
                     out_dtype=out_dtype, backend=backend)
        # The reference backend runs anywhere and is the specification every kernel matches.
        weight_q, weight_scale = quantize_weight_int8(weight.float(), backend="reference")
        module.weight_q.copy_(weight_q)
        module.weight_scale.copy_(weight_scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        module.repack()
        return module

    def dequantized_weight(self) -> Tensor:
        """The fp32 weight [out, in] this layer multiplies by."""
        return self.weight_q.float() * self.weight_scale.float()[:, None]

    def _packed_path(self, x: Tensor) -> bool:
        backend = self.backend or _backend.get_backend()
        return (PACKED_CPU_KERNEL and backend in ("auto", "cpu") and x.device.type == "cpu"
                and self.weight_packed.device.type == "cpu")

    def forward(self, input: Tensor) -> Tensor:  # nn.Linear's argument name: calls by keyword work
        x = input
        out_dtype = self.out_dtype
        if out_dtype is None and isinstance(x, Tensor):  # under torch.autocast, its dtype (as nn.Linear)
            out_dtype = _common.autocast_dtype(x.device.type)
        if self._packed_path(x) and (torch.compiler.is_compiling() or self._packed_is_current()):
            if isinstance(x, Tensor) and x.dtype in _common.FLOAT_DTYPES and x.dim() >= 1 and x.shape[-1] == self.in_features:
                # Straight to the C++ op (which checks its arguments again): the generic front door
                # costs ~20 us, as much as the whole GEMM at M = 1.
                buffers = self._buffers  # plain dict reads: nn.Module.__getattr__ costs ~1 us each
                scale, bias = buffers["weight_scale"], buffers["bias"]
                if scale.dtype != torch.float32:  # a model cast with .half() after conversion
                    scale = scale.float()
                if bias is not None and bias.dtype == torch.float64:  # (.double(): no fp64 epilogue)
                    bias = bias.float()
                x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), self.in_features)  # -1: not if empty
                args = (x2, buffers["weight_packed"], scale, bias, self.activation, self.act_quant, out_dtype)
                # below the op's Python autograd wrapper when nothing above the kernel would act:
                # ~10 us of a ~15 us call at M = 1
                y = _common.redispatch_cpu(_PACKED_OP, *args) if _common.plain_eager(*args) else _PACKED_OP(*args)
                return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
            return int8_linear_packed(x, self.weight_packed, self.weight_scale.float(), self._bias(),
                                      in_features=self.in_features, activation=self.activation,  # raises clearly
                                      act_quant=self.act_quant, out_dtype=out_dtype, backend="cpu")
        return int8_linear(x, self.weight_q, self.weight_scale.float(), self._bias(),
                           activation=self.activation, act_quant=self.act_quant,
                           out_dtype=out_dtype, backend=self.backend)

    def _bias(self) -> Tensor | None:
        """The bias for the ops: fp32 where a model cast with .double() made it fp64."""
        bias = self.bias
        return bias.float() if bias is not None and bias.dtype == torch.float64 else bias

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}, act_quant={self.act_quant!r}")
        if self.out_dtype is not None:
            text += f", out_dtype={self.out_dtype}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text
