"""Forward hooks across a module swap: the passes that replace a layer (quantize_, the graph
passes, the compress passes) keep the hooks a user registered on it, as torch.ao's swap_module
does for quantize_dynamic."""
from __future__ import annotations

from torch import nn


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward pre-hooks or forward hooks of its own (a pass that would fuse
    it into its neighbour must not: the hooks would see other tensors, or none)."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def carry_forward_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """Register `old`'s forward pre-hooks and forward hooks on its replacement `new`, in order and
    with their options (with_kwargs, always_call). Returns `new`. The handles returned for `old`
    do not remove the copies."""
    if new is old:
        return new
    for key, hook in old._forward_pre_hooks.items():
        new.register_forward_pre_hook(hook, with_kwargs=key in old._forward_pre_hooks_with_kwargs)
    for key, hook in old._forward_hooks.items():
        new.register_forward_hook(hook, with_kwargs=key in old._forward_hooks_with_kwargs,
                                  always_call=key in old._forward_hooks_always_called)
    return new
