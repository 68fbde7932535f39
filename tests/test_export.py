"""The ways a served model leaves Python: torch.export (then AOTInductor) and torch.jit.trace. A
quantized serving graph (int8 embedding bag -> Int8Linear -> int8 Retriever top-k) and the
multi-table collection are exported with dynamic sizes and rerun on inputs of other sizes; the
results must equal eager mode's bit for bit, and the graph must hold our ops (not a decomposition)."""
import warnings

import pytest
import torch
from torch import nn

import recsys_kernels as rk

OPS = torch.ops.recsys_kernels


class _Serving(nn.Module):
    """Pooled int8 history -> int8 MLP layer -> top 10 of an int8 catalog."""

    def __init__(self):
        super().__init__()
        self.history = rk.FusedEmbeddingBag.from_embedding_bag(nn.EmbeddingBag(1000, 64, mode="mean")).quantize(8)
        self.proj = rk.Int8Linear.from_float(nn.Linear(64, 32), activation="relu")
        self.catalog = rk.Retriever(torch.randn(500, 32), item_bias=torch.randn(500), bits=8)

    def forward(self, items, offsets):
        return self.catalog.search(self.proj(self.history(items, offsets)), 10)


def _bags(n_items, n_bags, seed):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 1000, (n_items,), generator=g)
    starts = torch.sort(torch.randint(0, n_items + 1, (n_bags - 1,), generator=g)).values
    return items, torch.cat([torch.zeros(1, dtype=torch.long), starts])  # nn.EmbeddingBag's [B] starts


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _called_ops(ep):
    return {n.target for n in ep.graph.nodes if n.op == "call_function"}


@pytest.fixture(scope="module")
def serving_export():
    model = _Serving().eval()
    with torch.no_grad():
        ep = torch.export.export(model, _bags(50, 4, 0),
                                 dynamic_shapes=({0: torch.export.Dim("nnz")}, {0: torch.export.Dim("bags")}))
    return model, ep


def test_export_serving_graph_with_dynamic_sizes(serving_export):
    model, ep = serving_export
    called = _called_ops(ep)
    for op in ("embedding_bag", "int8_linear_packed", "topk_scores"):
        if rk.get_backend() == "auto" and "cpu" in rk._backend.available_backends(op, "cpu"):
            assert getattr(OPS, op).default in called, sorted(map(str, called))
    with torch.no_grad():
        for n_items, n_bags, seed in ((50, 4, 1), (77, 9, 2), (3, 2, 3)):
            inputs = _bags(n_items, n_bags, seed)
            _assert_same(ep.module()(*inputs), model(*inputs))


def test_aoti_package_runs_the_exported_graph(serving_export, tmp_path):
    """AOTInductor: the exported graph compiled to a .pt2 package, loaded and run (our C++ ops
    called from the compiled code through torch's proxy executor)."""
    model, ep = serving_export
    if "cpu" not in rk._backend.available_backends("embedding_bag", "cpu"):
        pytest.skip("the C++ extension is not built")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "serving.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for n_items, n_bags, seed in ((50, 4, 1), (91, 13, 4)):
            inputs = _bags(n_items, n_bags, seed)
            _assert_same(runner(*inputs), model(*inputs))


def test_export_collection_with_feature_dict():
    tables = [rk.TableConfig("user", 100, 16), rk.TableConfig("item", 300, 32, pooling="max", bits=8),
              rk.TableConfig("tag", 50, 8, feature_names=["tag_a", "tag_b"], pooling="mean")]
    coll = rk.FusedEmbeddingBagCollection(tables).eval()
    g = torch.Generator().manual_seed(5)

    def features(n_bags, length):
        return {name: (torch.randint(0, rows, (n_bags * length,), generator=g), torch.arange(n_bags + 1) * length)
                for name, rows in (("user", 100), ("item", 300), ("tag_a", 50), ("tag_b", 50))}

    with torch.no_grad():
        ep = torch.export.export(coll, (features(3, 4),))
        if "cpu" in rk._backend.available_backends("embedding_bag_grouped", "cpu"):
            assert OPS.embedding_bag_grouped.default in _called_ops(ep)
        fresh = features(3, 4)
        assert torch.equal(ep.module()(fresh), coll(fresh))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated, still in use
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_of_the_modules():
    """A trace records what reaches the dispatcher: every module's result on fresh inputs must be
    eager mode's (Int8Linear's eager shortcut once recorded nothing here)."""
    model = _Serving().eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, _bags(50, 4, 0), check_trace=False)
        for n_items, n_bags, seed in ((50, 4, 1), (50, 4, 2)):  # a trace fixes the sizes
            inputs = _bags(n_items, n_bags, seed)
            _assert_same(traced(*inputs), model(*inputs))
