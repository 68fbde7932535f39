"""FusedEmbeddingBag as a drop-in for nn.EmbeddingBag, its quantized form, and the collection."""
import copy

import pytest
import torch
import torch.nn as nn

from recsys_kernels.nn.embedding import FusedEmbeddingBag, FusedEmbeddingBagCollection, TableConfig
from recsys_kernels.ops.embedding import embedding_bag, prepare_lookup
from recsys_kernels.ops.rowwise import dequantize_rowwise, quantize_rowwise


def pair(mode="mean", padding_idx=None, include_last_offset=False, sparse=False, n=12, d=5, dtype=None):
    """An nn.EmbeddingBag and a FusedEmbeddingBag with identical weights (loaded via state_dict)."""
    ref = nn.EmbeddingBag(n, d, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset,
                          sparse=sparse, dtype=dtype)
    fused = FusedEmbeddingBag(n, d, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset,
                              sparse=sparse, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def bag_starts(n_bags, n_rows=12, max_len=4):
    lengths = torch.randint(0, max_len + 1, (n_bags,))
    lengths[0] = 0  # an empty bag
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return torch.randint(0, n_rows, (int(lengths.sum()),)), starts


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 0, -2])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_calling_conventions_match_embedding_bag(mode, padding_idx, index_dtype):
    for include_last_offset in (False, True):
        ref, fused = pair(mode, padding_idx, include_last_offset)
        assert fused.padding_idx == ref.padding_idx
        indices, starts = bag_starts(5)
        indices[:2] = 0
        indices, starts = indices.to(index_dtype), starts.to(index_dtype)
        offsets = torch.cat([starts, starts.new_full((1,), indices.numel())]) if include_last_offset else starts
        torch.testing.assert_close(fused(indices, offsets), ref(indices, offsets))
        if mode == "sum":
            psw = torch.rand(indices.numel())
            torch.testing.assert_close(fused(indices, offsets, psw), ref(indices, offsets, psw))
        # 2-D input [B, L]: fixed-length bags, no offsets (include_last_offset does not apply)
        idx2 = torch.randint(0, 12, (4, 3), dtype=index_dtype)
        torch.testing.assert_close(fused(idx2), ref(idx2))
        if mode == "sum":
            psw2 = torch.rand(4, 3)
            torch.testing.assert_close(fused(idx2, per_sample_weights=psw2), ref(idx2, per_sample_weights=psw2))


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_direct_call_equals_the_front_door(monkeypatch, include_last_offset, bits):
    """Serving-style calls go from the front door straight to the C++ op, without the argument
    checks and normal form (ops/embedding.py `_direct_op`): the same outputs, gradients and errors as
    through them (forced here by passing lengths instead of offsets), from the module too."""
    import recsys_kernels.ops.embedding as ops_code
    from recsys_kernels import _backend
    if "cpu" not in _backend.available_backends("embedding_bag", "cpu"):
        pytest.skip("no C++ extension")
    checked = []
    monkeypatch.setattr(ops_code, "prepare_lookup", lambda *a: checked.append(1) or prepare_lookup(*a))
    for mode, padding_idx, bounds, index_dtype in [("sum", None, "raise", torch.int64),
                                                   ("mean", 3, "zero", torch.int32),
                                                   ("max", None, "clamp", torch.int64)]:
        fused = FusedEmbeddingBag(12, 16, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset,
                                  bounds=bounds)
        if bits is not None:
            fused.quantize(bits)
        indices, starts = bag_starts(6)
        indices, starts = indices.to(index_dtype), starts.to(index_dtype)
        csr = torch.cat([starts, starts.new_full((1,), indices.numel())])
        offsets = csr if include_last_offset else starts

        def checked_call(idx=indices):  # through prepare_lookup and _common.call
            n = len(checked)
            out = embedding_bag(fused.weight, idx, lengths=csr.diff(), mode=mode, padding_idx=padding_idx,
                                bounds=bounds, bits=bits or 8)
            assert len(checked) == n + 1
            return out

        def direct_calls(idx=indices):  # the module, and the function as the module calls it
            n = len(checked)
            outs = (fused(idx, offsets), embedding_bag(fused.weight, idx, csr, mode=mode, padding_idx=padding_idx,
                                                       bounds=bounds, bits=bits or 8))
            assert len(checked) == n
            return outs

        with torch.no_grad():
            for out in direct_calls():
                assert torch.equal(out, checked_call())
        if bits is None:  # with a gradient to record: through the op's autograd kernel
            expected = checked_call()
            (expected_grad,) = torch.autograd.grad(expected.sum(), fused.weight)
            for out in direct_calls():
                assert out.grad_fn is not None and torch.equal(out.detach(), expected.detach())
                assert torch.equal(torch.autograd.grad(out.sum(), fused.weight)[0], expected_grad)
        if bounds == "raise":
            bad = indices.clone()
            bad[-1] = 12
            with pytest.raises(IndexError) as expected_error, torch.no_grad():
                checked_call(bad)
            for call in (lambda: fused(bad, offsets),
                         lambda: embedding_bag(fused.weight, bad, csr, mode=mode, bits=bits or 8)):
                with pytest.raises(IndexError) as error, torch.no_grad():
                    call()
                assert str(error.value) == str(expected_error.value)


