"""recsys_kernels.graph: fx passes preserve outputs (float passes to float rounding, dead-code
elimination bit for bit, int8 within int8 tolerance) and report what they replaced."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recsys_kernels import data as D
from recsys_kernels import graph as G
from recsys_kernels.models.recommender import Recommender
from recsys_kernels.nn import FusedEmbeddingBag, Int8Linear


@pytest.fixture(scope="module")
def rec():
    full = D.synthetic_interactions(60, 50, seed=1, interactions_per_user=8, min_per_user=3)
    torch.manual_seed(0)
    model = Recommender.for_data(full, dim=16, hidden=32).eval()
    users = torch.randint(0, 60, (37,))
    items = torch.randint(0, 50, (37,))
    hist = D.csr_rows(*full.user_history(), users)
    with torch.enable_grad():  # the plain-PyTorch formula, the one the trace records
        ref = model(users, items, *hist).detach()
    return model, (users, items, *hist), ref


def _grad_path(gm, args):
    with torch.enable_grad():
        return gm(*args).detach()


def test_trace_matches_model_exactly(rec):
    model, args, ref = rec
    gm = G.trace(model)
    assert torch.equal(_grad_path(gm, args), ref)
    counts = G.count_ops(gm)
    assert counts["EmbeddingBag"] == 1 and counts["Linear"] == 3 and counts["ReLU"] == 1


def test_dead_code_elimination_is_exact():
    class WithDeadCode(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 7)

        def forward(self, x):
            dead = self.unused(x).relu() * 2  # computed, never used
            del dead
            return self.used(x) + torch.sin(x).sum(-1, keepdim=True)

    torch.manual_seed(0)
    module = WithDeadCode()
    gm = G.trace(module)
    x = torch.randn(4, 5)
    before = gm(x)
    report = G.eliminate_dead_code(gm)
    assert set(report.removed) == {"unused", "relu", "mul"}
    assert not hasattr(gm, "unused")
    assert torch.equal(gm(x), before)
    assert "dead code" in str(report)


def test_recommender_has_no_dead_code(rec):
    model, args, ref = rec
    gm = G.trace(model)
    assert G.eliminate_dead_code(gm).removed == []
    assert torch.equal(_grad_path(gm, args), ref)


def test_embedding_bag_swap_float(rec):
    model, args, ref = rec
    gm = G.trace(copy.deepcopy(model))
    report = G.swap_embedding_bags(gm)
    assert report.changes == [("embedding_bag", "history", "nn.EmbeddingBag", "FusedEmbeddingBag")]
    assert type(gm.history) is FusedEmbeddingBag
    torch.testing.assert_close(_grad_path(gm, args), ref, rtol=1e-5, atol=1e-6)
    assert type(model.history) is nn.EmbeddingBag  # the model is not modified


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.2)])
def test_embedding_bag_swap_quantized(rec, bits, tol):
    model, args, ref = rec
    gm = G.trace(copy.deepcopy(model))
    G.swap_embedding_bags(gm, bits=bits)
    assert gm.history.bits == bits
    assert model.history.weight.dtype == torch.float32
    err = (_grad_path(gm, args) - ref).abs().max()
    assert float(err) < tol * float(ref.abs().max()) + 1e-3


def test_linear_relu_to_int8(rec):
    model, args, ref = rec
    gm, report = G.optimize_graph(model, embedding_bags=False)
    kinds = {(c[1], c[3]) for c in report.changes}
    assert ("mlp.0", "Int8Linear(activation='relu')") in kinds
    assert ("mlp.2", "Int8Linear(activation='none')") in kinds
    counts = G.count_ops(gm)
    assert counts.get("ReLU", 0) == 0 and counts["Int8Linear"] == 3 and "Linear" not in counts
    # int8 tolerance: the fp32 graph with the int8 layers' dequantized weights and per-row
    # int8 activations is what Int8Linear computes; compare to the float model loosely
    out = _grad_path(gm, args)
    scale = float(ref.abs().max())
    assert float((out - ref).abs().max()) < 0.05 * scale + 1e-3


@pytest.mark.parametrize("act_cls,fn,name", [
    (None, F.relu, "relu"), (None, torch.relu, "relu"), (None, F.silu, "silu"), (None, F.gelu, "gelu"),
    (nn.GELU, None, "gelu"), (nn.SiLU, None, "silu")])
def test_activation_fusion_forms(act_cls, fn, name):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)
            self.act = act_cls() if act_cls else None

        def forward(self, x):
            y = self.fc(x)
            return self.act(y) if self.act is not None else fn(y)

    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(5, 16)
    ref = block(x)
    gm = G.trace(block)
    report = G.linear_to_int8(gm)
    assert report.changes[0][3] == f"Int8Linear(activation={name!r})"
    assert len(list(gm.graph.nodes)) == 3  # placeholder, Int8Linear, output
    expect = Int8Linear.from_float(block.fc, activation=name)(x)
    torch.testing.assert_close(gm(x), expect, rtol=1e-5, atol=1e-5)
    assert float((gm(x) - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-3


def test_linear_with_two_users_is_not_fused():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return F.relu(y) + y

    gm = G.trace(Branch())
    report = G.linear_to_int8(gm)
    assert report.changes[0][3] == "Int8Linear(activation='none')"
    assert any(n.target is F.relu for n in gm.graph.nodes)


def test_linear_to_conv1x1_equal(rec):
    model, args, ref = rec
    gm, report = G.optimize_graph(model, embedding_bags=False, int8=False, conv1x1=True)
    assert [c[1] for c in report.changes] == ["mlp.0", "mlp.2", "feat_proj"]
    assert isinstance(gm.get_submodule("mlp.0"), G.Conv1x1)
    torch.testing.assert_close(_grad_path(gm, args), ref, rtol=1e-5, atol=1e-6)
    lin = nn.Linear(6, 3)
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(G.Conv1x1(lin)(x), lin(x), rtol=1e-5, atol=1e-6)


def test_graph_of_compressed_modules_traces(rec):
    """Leaves: this package's modules are not traced through."""
    from recsys_kernels.compress import quantize_tables_

    model, args, ref = rec
    q = copy.deepcopy(model)
    quantize_tables_(q, 8)
    gm = G.trace(q)
    with torch.enable_grad():
        expect = q(*args).detach()
    assert torch.equal(_grad_path(gm, args), expect)
    counts = G.count_ops(gm)
    assert counts["RemappedEmbedding"] == 2 and counts["RemappedEmbeddingBag"] == 1


