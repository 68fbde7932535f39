"""Weight pruning, in place: unstructured magnitude, structured (output neurons), N:M.

Every transform zeroes (or removes) weights of the model it is given and returns a
`SparsityReport`: one line per touched weight with its size and how many entries are zero
afterwards. Amounts are exact: pruning a fraction `a` of n weights zeroes round(a * n) of them
(ties in magnitude go to the lower flat index, so the choice is deterministic). A weight that
already had zeros counts them in the report, but the amount is taken from all entries.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..quant import runs_in_order

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """What a pruning transform did: `layers` (one LayerSparsity per weight it touched),
    `removed_params` (parameters that no longer exist, for structured pruning), `skipped`
    (layer names left alone and why)."""
    method: str
    layers: list[LayerSparsity] = field(default_factory=list)
    removed_params: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __str__(self) -> str:
        lines = [f"{self.method}: {self.zeros}/{self.numel} weights zero ({100 * self.sparsity:.1f}%)"
                 + (f", {self.removed_params} parameters removed" if self.removed_params else "")]
        lines += [f"  {layer.name} {list(layer.shape)}: {100 * layer.sparsity:.1f}% zero" for layer in self.layers]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _check_amount(amount: float, name: str = "amount") -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {amount!r}")


def _linears(model: nn.Module, filter_fn: Optional[FilterFn]) -> list[tuple[str, nn.Linear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, name))]


def _smallest(scores: Tensor, count: int) -> Tensor:
    """Flat indices of the `count` smallest entries of `scores`; ties to the lower index (a
    stable sort keeps equal scores in index order)."""
    return torch.sort(scores.flatten(), stable=True).indices[:count]


def _layer(name: str, weight: Tensor) -> LayerSparsity:
    return LayerSparsity(name, tuple(weight.shape), weight.numel(), int((weight == 0).sum()))


@torch.no_grad()
def magnitude_prune_(model: nn.Module, amount: float, *, scope: str = "global",
                     filter_fn: Optional[FilterFn] = None) -> SparsityReport:
    """Zero the `amount` fraction of nn.Linear weights with the smallest magnitude, in place.

    scope="global": one ranking over all selected layers together (round(amount * total)
    weights, so layers with many small weights lose more); "layer": round(amount * n_l) in
    each layer. Biases are kept. filter_fn(module, name) picks the layers (default: every
    nn.Linear)."""
    _check_amount(amount)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    layers = _linears(model, filter_fn)
    report = SparsityReport(f"magnitude ({scope}, {amount:g})")
    if scope == "layer":
        for _, lin in layers:
            w = lin.weight
            w.view(-1)[_smallest(w.abs(), round(amount * w.numel()))] = 0
    elif layers:
        flat = torch.cat([lin.weight.detach().abs().flatten().float() for _, lin in layers])
        cut = _smallest(flat, round(amount * flat.numel()))
        start = 0
        for _, lin in layers:
            n = lin.weight.numel()
            mine = cut[(cut >= start) & (cut < start + n)] - start
            lin.weight.view(-1)[mine] = 0
            start += n
    report.layers = [_layer(name, lin.weight) for name, lin in layers]
    return report


@torch.no_grad()
def nm_prune_(model: nn.Module, n: int = 2, m: int = 4, *, filter_fn: Optional[FilterFn] = None) -> SparsityReport:
    """N:M semi-structured pruning, in place: in every group of `m` consecutive weights along
    the input dimension of each nn.Linear keep the `n` largest in magnitude (ties to the lower
    position), zero the rest (2:4 is the pattern sparse tensor cores run). Layers whose
    in_features is not a multiple of m are skipped and listed in the report."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"need integers 0 < n <= m, got n={n!r}, m={m!r}")
    report = SparsityReport(f"{n}:{m} semi-structured")
    for name, lin in _linears(model, filter_fn):
        if lin.in_features % m:
            report.skipped.append((name, f"in_features={lin.in_features} is not a multiple of {m}"))
            continue
        groups = lin.weight.view(lin.out_features, -1, m)
        # rank within each group: stable sort of -|w| keeps the lower position first on ties
        order = torch.sort(-groups.abs(), dim=-1, stable=True).indices
        drop = order[..., n:]
        groups.scatter_(-1, drop, 0.0)
        report.layers.append(_layer(name, lin.weight))
    return report