def test_default_mode_and_attributes():
    fused, ref = FusedEmbeddingBag(7, 3, padding_idx=-1), nn.EmbeddingBag(7, 3, padding_idx=-1)
    assert fused.mode == ref.mode == "mean"
    assert fused.padding_idx == ref.padding_idx == 6
    assert torch.equal(fused.weight[6], torch.zeros(3))  # the padding row starts at zero, as in torch
    assert [n for n, _ in fused.named_parameters()] == ["weight"]
    assert "mode='mean'" in repr(fused)


def test_bad_module_input():
    with pytest.raises(NotImplementedError, match="max_norm"):
        FusedEmbeddingBag(4, 2, max_norm=1.0)
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        FusedEmbeddingBag(4, 2, scale_grad_by_freq=True)
    with pytest.raises(ValueError, match="mode"):
        FusedEmbeddingBag(4, 2, mode="median")
    with pytest.raises(ValueError, match="padding_idx"):
        FusedEmbeddingBag(4, 2, padding_idx=4)
    with pytest.raises(ValueError, match="_weight"):
        FusedEmbeddingBag(4, 2, _weight=torch.randn(4, 3))
    m = FusedEmbeddingBag(4, 2)
    with pytest.raises(ValueError, match="offsets"):
        m(torch.tensor([[0, 1]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="offsets"):
        m(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="per_sample_weights"):
        m(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(3))
    with pytest.raises(IndexError, match="index 4"):
        m(torch.tensor([0, 4]), torch.tensor([0]))
    # a bag start past the end is named as the user wrote it, not by the offsets[B] the module appends
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match=r"end at the number of indices 2, got offsets\[1\]=5$"):
            FusedEmbeddingBag(4, 2, backend=backend)(torch.tensor([0, 1]), torch.tensor([0, 5]))
    # include_last_offset=True: the last offset must be the number of indices
    with pytest.raises(ValueError, match="offsets"):
        FusedEmbeddingBag(4, 2, include_last_offset=True)(torch.tensor([0, 1, 2]), torch.tensor([0, 2]))


def test_bounds_and_backend_arguments():
    m = FusedEmbeddingBag(4, 2, mode="sum", bounds="zero", backend="reference")
    out = m(torch.tensor([1, 9]), torch.tensor([0]))
    torch.testing.assert_close(out, m.weight[1:2].detach())
    with pytest.raises(ValueError, match="bounds"):  # at construction, as a bad mode
        FusedEmbeddingBag(4, 2, bounds="wrap")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        FusedEmbeddingBag(4, 2, backend="nope")


def test_integer_scalar_padding_idx():
    """padding_idx may be a numpy integer, as nn.EmbeddingBag takes it (stored as an int); not a bool."""
    import numpy as np

    ref = nn.EmbeddingBag(10, 4, mode="sum", padding_idx=np.int64(3))
    fused = FusedEmbeddingBag.from_embedding_bag(ref)
    assert type(fused.padding_idx) is int and fused.padding_idx == 3
    idx, off = torch.tensor([3, 1, 3, 7]), torch.tensor([0, 2])
    torch.testing.assert_close(fused(idx, off), ref(idx, off))
    w = torch.randn(10, 4)
    torch.testing.assert_close(embedding_bag(w, idx, torch.tensor([0, 2, 4]), padding_idx=np.int32(-7)),
                               embedding_bag(w, idx, torch.tensor([0, 2, 4]), padding_idx=3))
    with pytest.raises(TypeError, match="padding_idx must be an int"):
        FusedEmbeddingBag(10, 4, padding_idx=True)


def test_from_embedding_bag_shares_the_parameter():
    ref = nn.EmbeddingBag(9, 4, mode="sum", padding_idx=2, include_last_offset=True)
    fused = FusedEmbeddingBag.from_embedding_bag(ref)
    assert fused.weight is ref.weight
    assert (fused.mode, fused.padding_idx, fused.include_last_offset) == ("sum", 2, True)
    idx, off = torch.tensor([0, 2, 5, 8]), torch.tensor([0, 1, 4])
    torch.testing.assert_close(fused(idx, off), ref(idx, off))
    with pytest.raises(NotImplementedError, match="max_norm"):
        FusedEmbeddingBag.from_embedding_bag(nn.EmbeddingBag(3, 2, max_norm=1.0))
    with pytest.raises(TypeError):
        FusedEmbeddingBag.from_embedding_bag(nn.Linear(2, 2))


def test_from_pretrained():
    table = torch.randn(6, 3)
    fused = FusedEmbeddingBag.from_pretrained(table, mode="max")
    ref = nn.EmbeddingBag.from_pretrained(table, mode="max")
    assert not fused.weight.requires_grad
    idx, off = torch.tensor([1, 4, 5]), torch.tensor([0, 2])
    torch.testing.assert_close(fused(idx, off), ref(idx, off))
    assert FusedEmbeddingBag.from_pretrained(table, freeze=False).weight.requires_grad


def test_state_dict_round_trips():
    ref, fused = pair("sum", padding_idx=1, dtype=torch.float64)
    assert list(fused.state_dict()) == list(ref.state_dict()) == ["weight"]
    with torch.no_grad():
        fused.weight.mul_(3)
    back = nn.EmbeddingBag(12, 5, mode="sum", padding_idx=1, dtype=torch.float64)
    back.load_state_dict(fused.state_dict())
    assert torch.equal(back.weight, fused.weight)
    # and through torch.save / load
    import io
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    again = FusedEmbeddingBag(12, 5, mode="sum", padding_idx=1, dtype=torch.float64)
    again.load_state_dict(torch.load(buf))
    assert torch.equal(again.weight, fused.weight)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_quantize_matches_dequantized_reference(bits, mode):
    ref, fused = pair(mode, padding_idx=3, n=10, d=6)
    fused.quantize(bits)
    assert fused.bits == bits and fused.weight.dtype == torch.uint8 and not fused.weight.requires_grad
    assert list(fused.state_dict()) == ["weight"] and [n for n, _ in fused.named_parameters()] == []
    assert torch.equal(fused.weight, quantize_rowwise(ref.weight.detach(), bits))
    idx, starts = bag_starts(6, n_rows=10)
    expected = nn.EmbeddingBag.from_pretrained(dequantize_rowwise(fused.weight, bits), mode=mode, padding_idx=3)
    out = fused(idx, starts)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected(idx, starts), rtol=1e-5, atol=1e-5)
    # close to the float module too (quantization error only)
    torch.testing.assert_close(out, ref(idx, starts), rtol=0, atol=0.6 if bits == 4 else 0.04)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_state_dict(bits):
    src = FusedEmbeddingBag(10, 6, mode="sum")
    float_sd = copy.deepcopy(src.state_dict())
    src.quantize(bits)
    dst = FusedEmbeddingBag(10, 6, mode="sum").quantize(bits)
    dst.load_state_dict(src.state_dict())  # quantized -> quantized
    assert torch.equal(dst.weight, src.weight)
    other = FusedEmbeddingBag(10, 6, mode="sum").quantize(bits)
    other.load_state_dict(float_sd)  # float checkpoint -> quantized module: quantized on load
    assert torch.equal(other.weight, src.weight)
    with pytest.raises(RuntimeError, match=rf"quantize\({bits}\)"):
        FusedEmbeddingBag(10, 6).load_state_dict(src.state_dict())  # no silent uint8 -> float copy
    with pytest.raises(RuntimeError, match="already quantized"):
        src.quantize(bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_float64_tables_quantize_through_float32(bits):
    # the quantizer (like torch's prepack ops) takes no float64: the module rounds to float32 first
    table = torch.randn(10, 6, dtype=torch.float64)
    expected = quantize_rowwise(table.float(), bits)
    fused = FusedEmbeddingBag(10, 6, dtype=torch.float64, _weight=table.clone()).quantize(bits)
    assert torch.equal(fused.weight, expected)
    loaded = FusedEmbeddingBag(10, 6).quantize(bits)
    loaded.load_state_dict({"weight": table})  # a float64 checkpoint into a quantized module
    assert torch.equal(loaded.weight, expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_from_packed_torch_prepack(bits):
    table = torch.randn(15, 8)
    prepack = torch.ops.quantized.embedding_bag_byte_prepack if bits == 8 else \
        torch.ops.quantized.embedding_bag_4bit_prepack
    packed = prepack(table)
    fused = FusedEmbeddingBag.from_packed(packed, bits, mode="sum", include_last_offset=True)
    assert (fused.num_embeddings, fused.embedding_dim, fused.bits) == (15, 8, bits)
    idx, off = torch.tensor([0, 14, 3, 3]), torch.tensor([0, 1, 1, 4])
    expected = embedding_bag(dequantize_rowwise(packed, bits), idx, off)
    torch.testing.assert_close(fused(idx, off), expected, rtol=1e-5, atol=1e-5)
    if bits == 8:  # and torch's own quantized op on the same bytes
        theirs = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(packed, idx, off, mode=0,
                                                                         include_last_offset=True)
        torch.testing.assert_close(fused(idx, off), theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed"):
        FusedEmbeddingBag.from_packed(torch.zeros(3, 4, dtype=torch.uint8), 8)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_sgd_training_matches_embedding_bag(mode, padding_idx):
    ref, fused = pair(mode, padding_idx, dtype=torch.float64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (ref, fused)]
    for _ in range(3):
        idx, starts = bag_starts(6)
        target = torch.randn(6, 5, dtype=torch.float64)
        for m, opt in zip((ref, fused), opts):
            opt.zero_grad()
            ((m(idx, starts) - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(fused.weight, ref.weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_sparse_adam_training_matches_embedding_bag(mode, padding_idx):
    ref, fused = pair(mode, padding_idx, sparse=True, dtype=torch.float64)
    opts = [torch.optim.SparseAdam(list(m.parameters()), lr=0.1) for m in (ref, fused)]
    for _ in range(3):
        idx, starts = bag_starts(6)
        idx[:3] = 2  # repeats, and the padding row
        psw = torch.rand(idx.numel(), dtype=torch.float64) if mode == "sum" else None
        target = torch.randn(6, 5, dtype=torch.float64)
        for m, opt in zip((ref, fused), opts):
            opt.zero_grad()
            ((m(idx, starts, psw) - target) ** 2).sum().backward()
            assert m.weight.grad.is_sparse
            opt.step()
    torch.testing.assert_close(fused.weight, ref.weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sparse_adam_skips_out_of_range_rows_under_bounds_zero(mode):
    """bounds="zero": an out-of-range index reads nothing, so SparseAdam must not touch any row for
    it (a zero gradient row still counts as touched: the row would move by its momentum). Against
    nn.EmbeddingBag given only the in-range indices (mean divides by the in-range count)."""
    ref, fused = pair(mode, sparse=True, dtype=torch.float64)
    fused.bounds = "zero"
    opts = [torch.optim.SparseAdam(list(m.parameters()), lr=0.1) for m in (ref, fused)]
    for step in range(4):
        idx, starts = bag_starts(6)
        if step > 0:  # the first step gives rows 0 and 11 (where clamping would land) momentum
            idx[::2] = torch.tensor([-1, 12, 40])[torch.arange(idx[::2].numel()) % 3]
        else:
            idx[:2] = torch.tensor([0, 11])
        keep = (idx >= 0) & (idx < 12)
        bag_of = torch.bucketize(torch.arange(idx.numel()), starts, right=True) - 1
        ref_starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(bag_of[keep], minlength=6).cumsum(0)[:-1]])
        target = torch.randn(6, 5, dtype=torch.float64)
        for m, opt, args in ((ref, opts[0], (idx[keep], ref_starts)), (fused, opts[1], (idx, starts))):
            opt.zero_grad()
            ((m(*args) - target) ** 2).sum().backward()
            opt.step()
        torch.testing.assert_close(fused.weight, ref.weight, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- collection
TABLES = [TableConfig("users", 10, 4, ["user_id", "user_prev"], pooling="sum"),
          TableConfig("items", 7, 3, ["item_id"], pooling="mean"),
          TableConfig("cats", 5, 2, pooling="max")]


def features(batch=4):
    out = {}
    for t in TABLES:
        for f in t.feature_names:
            lengths = torch.randint(0, 4, (batch,))
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            out[f] = (torch.randint(0, t.num_embeddings, (int(offsets[-1]),)), offsets)
    return out


def expected(ebc, feats):
    cols = []
    for t in TABLES:
        bag = ebc.embedding_bags[t.name]
        table = bag.weight if bag.bits is None else dequantize_rowwise(bag.weight, bag.bits)
        for f in t.feature_names:
            cols.append(embedding_bag(table, *feats[f], mode=t.pooling))
    return cols


def test_collection_forward_and_dict():
    ebc = FusedEmbeddingBagCollection(TABLES)
    assert ebc.feature_names == ["user_id", "user_prev", "item_id", "cats"]
    assert list(ebc.state_dict()) == ["embedding_bags.users.weight", "embedding_bags.items.weight",
                                      "embedding_bags.cats.weight"]
    feats = features()
    feats["unused"] = (torch.tensor([0]), torch.tensor([0, 1]))  # features of no table are ignored
    out = ebc(feats)
    assert out.shape == (4, 4 + 4 + 3 + 2)
    torch.testing.assert_close(out, torch.cat(expected(ebc, feats), 1))
    as_dict = ebc(feats, return_dict=True)
    assert list(as_dict) == ebc.feature_names
    for got, exp in zip(as_dict.values(), expected(ebc, feats)):
        torch.testing.assert_close(got, exp)
    out.sum().backward()
    assert ebc.embedding_bags["users"].weight.grad is not None


def test_collection_lengths_and_weights_dicts():
    ebc = FusedEmbeddingBagCollection(TABLES)
    feats = features(batch=3)
    jagged = {}
    for f, (idx, off) in feats.items():
        jagged[f] = {"values": idx, "lengths": off[1:] - off[:-1]}
    jagged["user_id"]["weights"] = w = torch.rand(feats["user_id"][0].numel())
    got = ebc(jagged, return_dict=True)
    torch.testing.assert_close(got["user_id"], embedding_bag(ebc.embedding_bags["users"].weight,
                                                             *feats["user_id"], per_sample_weights=w))
    torch.testing.assert_close(got["item_id"], ebc(feats, return_dict=True)["item_id"])
    torch.testing.assert_close(ebc({f: (*v, None) for f, v in feats.items()}), ebc(feats))


def test_collection_quantize():
    ebc = FusedEmbeddingBagCollection(TABLES + [TableConfig("q", 6, 4, ["q_id"], bits=4)])
    assert ebc.embedding_bags["q"].bits == 4
    ebc.quantize(8)
    assert [t.bits for t in ebc.tables] == [8, 8, 8, 4]
    feats = features()
    feats["q_id"] = (torch.tensor([5, 0, 1]), torch.tensor([0, 0, 1, 2, 3]))
    cols = expected(ebc, feats) + [embedding_bag(dequantize_rowwise(ebc.embedding_bags["q"].weight, 4),
                                                 *feats["q_id"])]
    out = ebc(feats)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.cat(cols, 1), rtol=1e-5, atol=1e-5)


def test_collection_bad_input():
    with pytest.raises(ValueError, match="duplicate feature"):
        FusedEmbeddingBagCollection([TableConfig("a", 3, 2, ["f"]), TableConfig("b", 3, 2, ["f"])])
    with pytest.raises(ValueError, match="duplicate table"):
        FusedEmbeddingBagCollection([TableConfig("a", 3, 2, ["f"]), TableConfig("a", 3, 2, ["g"])])
    with pytest.raises(ValueError, match="empty"):
        FusedEmbeddingBagCollection([])
    with pytest.raises(ValueError, match="a.b"):
        FusedEmbeddingBagCollection([TableConfig("a.b", 3, 2)])
    ebc = FusedEmbeddingBagCollection(TABLES)
    feats = features()
    with pytest.raises(KeyError, match="item_id"):
        ebc({k: v for k, v in feats.items() if k != "item_id"})
    feats["cats"] = (torch.tensor([0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch size"):
        ebc(feats)
    with pytest.raises(TypeError, match="user_id"):
        ebc({**features(), "user_id": torch.tensor([1])})
    with pytest.raises(ValueError, match="offsets"):
        ebc({**features(), "user_id": {"values": torch.tensor([1])}})


def _count_calls(monkeypatch):
    """Counts of the grouped op and of embedding_bag called by the collection."""
    import recsys_kernels.nn.embedding as module
    calls = {"grouped": 0, "single": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(module, "embedding_bag_grouped", counted("grouped", module.embedding_bag_grouped))
    monkeypatch.setattr(module, "embedding_bag", counted("single", module.embedding_bag))
    return calls


@pytest.mark.parametrize("quantized", [False, True])
def test_collection_is_one_grouped_call(monkeypatch, quantized):
    ebc = FusedEmbeddingBagCollection(TABLES + [TableConfig("q", 6, 4, ["q_id"], bits=4)], dtype=torch.bfloat16)
    if quantized:
        ebc.quantize(8)
    feats = features()
    feats["q_id"] = (torch.tensor([5, 0, 1]), torch.tensor([0, 0, 1, 2, 3]))
    want = torch.cat(expected(ebc, feats) + [embedding_bag(dequantize_rowwise(ebc.embedding_bags["q"].weight, 4),
                                                               *feats["q_id"])], 1)
    calls = _count_calls(monkeypatch)
    out = ebc(feats)
    as_dict = ebc(feats, return_dict=True)
    assert calls == {"grouped": 2, "single": 0}
    # bf16 + quantized (fp32) tables: fp32 out; every lookup accumulated in fp32 and rounded once
    assert out.dtype == torch.float32 and out.shape == (4, 4 + 4 + 3 + 2 + 4)
    torch.testing.assert_close(out, want.float(), rtol=1e-2, atol=1e-2)
    assert list(as_dict) == ebc.feature_names
    torch.testing.assert_close(torch.cat(list(as_dict.values()), 1), out)


def test_collection_fp64_tables_keep_the_loop(monkeypatch):
    ebc = FusedEmbeddingBagCollection(TABLES, dtype=torch.float64)
    feats = features()
    calls = _count_calls(monkeypatch)
    out = ebc(feats)
    assert calls == {"grouped": 0, "single": 4} and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat(expected(ebc, feats), 1))
    # a float64 table among float32 ones: the others still go through one grouped call
    ebc.embedding_bags["items"].weight.data = ebc.embedding_bags["items"].weight.data.double()
    for name in ("users", "cats"):
        ebc.embedding_bags[name].weight.data = ebc.embedding_bags[name].weight.data.float()
    calls.update(grouped=0, single=0)
    out = ebc(feats)
    assert calls == {"grouped": 1, "single": 1} and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat(expected(ebc, feats), 1).double())


def test_collection_grads_through_the_grouped_op():
    ebc = FusedEmbeddingBagCollection(TABLES)
    feats = features()
    weights = [ebc.embedding_bags[t.name].weight for t in TABLES]
    g_out = torch.randn(4, 13)
    grads = torch.autograd.grad(ebc(feats), weights, g_out)
    expected_grads = torch.autograd.grad(torch.cat(expected(ebc, feats), 1), weights, g_out)
    for g, e in zip(grads, expected_grads):  # "users" serves two features: the sum of both
        torch.testing.assert_close(g, e)


def test_collection_explicit_backend_without_a_grouped_kernel_loops(monkeypatch):
    from recsys_kernels import _backend
    ebc = FusedEmbeddingBagCollection(TABLES, backend="reference")
    monkeypatch.setattr(_backend, "available_backends", lambda op, device: [])  # as if no grouped kernel
    calls = _count_calls(monkeypatch)
    feats = features()
    torch.testing.assert_close(ebc(feats), torch.cat(expected(ebc, feats), 1))
    assert calls == {"grouped": 0, "single": 4}


def test_sparse_grad_keeps_the_coalesced_flag():
    """Our sparse gradient is coalesced; torch's AccumulateGrad drops the flag from the .grad it
    keeps, and the module's hook puts it back (so SparseAdam / Adagrad need not coalesce again),
    but only where the rows are strictly increasing: torch's one row per index through the shared
    Parameter, alone or summed into ours, stays uncoalesced."""
    ref, fused = pair("sum", sparse=True, dtype=torch.float64)
    fused.weight = ref.weight  # one Parameter, as from_embedding_bag makes it
    idx, starts = torch.tensor([3, 1, 3, 7, 1, 0]), torch.tensor([0, 2, 5])
    fused(idx, starts).sum().backward()
    grad = fused.weight.grad
    assert grad.is_sparse and grad.is_coalesced()
    assert grad._indices()[0].tolist() == [0, 1, 3, 7]
    once = grad.to_dense()
    torch.testing.assert_close(once, torch.zeros(12, 5, dtype=torch.float64).index_add_(
        0, idx, torch.ones(6, 5, dtype=torch.float64)))
    ref(idx, starts).sum().backward()  # torch's gradient summed in: its row per index, repeats
    assert not fused.weight.grad.is_coalesced()
    torch.testing.assert_close(fused.weight.grad.to_dense(), 2 * once)
    fused.weight.grad = None
    ref(idx, starts).sum().backward()  # torch's alone
    assert not fused.weight.grad.is_coalesced()
    torch.testing.assert_close(fused.weight.grad.to_dense(), once)
    fused.weight.grad = None
    fused(torch.tensor([5]), torch.tensor([0])).sum().backward()  # one row is coalesced as it is
    assert fused.weight.grad.is_coalesced()
    assert len(fused.weight._post_accumulate_grad_hooks) == 1  # registered once, not per call


def test_collection_sparse_table_keeps_the_coalesced_flag():
    ebc = FusedEmbeddingBagCollection(TABLES)
    ebc.embedding_bags["items"].sparse = True
    ebc(features()).sum().backward()
    grad = ebc.embedding_bags["items"].weight.grad
    assert grad.is_sparse and grad.is_coalesced()
    assert not ebc.embedding_bags["users"].weight.grad.is_sparse
