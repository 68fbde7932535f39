"""Whole-model transforms of `models.Recommender` through the fused modules.

  quantize_tables_   every embedding table -> int8/int4 row-wise (FusedEmbeddingBag underneath)
  quantize_mlp_      the user-tower MLP -> Int8Linear via quantize_ (ReLU fused into fc1)
  prune_rows_        user table and history bag -> compact tables + remap (frequency or norm)
  freeze_int8_       fold the content bias, freeze the retrieval catalog as int8; when the item
                     table is already int8 the catalog IS that table (one copy of the bytes)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn._hooks import carry_forward_hooks
from ..nn.embedding import FusedEmbeddingBag
from ..quant import quantize_
from .embedding import RemappedEmbedding, RemappedEmbeddingBag, prune_embedding

TABLES = ("user_emb", "item_emb", "history")


def quantize_tables_(model: nn.Module, bits: int, names: tuple[str, ...] = TABLES) -> list[str]:
    """Quantize the named embedding tables in place (float ones only). Returns what changed."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    done = []
    for name in names:
        mod = old = getattr(model, name, None)
        if isinstance(mod, nn.Embedding):
            mod = RemappedEmbedding.from_embedding(mod)
        elif isinstance(mod, nn.EmbeddingBag):
            mod = RemappedEmbeddingBag.from_embedding_bag(mod)
        elif isinstance(mod, FusedEmbeddingBag):
            mod = RemappedEmbeddingBag.from_embedding_bag(mod)
        elif not isinstance(mod, (RemappedEmbedding, RemappedEmbeddingBag)):
            continue
        if mod.bits is None:
            mod.quantize(bits)
            done.append(f"{name} -> int{bits}")
        setattr(model, name, carry_forward_hooks(old, mod))
    return done


def quantize_mlp_(model: nn.Module) -> list[str]:
    """The user-tower MLP's nn.Linear layers -> Int8Linear (dynamic int8 activations, the ReLU
    fused into the epilogue of the layer before it)."""
    names = [n for n, m in model.mlp.named_modules() if isinstance(m, nn.Linear)]
    quantize_(model.mlp)
    return [f"mlp.{n} -> Int8Linear" for n in names]


def prune_rows_(model: nn.Module, amount: float, *, by: str = "frequency", train_data=None,
                default: str = "mean") -> list[str]:
    """Row-prune the user table and the history bag in place (compact table + remap). by=
    "frequency" counts lookups in `train_data` (user: its interactions; history item: how often
    it appears in a history). The item table is the retrieval catalog and is never pruned."""
    counts_user = counts_item = None
    if by == "frequency":
        if train_data is None:
            raise ValueError("by='frequency' needs train_data")
        counts_user = torch.bincount(train_data.users, minlength=model.num_users)
        counts_item = train_data.item_counts()
    done = []
    for name, counts, dflt in (("user_emb", counts_user, "zero" if default == "drop" else default),
                               ("history", counts_item, default)):
        mod = getattr(model, name)
        if isinstance(mod, (RemappedEmbedding, RemappedEmbeddingBag)):
            raise ValueError(f"{name} is already pruned or quantized; prune the float model first")
        new = prune_embedding(mod, amount, by=by, counts=counts, default=dflt)
        setattr(model, name, carry_forward_hooks(mod, new))
        rows = new.table.num_embeddings if isinstance(new, RemappedEmbedding) else new.bag.num_embeddings
        done.append(f"{name}: {mod.num_embeddings} -> {rows} rows (by {by}, default row {dflt})")
    return done


@torch.no_grad()
def freeze_int8_(model: nn.Module) -> list[str]:
    """Fold the content bias into a constant (if not yet) and freeze the int8 retrieval
    catalog."""
    model.fold_item_bias()
    item = model.item_emb
    if isinstance(item, RemappedEmbedding) and item.bits == 8 and item.remap is None:
        model.catalog = item.table.weight  # the same uint8 tensor: topk_scores reads it directly
        model.catalog_bias = model.item_bias().float().contiguous()
        return ["catalog = the int8 item table (shared)"]
    model.freeze_catalog(bits=8)
    return ["catalog frozen int8 (a copy of the item vectors)"]


def serving_params(model: nn.Module) -> tuple[int, int]:
    """(weights the model stores, of which non-zero): float Parameters, the int8 weights of
    Int8Linear, the codes of quantized tables (rows x dim), the non-zeros of SparseLinear;
    biases and scales of the quantized layers are counted in bytes, not here. The frozen
    catalog is not counted (it is the item table, copied or shared)."""
    from ..nn.linear import Int8Linear
    from .sparse import SparseLinear

    total = nonzero = 0
    for mod in model.modules():
        own = []
        if isinstance(mod, FusedEmbeddingBag) and mod.bits is not None:
            from ..ops.rowwise import dequantize_rowwise

            own.append(dequantize_rowwise(mod.weight, mod.bits))
        elif isinstance(mod, Int8Linear):
            own.append(mod.weight_q)
            if mod.bias is not None:
                own.append(mod.bias)
        elif isinstance(mod, SparseLinear):
            total += mod.nnz
            nonzero += int((mod.weight_csr.values() != 0).sum())
            if mod.bias is not None:
                own.append(mod.bias)
        own += [p for p in mod.parameters(recurse=False)]
        for t in own:
            total += t.numel()
            nonzero += int((t != 0).sum())
    return total, nonzero


def model_bytes(model: nn.Module, *, caches: bool = False) -> int:
    """Bytes of the model's state: parameters and persistent buffers (what `state_dict` holds, and
    so what a checkpoint ships), sparse CSR parts included, each tensor counted once even when two
    attributes share it. caches=True adds the non-persistent buffers: run-time caches rebuilt from
    the state, such as Int8Linear's packed weight copy, which a serving process also holds."""
    seen, total = set(), 0
    tensors = list(model.state_dict(keep_vars=True).values())  # the parameters are in it too
    if caches:
        tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        parts = [t]
        if t.layout == torch.sparse_csr:
            parts = [t.values(), t.col_indices(), t.crow_indices()]
        for p in parts:
            key = (p.data_ptr(), p.numel(), p.dtype)
            if key not in seen:
                seen.add(key)
                total += p.numel() * p.element_size()
    return total


def count_default_hits(model: nn.Module, name: str, ids: torch.Tensor) -> Optional[int]:
    """How many of `ids` a row-pruned table `name` sends to its shared default row."""
    mod = getattr(model, name)
    if not isinstance(mod, (RemappedEmbedding, RemappedEmbeddingBag)) or mod.remap is None:
        return None
    rows = mod.table.num_embeddings if isinstance(mod, RemappedEmbedding) else mod.bag.num_embeddings
    return int((mod.remap[ids] == rows - 1).sum())