def check_nm_pattern(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of m consecutive entries along the last dimension has at most n
    non-zeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(-1) <= n).all())


# activations with f(0) = 0 (so a removed neuron, whose pre-activation would be 0 after
# zeroing its row and bias, contributed nothing downstream) that act element-wise
_ZERO_PRESERVING = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity, nn.Dropout, nn.LeakyReLU, nn.Hardtanh,
                    nn.ReLU6, nn.Mish, nn.Hardswish, nn.Softsign, nn.Tanhshrink)


@torch.no_grad()
def neuron_scores(linear: nn.Linear, criterion: str = "l2") -> Tensor:
    """Importance of each output neuron of `linear`: the norm of its weight row and bias
    ("l2" or "l1")."""
    w = linear.weight.detach().float()
    if linear.bias is not None:
        w = torch.cat([w, linear.bias.detach().float()[:, None]], dim=1)
    if criterion == "l2":
        return w.norm(dim=1)
    if criterion == "l1":
        return w.abs().sum(1)
    raise ValueError(f"criterion must be 'l2' or 'l1', got {criterion!r}")


def kept_neurons(linear: nn.Linear, amount: float, criterion: str = "l2") -> Tensor:
    """Sorted indices of the output neurons structured pruning keeps: all but the
    round(amount * out_features) lowest-scoring ones, at least one."""
    _check_amount(amount)
    drop_count = min(round(amount * linear.out_features), linear.out_features - 1)
    drop = _smallest(neuron_scores(linear, criterion), drop_count)
    keep = torch.ones(linear.out_features, dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


@torch.no_grad()
def prune_linear_outputs_(linear: nn.Linear, next_linear: nn.Linear, keep: Tensor) -> int:
    """Keep only output neurons `keep` of `linear` and the matching input columns of
    `next_linear`: both get real, smaller weight matrices (new Parameters). Returns the number
    of parameters removed."""
    if next_linear.in_features != linear.out_features:
        raise ValueError(f"next_linear.in_features ({next_linear.in_features}) must equal linear.out_features "
                         f"({linear.out_features})")
    before = sum(p.numel() for p in (*linear.parameters(), *next_linear.parameters()))
    keep = keep.to(linear.weight.device)

    def smaller(p: nn.Parameter, rows: Tensor) -> nn.Parameter:  # a frozen layer stays frozen
        return nn.Parameter(rows.clone(), requires_grad=p.requires_grad)

    linear.weight = smaller(linear.weight, linear.weight[keep])
    if linear.bias is not None:
        linear.bias = smaller(linear.bias, linear.bias[keep])
    linear.out_features = keep.numel()
    next_linear.weight = smaller(next_linear.weight, next_linear.weight[:, keep])
    next_linear.in_features = keep.numel()
    return before - sum(p.numel() for p in (*linear.parameters(), *next_linear.parameters()))


def _model_linear_pairs(model: nn.Module, filter_fn: Optional[FilterFn] = None,
                        report: Optional[SparsityReport] = None):
    """(qualified name, linear, next linear) of every _linear_pairs pair in the model's
    nn.Sequential blocks (whose forward is nn.Sequential's: a subclass's own forward may use the
    layers' outputs elsewhere) that filter_fn (if given) accepts. A pair whose layers, or their
    weights, are registered anywhere else too (shared or tied) is left out, and listed in
    report.skipped if a report is given: resizing them would give their other users the wrong
    widths (or untie them)."""
    registrations = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    param_registrations = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))

    def shared(*layers: nn.Linear) -> bool:
        return any(registrations[id(m)] > 1 or any(param_registrations[id(p)] > 1 for p in m.parameters())
                   for m in layers)

    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for name, lin, nxt in _linear_pairs(seq):
            fqn = f"{seq_name}.{name}" if seq_name else name
            if filter_fn is not None and not filter_fn(lin, fqn):
                continue
            why = ("in an nn.Sequential subclass with its own forward" if not runs_in_order(seq)
                   else "shared: this layer or the next, or their weights, are registered elsewhere too"
                   if shared(lin, nxt) else None)
            if why is not None:
                if report is not None:
                    report.skipped.append((fqn, why))
                continue
            yield fqn, lin, nxt


