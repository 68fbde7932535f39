"""torch.fx graph passes for the Recommender's scoring path (and any traceable module).

  trace(model)                  symbolic trace of model.forward (the Recommender's forward is its
                                pairwise `score`); this package's modules are kept as leaves
  eliminate_dead_code(gm)       drop nodes whose results nothing uses, then unused submodules
  swap_embedding_bags(gm, bits) nn.EmbeddingBag -> FusedEmbeddingBag (optionally int8/int4)
  linear_to_int8(gm)            nn.Linear (+ a following ReLU / GELU(erf) / SiLU, module or
                                function, when the Linear's only user) -> Int8Linear(activation=...)
  linear_to_conv1x1(gm)         opt-in: nn.Linear -> Conv1x1 (a 1x1 nn.Conv1d over the rows).
                                Same numbers up to float rounding; not expected to be faster (it
                                ends in the same GEMM plus two transposes), see docs/design.md
  optimize_graph(model, ...)    deep copy, trace, run the selected passes -> (GraphModule, report)

Every pass edits the GraphModule in place, recompiles it and returns a `PassReport` listing
what it replaced or removed. Replacements are new modules: the traced model's modules are not
modified (FusedEmbeddingBag.from_embedding_bag shares the float Parameter, as a drop-in does).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .nn._hooks import carry_forward_hooks, has_forward_hooks
from .nn.embedding import FusedEmbeddingBag
from .nn.linear import Int8Linear
from .quant import fusable_activation

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class PassReport:
    """(pass, node, what it was, what it became) per change; `removed` nodes by DCE; `skipped`:
    (pass, node, why) for layers a pass left alone."""
    changes: list[tuple[str, str, str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def skip(self, pass_name: str, node: str, why: str) -> None:
        """List a layer the pass left alone, once however many calls of it the graph has."""
        if (pass_name, node, why) not in self.skipped:
            self.skipped.append((pass_name, node, why))

    def extend(self, other: "PassReport") -> "PassReport":
        self.changes += other.changes
        self.removed += other.removed
        self.skipped += other.skipped
        return self

    def __str__(self) -> str:
        lines = [f"{p:<22}{n:<24}{a} -> {b}" for p, n, a, b in self.changes]
        lines += [f"{p:<22}{n:<24}left alone: {why}" for p, n, why in self.skipped]
        if self.removed:
            lines.append(f"{'dead code':<22}removed {len(self.removed)} node(s): {', '.join(self.removed)}")
        return "\n".join(lines) if lines else "(no changes)"


class Conv1x1(nn.Module):
    """nn.Linear as a 1x1 convolution: x [..., in] is viewed as one sequence of M = prod(...)
    positions with `in` channels, [1, in, M], run through nn.Conv1d(in, out, 1)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.conv = nn.Conv1d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None,
                              device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(linear.weight[:, :, None])
            if linear.bias is not None:
                self.conv.bias.copy_(linear.bias)
        for mine, theirs in ((self.conv.weight, linear.weight), (self.conv.bias, linear.bias)):
            if mine is not None:
                mine.requires_grad_(theirs.requires_grad)  # a frozen layer stays frozen

    def forward(self, input: Tensor) -> Tensor:  # (nn.Linear's argument name: calls by keyword work)
        lead = input.shape[:-1]
        if lead.numel() == 0:  # no rows: Conv1d refuses a sequence of 0 positions
            return input.new_empty(*lead, self.out_features)
        seq = input.reshape(-1, self.in_features).t().unsqueeze(0)  # [1, in, M]
        return self.conv(seq).squeeze(0).t().reshape(*lead, self.out_features)


def _leaf_types() -> tuple[type, ...]:
    from .compress.embedding import RemappedEmbedding, RemappedEmbeddingBag
    from .compress.sparse import SparseLinear

    return (FusedEmbeddingBag, Int8Linear, Conv1x1, RemappedEmbedding, RemappedEmbeddingBag, SparseLinear)


def _autocast_state() -> tuple:
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


