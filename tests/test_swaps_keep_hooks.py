"""The passes that replace a layer keep the forward hooks a user registered on it (as torch.ao's
quantize_dynamic does), with their options, and do not fuse an activation away from hooks:
quantize_, graph.linear_to_int8 / swap_embedding_bags, compress.quantize_tables_ / prune_rows_
/ sparsify_."""
import torch
from torch import nn

import recsys_kernels as rk
from recsys_kernels import compress as C
from recsys_kernels import graph as G
from recsys_kernels.models.recommender import Recommender
from recsys_kernels.nn import Int8Linear


def tap(model_part, calls, name):
    """A pre-hook, a hook with kwargs and an always-called hook on `model_part`, logging to calls."""
    model_part.register_forward_pre_hook(lambda m, args: calls.append(f"{name}:pre"))
    model_part.register_forward_hook(lambda m, args, kwargs, out: calls.append(f"{name}:post"), with_kwargs=True)
    model_part.register_forward_hook(lambda m, args, out: calls.append(f"{name}:always"), always_call=True)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def test_quantize_keeps_hooks_and_does_not_fuse_across_them():
    model, calls, x = mlp(), [], torch.randn(3, 16)
    tap(model[0], calls, "lin0")  # hooks on the Linear: its ReLU is not fused
    model[3].register_forward_hook(lambda m, args, out: calls.append("relu3"))  # hooks on the ReLU: neither
    expected = model(x)
    calls.clear()
    rk.quantize_(model)
    assert isinstance(model[0], Int8Linear) and model[0].activation == "none" and type(model[1]) is nn.ReLU
    assert model[2].activation == "none" and type(model[3]) is nn.ReLU
    torch.testing.assert_close(model(x), expected, rtol=0.05, atol=0.05)
    assert calls == ["lin0:pre", "lin0:post", "lin0:always", "relu3"]
    plain = mlp()
    rk.quantize_(plain)  # without hooks the ReLUs are fused as before
    assert plain[0].activation == "relu" and type(plain[1]) is nn.Identity
    bare, calls = nn.Linear(4, 2), []  # a model that is one Linear: the converted one is returned
    tap(bare, calls, "bare")
    rk.quantize_(bare)(torch.randn(1, 4))
    assert calls == ["bare:pre", "bare:post", "bare:always"]


def test_graph_passes_keep_hooks():
    model, calls, x = mlp(), [], torch.randn(3, 16)
    tap(model[2], calls, "lin2")
    model[1].register_forward_hook(lambda m, args, out: calls.append("relu1"))
    gm = G.trace(model)
    G.linear_to_int8(gm)
    assert gm.get_submodule("0").activation == "none" and gm.get_submodule("2").activation == "none"
    assert gm.get_submodule("4").activation == "none"
    gm(x)
    assert calls == ["relu1", "lin2:pre", "lin2:post", "lin2:always"]

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 4, mode="sum")

        def forward(self, indices, offsets):
            return self.bag(indices, offsets)

    bag_model = Bags()
    bag_model.bag.register_forward_hook(lambda m, args, out: calls.append("bag"))
    gm = G.trace(bag_model)
    G.swap_embedding_bags(gm, bits=8)
    calls.clear()
    gm(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    assert calls == ["bag"]


def test_compress_passes_keep_hooks():
    calls = []
    model = Recommender(10, 12, dim=8, hidden=16).eval()
    model.history.register_forward_hook(lambda m, args, out: calls.append("history"))
    model.user_emb.register_forward_pre_hook(lambda m, args: calls.append("user"))
    C.prune_rows_(model, 0.3, by="norm")
    C.quantize_tables_(model, 8)
    model(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 1, 2]), torch.tensor([4, 5]))
    assert sorted(calls) == ["history", "user"]

    sparse = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        sparse[0].weight[:, 1:] = 0
    sparse[0].register_forward_hook(lambda m, args, out: calls.append("sparse"))
    assert C.sparsify_(sparse, min_sparsity=0.5) == ["0"]
    calls.clear()
    sparse(torch.randn(2, 8))
    assert calls == ["sparse"]
