"""Models built on the meta device (no memory, no values: how large embedding models are planned
and then materialised, as with TorchRec's meta-device tables): every module constructs under
`torch.device("meta")`, its forward gives the output shapes and dtypes there, and after
`to_empty(device="cpu")` + `load_state_dict` it computes what the module it was loaded from does."""
import pytest
import torch
from torch import nn

import recsys_kernels as rk
from recsys_kernels.models.recommender import Recommender


def _collection():
    return rk.FusedEmbeddingBagCollection([rk.TableConfig("f32", 100, 16), rk.TableConfig("q8", 60, 8, bits=8),
                                           rk.TableConfig("q4", 40, 32, bits=4, pooling="mean")])


def _features(device="cpu"):
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, rows in (("f32", 100), ("q8", 60), ("q4", 40)):
        idx = torch.randint(0, rows, (9,), generator=g)
        out[name] = (idx.to(device), torch.tensor([0, 2, 2, 9], device=device))
    return out


# (builder, inputs on a device, how to call it)
CASES = {
    "embedding_bag": (lambda: rk.FusedEmbeddingBag(100, 16, mode="sum"),
                      lambda d: (torch.randint(0, 100, (10,)).to(d), torch.tensor([0, 3, 7], device=d)), None),
    "embedding_bag_int4": (lambda: rk.FusedEmbeddingBag(100, 16, mode="max").quantize(4),
                           lambda d: (torch.randint(0, 100, (10,)).to(d), torch.tensor([0, 3, 7], device=d)), None),
    "collection": (_collection, lambda d: (_features(d),), None),
    "int8_linear": (lambda: rk.Int8Linear.from_float(nn.Linear(16, 8), activation="gelu"),
                    lambda d: (torch.randn(5, 16).to(d),), None),
    "retriever_int8": (lambda: rk.Retriever(torch.randn(50, 16), item_bias=torch.randn(50), bits=8),
                       lambda d: (torch.randn(3, 16).to(d),), lambda m, q: m.search(q, 7)),
    "recommender": (lambda: Recommender(20, 50, dim=8, hidden=16), lambda d: (
        torch.tensor([0, 3], device=d), torch.tensor([1, 2], device=d), torch.tensor([0, 1, 3], device=d),
        torch.tensor([4, 5, 6], device=d)), lambda m, *a: m.score(*a)),
}


def _run(module, call, inputs):
    with torch.no_grad():
        out = call(module, *inputs) if call is not None else module(*inputs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case", sorted(CASES))
def test_build_on_meta_then_load(case):
    build, inputs, call = CASES[case]
    with torch.device("meta"):
        on_meta = build()
    assert all(t.is_meta for t in on_meta.state_dict().values())
    torch.manual_seed(0)
    source = build()
    cpu_inputs = inputs("cpu")
    expected = _run(source, call, cpu_inputs)

    shapes = _run(on_meta, call, inputs("meta"))  # shape inference only
    assert [(t.shape, t.dtype, t.device.type) for t in shapes] == [(t.shape, t.dtype, "meta") for t in expected]

    loaded = on_meta.to_empty(device="cpu")
    loaded.load_state_dict(source.state_dict())
    for got, want in zip(_run(loaded, call, cpu_inputs), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [8, 4])
def test_float_checkpoint_assigned_into_a_quantized_module_on_meta(bits):
    """load_state_dict(float checkpoint, assign=True) into a quantized module built on the meta
    device quantizes the checkpoint where it is (it was moved to meta first: values lost, while the
    load reported every key matched), as for a float module there."""
    source = nn.EmbeddingBag(30, 8, mode="sum")
    expected = rk.FusedEmbeddingBag.from_embedding_bag(source).quantize(bits)
    on_meta = rk.FusedEmbeddingBag(30, 8, mode="sum", device="meta").quantize(bits)
    on_meta.load_state_dict(source.state_dict(), assign=True)
    assert on_meta.weight.device.type == "cpu" and torch.equal(on_meta.weight, expected.weight)
    tables = [rk.TableConfig("a", 30, 8), rk.TableConfig("b", 12, 4)]
    float_collection = rk.FusedEmbeddingBagCollection(tables)
    collection = rk.FusedEmbeddingBagCollection(tables, device="meta").quantize(bits)
    collection.load_state_dict(float_collection.state_dict(), assign=True)
    for name in ("a", "b"):
        assert torch.equal(collection.embedding_bags[name].weight,
                           rk.quantize_rowwise(float_collection.embedding_bags[name].weight.detach(), bits))