class _Tracer(fx.Tracer):
    """Keeps this package's modules whole (their forwards branch on tensor metadata), and refuses
    a forward that enters torch.autocast: fx records no context manager, so the graph would run
    the block's ops without it."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _leaf_types()) or super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        self._autocast_outside = _autocast_state()
        return super().trace(root, concrete_args)

    def create_node(self, *args, **kwargs):
        if _autocast_state() != self._autocast_outside:
            raise NotImplementedError(
                "the model's forward enters or leaves torch.autocast, which torch.fx tracing cannot record "
                "(the graph would run those ops without it); call the model inside torch.autocast instead")
        return super().create_node(*args, **kwargs)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolic trace of model.forward (for the Recommender: score(users, items, hist_offsets,
    hist_items), its pair-scoring path in plain PyTorch form)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, type(model).__name__ + "Graph")


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, carry_forward_hooks(getattr(parent, name), module))  # the user's hooks stay


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()


def _mutates(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a node may change state even when nothing uses its result: torch's impure calls,
    and the in-place ones torch's check misses (`h.relu_()`, `buf.copy_(x)`, `F.relu(x,
    inplace=True)`, `nn.ReLU(inplace=True)`, `x[i] = v`, a module updating buffers in training)."""
    if node.is_impure():
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return bool(getattr(module, "inplace", False)) or (module.training and any(True for _ in module.buffers()))
    if node.op in ("call_method", "call_function"):
        return (node.kwargs.get("inplace", False) is True or node.target is operator.setitem
                or (name.endswith("_") and not name.endswith("__")))
    return False


def eliminate_dead_code(gm: fx.GraphModule) -> PassReport:
    """Remove nodes with no users (placeholders, outputs and calls that may change state stay:
    in-place ops, buffer updates), then the submodules no node uses."""
    before = {n.name for n in gm.graph.nodes}
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: _mutates(gm, node))
    gm.delete_all_unused_submodules()
    after = {n.name for n in gm.graph.nodes}
    _finish(gm)
    return PassReport(removed=sorted(before - after))


def _attributes_read(gm: fx.GraphModule) -> set[str]:
    """Targets of the graph's get_attr nodes: module attributes the forward reads directly."""
    return {node.target for node in gm.graph.nodes if node.op == "get_attr"}


_READ = "its weight or bias is read directly"


def _reads_into(read: set[str], target: str) -> bool:
    """Whether the forward reads an attribute of submodule `target` directly (e.g. a tied
    `linear.weight`): replacing that module would take the attribute away or change it."""
    return any(attr.startswith(target + ".") for attr in read)


