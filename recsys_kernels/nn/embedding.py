"""Embedding-bag modules over `recsys_kernels.ops.embedding.embedding_bag`.

- `FusedEmbeddingBag`: a drop-in for `nn.EmbeddingBag` (same constructor, same forward calling
  conventions, same default mode "mean", same `weight` name, so state dicts load both ways), plus
  `.quantize(bits)` to an int8/int4 fused row-wise table (inference only) and `from_packed` for
  tables prepacked by torch's `embedding_bag_byte_prepack` / `embedding_bag_4bit_prepack`.
- `FusedEmbeddingBagCollection`: several tables, TorchRec flavoured: `{feature: (indices, offsets)}`
  in, `[B, sum(D)]` (or a dict) out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Mapping, Sequence  # isinstance with typing's aliases cost ~1 us a feature

import torch
from torch import Tensor, nn

from .. import _backend
from ..ops._common import check_choice
from ..ops.embedding import BOUNDS, MODES, embedding_bag, padding_int
from ..ops.embedding_grouped import embedding_bag_grouped
from ..ops.rowwise import check_packed_table, packed_width, quantize_rowwise


def _flag_coalesced_grad(weight: Tensor) -> None:
    """Post-accumulate-grad hook of a sparse table's weight. Our sparse gradient is coalesced,
    but torch's AccumulateGrad rebuilds a gradient it keeps without that flag, so SparseAdam and
    Adagrad would coalesce it again (a sort and a copy: 36 ms at shape A). Where the rows are
    strictly increasing, which is what coalesced means for a gradient with one sparse dimension,
    the flag is put back; anything else (torch's one row per index, or ours summed with it) is
    left as it is. CPU only: the check reads the rows, which would sync a GPU."""
    grad = weight.grad
    if grad is None or not grad.is_sparse or grad.is_coalesced() or not grad.is_cpu or grad.sparse_dim() != 1:
        return
    rows = grad._indices()[0]
    if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        grad._coalesced_(True)


def _keep_coalesced_flag(weight: Tensor) -> None:
    """Gives a trainable table with sparse gradients _flag_coalesced_grad, once (in eager mode;
    hooks are not carried by pickling, hence the look at the tensor's own hooks)."""
    if torch.compiler.is_compiling() or not weight.requires_grad or not weight.is_leaf:
        return
    hooks = weight._post_accumulate_grad_hooks
    if hooks is None or _flag_coalesced_grad not in hooks.values():
        weight.register_post_accumulate_grad_hook(_flag_coalesced_grad)


def _quantizable(table: Tensor) -> Tensor:
    """The table as the row-wise quantizer takes it: a float64 table is rounded to float32 first
    (torch's prepack ops refuse float64; the codes are far coarser than that rounding)."""
    return table.float() if table.dtype == torch.float64 else table


class FusedEmbeddingBag(nn.Module):
    """nn.EmbeddingBag with the recsys_kernels embedding_bag op underneath.

    Same arguments as nn.EmbeddingBag; `max_norm` and `scale_grad_by_freq=True` are not supported
    (NotImplementedError). Extra keyword arguments: `bounds` ("raise" | "zero" | "clamp", how
    out-of-range indices are treated) and `backend` (force one backend). `offsets` follow
    nn.EmbeddingBag: `[B]` bag starts, or `[B+1]` with include_last_offset=True, whose last entry
    must equal the number of indices; a 2-D input `[B, L]` takes no offsets.

    After `.quantize(bits)` (or `from_packed`), `weight` is a uint8 row-wise buffer (inference
    only; the output is float32) and `bits` says its code width; `bits` is None for float tables.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                 sparse: bool = False, _weight: Tensor | None = None, include_last_offset: bool = False,
                 padding_idx: int | None = None, device=None, dtype=None, *, bounds: str = "raise",
                 backend: str | None = None) -> None:
        super().__init__()
        if max_norm is not None:
            raise NotImplementedError("FusedEmbeddingBag does not support max_norm (it renormalizes the table "
                                      "in place during forward); renormalize the weight yourself")
        if scale_grad_by_freq:
            raise NotImplementedError("FusedEmbeddingBag does not support scale_grad_by_freq=True")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_choice(bounds, "bounds", BOUNDS)
        if backend is not None:
            _backend.check_name(backend)
        if padding_idx is not None:
            padding_idx = padding_int(padding_idx)
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx %= num_embeddings
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.mode = mode
        self.sparse = sparse
        self.include_last_offset = include_last_offset
        self.padding_idx = padding_idx
        self.bounds = bounds
        self.backend = backend
        self.bits: int | None = None
        if _weight is None:
            self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
            self.reset_parameters()
        else:
            if list(_weight.shape) != [num_embeddings, embedding_dim]:
                raise ValueError(f"_weight must have shape [{num_embeddings}, {embedding_dim}], "
                                 f"got {list(_weight.shape)}")
            self.weight = nn.Parameter(_weight)

    def reset_parameters(self) -> None:
        if self.bits is not None:
            raise RuntimeError("reset_parameters: the table is quantized (inference only)")
        nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_embedding_bag(cls, module: nn.EmbeddingBag, *, bounds: str = "raise",
                           backend: str | None = None) -> "FusedEmbeddingBag":
        """The same bag over the same Parameter object (shared, so optimizers keep working)."""
        if not isinstance(module, nn.EmbeddingBag):
            raise TypeError(f"module must be an nn.EmbeddingBag, got {type(module).__name__}")
        placeholder = torch.empty(module.num_embeddings, module.embedding_dim, device="meta")  # allocates nothing
        fused = cls(module.num_embeddings, module.embedding_dim, module.max_norm, module.norm_type,
                    module.scale_grad_by_freq, module.mode, module.sparse, placeholder, module.include_last_offset,
                    module.padding_idx, bounds=bounds, backend=backend)
        fused.weight = module.weight
        return fused

    @classmethod
    def from_pretrained(cls, embeddings: Tensor, freeze: bool = True, max_norm: float | None = None,
                        norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                        sparse: bool = False, include_last_offset: bool = False, padding_idx: int | None = None,
                        *, bounds: str = "raise", backend: str | None = None) -> "FusedEmbeddingBag":
        """As nn.EmbeddingBag.from_pretrained (the module wraps `embeddings`, not a copy)."""
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D tensor [num_embeddings, embedding_dim]")
        module = cls(embeddings.shape[0], embeddings.shape[1], max_norm, norm_type, scale_grad_by_freq, mode,
                     sparse, embeddings, include_last_offset, padding_idx, bounds=bounds, backend=backend)
        module.weight.requires_grad = not freeze
        return module

    @classmethod
    def from_packed(cls, packed: Tensor, bits: int = 8, *, mode: str = "mean", include_last_offset: bool = False,
                    padding_idx: int | None = None, bounds: str = "raise",
                    backend: str | None = None) -> "FusedEmbeddingBag":
        """A quantized module over a fused row-wise table, e.g. the output of
        torch.ops.quantized.embedding_bag_byte_prepack (bits=8) or _4bit_prepack (bits=4)."""
        dim = check_packed_table(packed, bits, "packed")
        n_rows = packed.shape[0]
        module = cls(n_rows, dim, mode=mode, _weight=torch.empty(n_rows, dim, device="meta"),
                     include_last_offset=include_last_offset, padding_idx=padding_idx, bounds=bounds,
                     backend=backend)
        module._set_packed(packed, bits)
        return module

    # ------------------------------------------------------------------ quantization
    def _set_packed(self, packed: Tensor, bits: int) -> None:
        del self.weight  # the Parameter goes; a buffer of the same name keeps state_dict keys
        self.register_buffer("weight", packed)
        self.bits = bits

    @torch.no_grad()
    def quantize(self, bits: int = 8) -> "FusedEmbeddingBag":
        """Convert in place to a uint8 fused row-wise table (inference only). Returns self."""
        if self.bits is not None:
            raise RuntimeError(f"the table is already quantized ({self.bits}-bit)")
        self._set_packed(quantize_rowwise(_quantizable(self.weight.detach()), bits, backend=self.backend), bits)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        incoming = state_dict.get(key)
        if isinstance(incoming, Tensor):
            if self.bits is not None and incoming.is_floating_point():
                # a float checkpoint into a quantized module: quantize it the same way, where the
                # table lives (a module on the meta device takes the checkpoint's with assign=True)
                device = incoming.device if self.weight.is_meta else self.weight.device
                state_dict[key] = quantize_rowwise(_quantizable(incoming.to(device)), self.bits, backend=self.backend)
            elif self.bits is None and incoming.dtype == torch.uint8:
                bits = 8 if incoming.shape[-1] == packed_width(self.embedding_dim, 8) else 4
                error_msgs.append(f"{key}: the checkpoint holds a quantized (uint8, {bits}-bit) table; call "
                                  f".quantize({bits}) on the module before loading it")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        # (a plain dict read: nn.Module.__getattr__ costs ~1 us; the weight is a Parameter, or a
        # buffer once quantized)
        weight = self._parameters.get("weight")
        if weight is None:
            weight = self._buffers["weight"]
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D [B, L] (fixed-length bags)")
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError("offsets is required when input is 1-D")
            if offsets.dim() != 1:
                raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
            if not self.include_last_offset:  # torch's [B] bag starts -> CSR [B+1]; no data-dependent step
                offsets = torch.cat([offsets, offsets.new_full((1,), input.shape[0])])
        if per_sample_weights is not None and per_sample_weights.shape != input.shape:
            raise ValueError(f"per_sample_weights must have the shape of input {tuple(input.shape)}, "
                             f"got {tuple(per_sample_weights.shape)}")
        if self.sparse:
            _keep_coalesced_flag(weight)
        return embedding_bag(weight, input, offsets, per_sample_weights=per_sample_weights, mode=self.mode,
                             padding_idx=self.padding_idx, bounds=self.bounds, bits=self.bits or 8,
                             sparse=self.sparse, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        if self.sparse:
            s += ", sparse=True"
        if self.bits is not None:
            s += f", bits={self.bits}"
        if self.bounds != "raise":
            s += f", bounds={self.bounds!r}"
        return s


# ----------------------------------------------------------------------------- collection
@dataclass
class TableConfig:
    """One table of a FusedEmbeddingBagCollection (cf. TorchRec's EmbeddingBagConfig).
    feature_names: the features looked up in this table (default: [name]). pooling: "sum" |
    "mean" | "max". bits: None for a float table, 8 or 4 for a quantized one."""
    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: list[str] = field(default_factory=list)
    pooling: str = "sum"
    bits: int | None = None

    def __post_init__(self):
        self.feature_names = list(self.feature_names) or [self.name]


def _jagged(feature: str, value):
    """(indices, offsets, lengths, weights) of one feature's input: a tuple (indices, offsets) or
    (indices, offsets, per_sample_weights), or a dict with "values" (or "indices") and "offsets"
    or "lengths", optionally "weights"."""
    if isinstance(value, Mapping):
        indices = value.get("values", value.get("indices"))
        if indices is None:
            raise ValueError(f"feature {feature!r}: the dict needs 'values' (or 'indices')")
        if ("offsets" in value) == ("lengths" in value):
            raise ValueError(f"feature {feature!r}: the dict needs exactly one of 'offsets' and 'lengths'")
        return indices, value.get("offsets"), value.get("lengths"), value.get("weights")
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        return value[0], value[1], None, (value[2] if len(value) == 3 else None)
    raise TypeError(f"feature {feature!r}: expected (indices, offsets[, weights]) or a dict with values and "
                    f"offsets/lengths, got {type(value).__name__}")


class _Tables(nn.Module):
    """name -> FusedEmbeddingBag. Not an nn.ModuleDict: that reserves names such as "items",
    "keys" or "values", which are natural table names."""

    def __getitem__(self, name: str) -> FusedEmbeddingBag:
        return self._modules[name]

    def __len__(self) -> int:
        return len(self._modules)


def _batch_size(offsets, lengths) -> int | None:
    """B of one feature (None when the tensors are malformed: embedding_bag then says why)."""
    t, extra = (lengths, 0) if lengths is not None else (offsets, 1)
    return t.shape[0] - extra if isinstance(t, Tensor) and t.dim() == 1 else None


class FusedEmbeddingBagCollection(nn.Module):
    """Several embedding tables (different N and D), each serving one or more features.

    forward({feature: (indices, offsets)}) -> [B, sum of D over (table, feature)], concatenated
    in table order and, within a table, in feature_names order; with return_dict=True a dict
    {feature: [B, D]}. offsets are CSR [B+1] (TorchRec's convention); see `_jagged` for the
    other accepted forms (lengths, per-sample weights). Every feature must have the same B.
    Features not in any table are ignored. State dict keys: `embedding_bags.<table>.weight`.
    """

    def __init__(self, tables: Sequence[TableConfig], *, device=None, dtype=None, bounds: str = "raise",
                 backend: str | None = None) -> None:
        super().__init__()
        self.tables = [replace(t) for t in tables]  # copies: quantize() updates their bits
        if not self.tables:
            raise ValueError("tables must not be empty")
        names = [t.name for t in self.tables]
        features = [f for t in self.tables for f in t.feature_names]
        for what, values in (("table name", names), ("feature name", features)):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"duplicate {what}(s): {dup}")
        self.embedding_bags = _Tables()
        for t in self.tables:
            bag = FusedEmbeddingBag(t.num_embeddings, t.embedding_dim, mode=t.pooling, include_last_offset=True,
                                    device=device, dtype=dtype, bounds=bounds, backend=backend)
            if t.bits is not None:
                bag.quantize(t.bits)
            try:
                self.embedding_bags.add_module(t.name, bag)
            except (KeyError, TypeError) as exc:
                raise ValueError(f"table name {t.name!r} cannot name a submodule: {exc}") from None

    @property
    def feature_names(self) -> list[str]:
        return [f for t in self.tables for f in t.feature_names]

    def quantize(self, bits: int = 8) -> "FusedEmbeddingBagCollection":
        """Quantize every float table in place. Returns self."""
        for t in self.tables:
            bag = self.embedding_bags[t.name]
            if bag.bits is None:
                bag.quantize(bits)
            t.bits = bag.bits
        return self

    def _pooled(self, lookups: list[tuple[str, Tensor, Tensor | None, Tensor | None, Tensor | None]]) -> Tensor:
        """[B, sum of D] for the (table, indices, offsets, lengths, weights) lookups, in order: one
        embedding_bag_grouped call (one kernel launch) for every lookup of a float32/float16/
        bfloat16/quantized table; float64 tables, which the grouped op does not take, go through
        embedding_bag one at a time, and so does everything when the collection's `backend` names
        one that has no grouped kernel on this device."""
        tables = self.embedding_bags._modules  # (nn.Module attribute look-ups cost ~0.3 us each)
        bags = [tables[table] for table, *_ in lookups]
        table_weights = [bag.weight for bag in bags]
        device = table_weights[0].device
        backend = bags[0].backend
        loop = backend is not None and backend not in _backend.available_backends("embedding_bag_grouped",
                                                                                   device.type)
        for bag, weight in zip(bags, table_weights):
            if bag.sparse:
                _keep_coalesced_flag(weight)
        grouped = [k for k, w in enumerate(table_weights) if not loop and w.dtype != torch.float64]
        cols: list[Tensor | None] = [None] * len(lookups)
        if len(grouped) < len(lookups):
            for k, (bag, (_, indices, offsets, lengths, weights)) in enumerate(zip(bags, lookups)):
                if k not in grouped:
                    cols[k] = embedding_bag(table_weights[k], indices, offsets, lengths=lengths,
                                            per_sample_weights=weights, mode=bag.mode, padding_idx=bag.padding_idx,
                                            bounds=bag.bounds, bits=bag.bits or 8, sparse=bag.sparse,
                                            backend=bag.backend)
        if grouped:
            out = embedding_bag_grouped(
                [table_weights[k] for k in grouped], [lookups[k][1] for k in grouped],
                [lookups[k][2] for k in grouped], lengths=[lookups[k][3] for k in grouped],
                per_sample_weights=[lookups[k][4] for k in grouped], modes=[bags[k].mode for k in grouped],
                padding_idx=[bags[k].padding_idx for k in grouped], bits=[bags[k].bits or 8 for k in grouped],
                sparse=[bags[k].sparse for k in grouped], bounds=bags[0].bounds, backend=backend)
            if len(grouped) == len(lookups):
                return out
            for k, part in zip(grouped, out.split([bags[k].embedding_dim for k in grouped], dim=1)):
                cols[k] = part
        return torch.cat(cols, dim=1)  # mixed dtypes promote (e.g. fp64 + the grouped fp32 -> fp64)

    def forward(self, features: Mapping[str, object], *, return_dict: bool = False):
        lookups, names, batch = [], [], None
        for t in self.tables:
            for f in t.feature_names:
                if f not in features:
                    raise KeyError(f"features: missing feature {f!r} (table {t.name!r})")
                indices, offsets, lengths, weights = _jagged(f, features[f])
                b = _batch_size(offsets, lengths)
                if batch is None:
                    batch, first = b, f
                elif b is not None and b != batch:
                    raise ValueError(f"features: every feature needs the same batch size; {f!r} has {b} bags, "
                                     f"{first!r} has {batch}")
                lookups.append((t.name, indices, offsets, lengths, weights))
                names.append(f)
        pooled = self._pooled(lookups)
        if return_dict:
            dims = [self.embedding_bags[table].embedding_dim for table, *_ in lookups]
            return dict(zip(names, pooled.split(dims, dim=1)))
        return pooled

    def extra_repr(self) -> str:
        return ", ".join(f"{t.name}: {t.num_embeddings}x{t.embedding_dim} {t.pooling} {t.feature_names}"
                         + (f" int{t.bits}" if t.bits else "") for t in self.tables)
