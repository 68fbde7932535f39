"""Model-level int8 quantization: `quantize_` swaps nn.Linear layers for Int8Linear in place."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .nn._hooks import carry_forward_hooks, has_forward_hooks
from .nn.linear import Int8Linear
from .ops.int8_matmul import ACT_QUANTS

FilterFn = Callable[[nn.Module, str], bool]


def fusable_activation(module: nn.Module) -> Optional[str]:
    """The epilogue name of an activation module Int8Linear can fuse, else None (also for one with
    forward hooks: fused away, they would not run)."""
    if has_forward_hooks(module):
        return None
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    if type(module) is nn.SiLU:
        return "silu"
    return None


def _is_candidate(module: nn.Module, parent: nn.Module) -> bool:
    # An nn.Linear subclass with a forward of its own computes something else than x @ W.T + b.
    # nn.MultiheadAttention reads out_proj.weight / .bias directly (F.multi_head_attention_forward),
    # so its out_proj (a NonDynamicallyQuantizableLinear) must stay a float Linear.
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and not isinstance(parent, nn.MultiheadAttention))


def runs_in_order(parent: nn.Module) -> bool:
    """Whether parent's forward runs its children one after another in registration order: an
    nn.Sequential whose forward is nn.Sequential's (a subclass may call them any other way)."""
    return isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward


def _slot_counts(model: nn.Module) -> dict[int, int]:
    """id(module) -> in how many child slots of the whole model it sits (shared modules: > 1)."""
    counts: dict[int, int] = {}
    for module in model.modules():
        for child in module._modules.values():
            if child is not None:
                counts[id(child)] = counts.get(id(child), 0) + 1
    return counts


def _swap_children(parent: nn.Module, prefix: str, filter_fn: Optional[FilterFn], act_quant: str,
                   slots: dict[int, int], converted: dict[int, tuple[nn.Module, nn.Module]]) -> None:
    # converted: id(Linear) -> (that Linear, its Int8Linear). The Linear is kept so that its id
    # cannot pass to a module made during the walk (a shared block is walked once per slot).
    # every slot, shared modules included (named_children lists a module once)
    children = [(name, child) for name, child in parent._modules.items() if child is not None]
    fused = set()  # names of activation modules already folded into the Linear before them
    for i, (name, child) in enumerate(children):
        if name in fused:
            continue
        fqn = f"{prefix}{name}"
        if id(child) in converted:  # a shared Linear: the same Int8Linear in every place
            setattr(parent, name, converted[id(child)][1])
        elif _is_candidate(child, parent) and (filter_fn is None or filter_fn(child, fqn)):
            activation = None
            # Fuse only where "directly followed by" is the execution order, only into a Linear
            # that runs in this one place (a fused activation would apply at every call), and
            # neither with forward hooks (they would see the other module's tensors, or none).
            if (runs_in_order(parent) and slots[id(child)] == 1 and i + 1 < len(children)
                    and not has_forward_hooks(child)):
                next_name, next_child = children[i + 1]
                activation = fusable_activation(next_child)
                if activation is not None:
                    setattr(parent, next_name, nn.Identity())
                    fused.add(next_name)
            new = carry_forward_hooks(child, Int8Linear.from_float(child, activation=activation, act_quant=act_quant))
            converted[id(child)] = (child, new)
            setattr(parent, name, new)
        else:
            _swap_children(child, f"{fqn}.", filter_fn, act_quant, slots, converted)


def _disable_transformer_fast_paths(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer / nn.TransformerEncoder have eval-mode fast paths that read
    linear1.weight etc. and call one fused C++ kernel; with Int8Linear there they would fail. Both
    fall back to their module-by-module forward when these flags are off (the flags gate nothing
    else)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and (
                isinstance(module.linear1, Int8Linear) or isinstance(module.linear2, Int8Linear)):
            module.activation_relu_or_gelu = 0
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, Int8Linear) for m in module.modules()):
            module.use_nested_tensor = False


def quantize_(model: nn.Module, filter_fn: Optional[FilterFn] = None, *, act_quant: str = "dynamic") -> nn.Module:
    """Replace every nn.Linear in `model` (recursively, in place) by an Int8Linear with
    per-output-channel int8 weights and, with act_quant="dynamic", int8 activations quantized
    per row at run time ("none": weight-only). Returns the model.

    filter_fn(module, fqn) -> bool picks which Linear layers to convert (fqn is the dotted name,
    e.g. "encoder.layers.0.linear1"); default: all. A Linear directly followed, inside an
    nn.Sequential (not a subclass with its own forward), by nn.ReLU, nn.GELU(approximate="none")
    or nn.SiLU gets that activation fused into its epilogue and the activation module becomes
    nn.Identity, unless the Linear is shared (in more than one place of the model) or either
    module has forward hooks. A shared Linear becomes one shared Int8Linear. A converted layer
    keeps the Linear's forward pre-hooks and forward hooks (re-registered on the Int8Linear).

    Always left in float: nn.Linear subclasses with their own forward, nn.MultiheadAttention's
    out_proj (MHA reads its .weight directly).
    nn.TransformerEncoderLayer / nn.TransformerEncoder whose Linear layers are converted have
    their fused eval-mode fast path switched off (it reads .weight directly too). If `model`
    itself is an nn.Linear it cannot be replaced in place: the converted module is returned.
    Inference only: the converted layers have no backward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    if act_quant not in ACT_QUANTS:
        raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
    if isinstance(model, nn.Linear):
        if filter_fn is None or filter_fn(model, ""):
            return carry_forward_hooks(model, Int8Linear.from_float(model, act_quant=act_quant))
        return model
    _swap_children(model, "", filter_fn, act_quant, _slot_counts(model), {})
    _disable_transformer_fast_paths(model)
    return model