def swap_embedding_bags(gm: fx.GraphModule, bits: Optional[int] = None) -> PassReport:
    """Every call of an nn.EmbeddingBag module -> FusedEmbeddingBag over the same table (then
    quantized to `bits` when given; a quantized table is inference-only). Left alone, and
    listed in the report's `skipped`: bags with options FusedEmbeddingBag refuses (max_norm,
    scale_grad_by_freq), and with `bits`, bags whose weight the forward also reads directly."""
    report = PassReport()
    read = _attributes_read(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.EmbeddingBag:
            if bits is not None and _reads_into(read, node.target):
                report.skip("embedding_bag", node.target, "its weight is read directly (would be packed)")
                continue
            try:
                fused = FusedEmbeddingBag.from_embedding_bag(mod)
            except NotImplementedError as e:  # max_norm, scale_grad_by_freq
                report.skip("embedding_bag", node.target, str(e))
                continue
            if bits is not None:
                fused = copy.deepcopy(fused).quantize(bits)  # leave the shared float Parameter alone
            _set_submodule(gm, node.target, fused)
            report.changes.append(("embedding_bag", node.target, "nn.EmbeddingBag",
                                   "FusedEmbeddingBag" + (f" int{bits}" if bits else "")))
    _finish(gm)
    return report


_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu"}


def _activation_of(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """The Int8Linear epilogue name of activation node `node`, or None."""
    if node.op == "call_module":
        return fusable_activation(gm.get_submodule(node.target))
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS and not node.kwargs.get("inplace", False) and len(node.args) == 1:
            return _ACT_FUNCTIONS[node.target]
        if node.target is F.gelu and node.kwargs.get("approximate", "none") == "none" and len(node.args) == 1:
            return "gelu"
        return None
    if node.op == "call_method" and node.target == "relu" and len(node.args) == 1:
        return "relu"
    return None


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """An activation node as the report names it: its module class, function or method."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    owner = "torch" if node.target is torch.relu else "F"
    return f"{owner}.{node.target.__name__}"


def linear_to_int8(gm: fx.GraphModule, *, act_quant: str = "dynamic",
                   filter_fn: Optional[FilterFn] = None) -> PassReport:
    """nn.Linear call -> Int8Linear; when the Linear's only user is a ReLU / GELU (erf) / SiLU
    taking it as its one input, that activation is fused into the Int8Linear epilogue and its
    node removed. A Linear called at several places (shared weights) becomes one Int8Linear
    without a fused activation: a fused one would apply at every place. A Linear whose weight or
    bias the forward also reads directly (tied weights) stays (report.skipped). filter_fn(module,
    target) picks the layers (default: all)."""
    report = PassReport()
    read = _attributes_read(gm)
    call_sites: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call_sites[node.target] = call_sites.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is not nn.Linear or (filter_fn is not None and not filter_fn(mod, node.target)):
            continue
        if _reads_into(read, node.target):
            report.skip("linear_to_int8", node.target, _READ)
            continue
        users = list(node.users)
        act = None
        if (call_sites[node.target] == 1 and len(users) == 1 and users[0].args[:1] == (node,)
                and not has_forward_hooks(mod)):
            act = _activation_of(gm, users[0])
        _set_submodule(gm, node.target, Int8Linear.from_float(mod, activation=act, act_quant=act_quant))
        what = "nn.Linear"
        if act is not None:
            what += f" + {_describe(gm, users[0])}"
            users[0].replace_all_uses_with(node)
            gm.graph.erase_node(users[0])
        report.changes.append(("linear_to_int8", node.target, what, f"Int8Linear(activation={act or 'none'!r})"))
    gm.delete_all_unused_submodules()  # the fused activation modules
    _finish(gm)
    return report


def linear_to_conv1x1(gm: fx.GraphModule, *, filter_fn: Optional[FilterFn] = None) -> PassReport:
    """Opt-in: nn.Linear call -> Conv1x1 (same weights). See the module doc on speed."""
    report = PassReport()
    read = _attributes_read(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.Linear and (filter_fn is None or filter_fn(mod, node.target)):
            if _reads_into(read, node.target):
                report.skip("linear_to_conv1x1", node.target, _READ)
                continue
            _set_submodule(gm, node.target, Conv1x1(mod))
            report.changes.append(("linear_to_conv1x1", node.target, "nn.Linear", "Conv1x1 (nn.Conv1d k=1)"))
    _finish(gm)
    return report


def optimize_graph(model: nn.Module, *, dce: bool = True, embedding_bags: bool = True,
                   embedding_bits: Optional[int] = None, int8: bool = True, conv1x1: bool = False,
                   int8_filter: Optional[FilterFn] = None) -> tuple[fx.GraphModule, PassReport]:
    """Trace a deep copy of `model` (left untouched) and run the passes in order: dead code,
    EmbeddingBag -> FusedEmbeddingBag, Linear(+act) -> Int8Linear, Linear -> Conv1x1 (for
    the layers still nn.Linear: pass int8=False, or an int8_filter, to convert them)."""
    gm = trace(copy.deepcopy(model).eval())
    report = PassReport()
    if dce:
        report.extend(eliminate_dead_code(gm))
    if embedding_bags:
        report.extend(swap_embedding_bags(gm, embedding_bits))
    if int8:
        report.extend(linear_to_int8(gm, filter_fn=int8_filter))
    if conv1x1:
        report.extend(linear_to_conv1x1(gm))
    return gm, report


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Node counts by kind (call_module targets by module type), for reports and tests."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            key = type(gm.get_submodule(node.target)).__name__
        elif node.op == "call_function":
            key = getattr(node.target, "__name__", str(node.target)) if node.target is not operator.getitem \
                else "getitem"
        else:
            key = node.op
        counts[key] = counts.get(key, 0) + 1
    return counts
