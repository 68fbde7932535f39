"""SparseLinear: a pruned nn.Linear whose weight is stored, and multiplied, as torch.sparse_csr.

CSR pays an index per non-zero (int64 column index, 8 bytes, plus 4 bytes of value) and a
sparse-dense matmul that runs far below dense GEMM speed, so it only wins at high sparsity.
`BREAK_EVEN_SPARSITY` is the sparsity above which CSR was measured faster than the dense
F.linear on this project's development machine (AMD EPYC, AVX2, 1 thread, see
docs/design.md "Compression"); `sparsify_` converts only layers at or above it and keeps the
dense path below. `measure_break_even` re-measures it on the machine at hand.
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn._hooks import carry_forward_hooks
from ..ops._common import autocast_dtype

# measured with measure_break_even((128, 128), batch=1024) and ((512, 512), batch=256) on the
# development machine, 1 thread: see docs/design.md "Compression" for the table
BREAK_EVEN_SPARSITY = 0.9


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W a torch.sparse_csr buffer [out, in] (inference only: no grad).

    Its number of non-zeros is data: `load_state_dict` assigns the checkpoint's CSR weight (any
    nnz; same shape) instead of copying into the current one, and copies / pickles carry the CSR
    as its three dense parts (torch cannot deep-copy a CSR tensor). Built from weights by
    `sparsify_`, it has no meta-device form: to load a checkpoint, rebuild the model the same way
    (or put SparseLinear layers in the same places), then load."""

    def __init__(self, weight_csr: Tensor, bias: Optional[Tensor] = None):
        super().__init__()
        if weight_csr.layout != torch.sparse_csr or weight_csr.dim() != 2:
            raise ValueError("weight_csr must be a 2-D torch.sparse_csr tensor")
        self.out_features, self.in_features = weight_csr.shape
        self.register_buffer("weight_csr", weight_csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and tested here
            warnings.simplefilter("ignore", UserWarning)
            csr = linear.weight.detach().to_sparse_csr()
        return cls(csr, linear.bias)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_buffers"] = dict(state["_buffers"], weight_csr=None)
        csr = self.weight_csr
        state["_csr_parts"] = (csr.crow_indices(), csr.col_indices(), csr.values(), tuple(csr.shape))
        return state

    def __setstate__(self, state):
        crow, col, values, shape = state.pop("_csr_parts")
        super().__setstate__(state)
        self._buffers["weight_csr"] = torch.sparse_csr_tensor(crow, col, values, shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight_csr"
        loaded = state_dict.get(key)
        others = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(others, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if loaded is None:
            return  # reported missing by the call above
        if key in missing_keys:  # (listed only when strict)
            missing_keys.remove(key)
        shape = (self.out_features, self.in_features)
        if not isinstance(loaded, Tensor) or loaded.layout != torch.sparse_csr or tuple(loaded.shape) != shape:
            error_msgs.append(f"{key}: expected a torch.sparse_csr tensor of shape {shape}, got "
                              f"{getattr(loaded, 'layout', type(loaded))} {tuple(getattr(loaded, 'shape', ()))}")
            return
        current = self._buffers["weight_csr"]
        if local_metadata.get("assign_to_params_buffers", False):
            self._buffers["weight_csr"] = loaded
        else:
            self._buffers["weight_csr"] = loaded.to(device=current.device, dtype=current.dtype, copy=True)

    @property
    def nnz(self) -> int:
        return int(self.weight_csr._nnz())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.out_features * self.in_features)

    def dense_weight(self) -> Tensor:
        return self.weight_csr.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        weight, bias = self.weight_csr, self.bias
        out_dtype = autocast_dtype(x.device.type)  # under torch.autocast, its dtype (as nn.Linear)
        if out_dtype is not None or (weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16)):
            # torch's CPU sparse kernels take no fp16 / bf16, which a half model or autocast would
            # hand them: the product in fp32, rounded once at the end
            with torch.autocast(x.device.type, enabled=False):
                y = torch.mm(weight.float(), x2.float().t()).t()
                if bias is not None:
                    y = y + bias.float()
            return y.to(out_dtype or x.dtype).reshape(*lead, self.out_features)
        # CSR @ dense: [out, in] @ [in, M] -> [out, M]
        y = torch.mm(weight, x2.t()).t()
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz} ({100 * self.sparsity:.1f}% sparse), bias={self.bias is not None}")


def csr_bytes(t: Tensor) -> int:
    """Bytes of a sparse CSR tensor (values + column indices + row pointers)."""
    return sum(x.numel() * x.element_size() for x in (t.values(), t.col_indices(), t.crow_indices()))


def sparsify_(model: nn.Module, min_sparsity: float = BREAK_EVEN_SPARSITY) -> list[str]:
    """Replace, in place, every nn.Linear whose weight is at least `min_sparsity` zeros by a
    SparseLinear; the rest stay dense (below break-even dense is faster). Returns the names
    converted."""
    converted = []
    sparse_of: dict[int, Optional[SparseLinear]] = {}  # a shared Linear becomes one shared SparseLinear
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):  # every slot (named_children lists one)
            if type(child) is nn.Linear:
                if id(child) not in sparse_of:
                    sparsity = float((child.weight == 0).float().mean())
                    sparse_of[id(child)] = (carry_forward_hooks(child, SparseLinear.from_linear(child))
                                            if sparsity >= min_sparsity else None)
                if sparse_of[id(child)] is not None:
                    setattr(parent, name, sparse_of[id(child)])
                    converted.append(f"{parent_name}.{name}" if parent_name else name)
    return converted


def _linear(w: Tensor, b: Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w, b
    return lin


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_break_even(shape: tuple[int, int] = (512, 512), batch: int = 256,
                       sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
                       repeats: int = 20, seed: int = 0) -> dict:
    """Time dense F.linear against SparseLinear (CSR) on a random [out, in] = `shape` weight
    pruned to each sparsity, x [batch, in]. Returns {"rows": [(sparsity, dense_ms, csr_ms)],
    "break_even": the lowest measured sparsity from which CSR stays faster, or None}."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    x = torch.randn(batch, in_f, generator=g)
    rows = []
    for s in sparsities:
        w = torch.randn(out_f, in_f, generator=g)
        w[torch.rand(out_f, in_f, generator=g) < s] = 0
        b = torch.randn(out_f, generator=g)
        sparse = SparseLinear.from_linear(_linear(w, b))
        dense_ms = 1e3 * _median_s(lambda: F.linear(x, w, b), repeats)
        csr_ms = 1e3 * _median_s(lambda: sparse(x), repeats)
        rows.append((s, dense_ms, csr_ms))
    break_even = None
    for i in range(len(rows)):
        if all(csr < dense for _, dense, csr in rows[i:]):
            break_even = rows[i][0]
            break
    return {"rows": rows, "break_even": break_even}