def _linear_pairs(seq: nn.Sequential) -> list[tuple[str, nn.Linear, nn.Linear]]:
    """(name, linear, next linear) for every Linear followed, through zero-preserving
    element-wise layers only, by another Linear in `seq`."""
    pairs, children = [], list(seq.named_children())
    for i, (name, mod) in enumerate(children):
        if not isinstance(mod, nn.Linear):
            continue
        for _, nxt in children[i + 1:]:
            if isinstance(nxt, nn.Linear):
                pairs.append((name, mod, nxt))
                break
            if not isinstance(nxt, _ZERO_PRESERVING):
                break
    return pairs


@torch.no_grad()
def structured_prune_(model: nn.Module, amount: float, *, criterion: str = "l2",
                      filter_fn: Optional[FilterFn] = None) -> SparsityReport:
    """Remove the `amount` fraction of output neurons (lowest weight-row norm) of every
    nn.Linear inside an nn.Sequential that feeds another nn.Linear through element-wise
    activations with f(0) = 0 (ReLU, GELU, SiLU, Tanh, ...), shrinking the next layer's input
    columns to match: real smaller matrices, not masks. The result computes exactly what the
    model with those rows and biases zeroed (masked) computes. The last Linear of a Sequential
    (its outputs are the block's outputs) is kept whole. Returns the report (`removed_params`
    counts what went away; the layers list has the new shapes, 0 zeros added)."""
    _check_amount(amount)
    report = SparsityReport(f"structured neurons ({criterion}, {amount:g})")
    for fqn, lin, nxt in _model_linear_pairs(model, filter_fn, report):
        report.removed_params += prune_linear_outputs_(lin, nxt, kept_neurons(lin, amount, criterion))
        report.layers.append(_layer(fqn, lin.weight))
    return report


@torch.no_grad()
def structured_mask_(model: nn.Module, amount: float, *, criterion: str = "l2",
                     filter_fn: Optional[FilterFn] = None) -> SparsityReport:
    """The masked twin of `structured_prune_`: zero the same neurons' weight rows and biases
    instead of removing them (same shapes). Used to check that structured pruning is exact."""
    _check_amount(amount)
    report = SparsityReport(f"structured mask ({criterion}, {amount:g})")
    for fqn, lin, nxt in _model_linear_pairs(model, filter_fn, report):
        drop = torch.ones(lin.out_features, dtype=torch.bool)
        drop[kept_neurons(lin, amount, criterion)] = False
        lin.weight[drop] = 0
        if lin.bias is not None:
            lin.bias[drop] = 0
        # the next layer's columns for those neurons multiply zeros; zeroing them changes no
        # output and keeps the next layer's neuron norms equal to the shrunk layer's
        nxt.weight[:, drop] = 0
        report.layers.append(_layer(fqn, lin.weight))
    return report


@contextlib.contextmanager
def keep_zeros(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> Iterator[None]:
    """While active, gradients of the zero entries of every nn.Linear weight are zeroed, so
    that retraining a pruned model (with a fresh Adam/SGD optimizer: their update of a
    parameter whose gradients were always 0 is 0, weight decay of 0 is 0) keeps it pruned.
    The hooks are removed on exit."""
    handles = []
    for _, lin in _linears(model, filter_fn):
        mask = (lin.weight.detach() != 0).to(lin.weight.dtype)
        if bool((mask == 0).any()):
            handles.append(lin.weight.register_hook(lambda g, mask=mask: g * mask))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sequential_linears(model: nn.Module) -> Sequence[str]:
    """Names of the nn.Linear layers structured pruning would shrink (for reports)."""
    return [fqn for fqn, _, _ in _model_linear_pairs(model)]