def test_trace_rejects_non_modules():
    with pytest.raises(TypeError):
        G.trace(lambda x: x)


def test_linear_called_twice_is_not_fused():
    """A Linear called at two places (shared weights), one of them followed by a ReLU: fusing
    the ReLU into the shared module would apply it at the other place too (it did: the other
    branch lost its negative values)."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x, y):
            return F.relu(self.fc(x)) + self.fc(y)

    torch.manual_seed(0)
    model = Shared().eval()
    gm = G.trace(model)
    report = G.linear_to_int8(gm)
    assert [c[3] for c in report.changes] == ["Int8Linear(activation='none')"]
    assert any(n.target is F.relu for n in gm.graph.nodes)
    x, y = torch.randn(4, 16), torch.randn(4, 16) * 10
    fc = Int8Linear.from_float(model.fc)
    with torch.no_grad():
        assert torch.equal(gm(x, y), F.relu(fc(x)) + fc(y))


def test_fusion_report_names_the_activation():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.a(x)) + F.silu(self.b(x)) + self.c(x).relu()

    report = G.linear_to_int8(G.trace(Block()))
    assert [c[2] for c in report.changes] == ["nn.Linear + torch.relu", "nn.Linear + F.silu",
                                              "nn.Linear + Tensor.relu"]


def test_dead_code_keeps_what_changes_state():
    """In-place ops and buffer updates whose results nothing reads are not dead: removing them
    changed the output (h.relu_() as a statement) or left a buffer stale."""
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out, self.act = nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU(inplace=True)
            self.register_buffer("last", torch.zeros(4))

        def forward(self, x):
            self.last.copy_(x[0])
            h = self.fc(x)
            h.relu_()
            g = self.fc(x)
            self.act(g)
            torch.sigmoid_(g)
            return self.out(h) + self.out(g)

    torch.manual_seed(0)
    model = InPlace().eval()
    x = torch.randn(3, 4)
    expected = model(x)
    gm = G.trace(model)
    assert G.eliminate_dead_code(gm).removed == []
    gm.last.zero_()
    assert torch.equal(gm(x), expected) and torch.equal(gm.last, x[0])


def test_layers_read_directly_are_left_alone():
    """A Linear (or, quantizing, an EmbeddingBag) whose weight the forward also reads (tied
    weights) stays as it is, listed in report.skipped: converting it crashed the graph lint (Int8Linear
    has no .weight) or handed the reader the packed uint8 table."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
            self.bag = nn.EmbeddingBag(10, 6, mode="sum")

        def forward(self, x, idx, off):
            h = self.fc(x) + self.bag(idx, off) @ self.bag.weight[:6].t()
            return self.head(h) + self.fc.weight.sum()

    torch.manual_seed(0)
    model = Tied().eval()
    args = (torch.randn(2, 6), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2]))
    for kwargs in ({"embedding_bits": 8}, {"int8": False, "conv1x1": True}):
        gm, report = G.optimize_graph(model, **kwargs)
        skipped = {node for _, node, _ in report.skipped}
        assert "fc" in skipped and type(gm.fc) is nn.Linear
        assert ("bag" in skipped) == ("embedding_bits" in kwargs) and "head" not in skipped
        torch.testing.assert_close(gm(*args), model(*args), rtol=0.05, atol=0.05)
        assert "left alone" in str(report)


def test_bags_with_options_fused_refuses_are_left_alone():
    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.scaled = nn.EmbeddingBag(10, 4, mode="sum", scale_grad_by_freq=True)
            self.normed = nn.EmbeddingBag(10, 4, mode="sum", max_norm=1.0)
            self.plain = nn.EmbeddingBag(10, 4, mode="sum")

        def forward(self, idx, off):
            return self.scaled(idx, off) + self.normed(idx, off) + self.plain(idx, off)

    gm, report = G.optimize_graph(Bags(), embedding_bits=8)
    assert [(node, "max_norm" in why or "scale_grad_by_freq" in why) for _, node, why in report.skipped] == \
        [("scaled", True), ("normed", True)]
    assert type(gm.scaled) is nn.EmbeddingBag and isinstance(gm.plain, FusedEmbeddingBag)


def test_replacements_take_the_replaced_modules_calls():
    """Keyword calls by nn.Linear's argument name, empty batches, frozen parameters."""
    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(input=x)

    torch.manual_seed(0)
    model = ByKeyword().eval().requires_grad_(False)
    for kwargs in ({}, {"int8": False, "conv1x1": True}):
        gm, _ = G.optimize_graph(model, **kwargs)
        x = torch.randn(5, 4)
        torch.testing.assert_close(gm(x), model(x), rtol=0.05, atol=0.05)
        assert gm(torch.randn(0, 4)).shape == (0, 3) and gm(torch.randn(2, 0, 4)).shape == (2, 0, 3)
        assert not any(p.requires_grad for p in gm.parameters())
