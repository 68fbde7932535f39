"""recsys_kernels.compress: pruning amounts, structured pruning == masked model, 2:4 pattern,
row-pruned embeddings == the reference lookup on kept ids, SparseLinear, whole-model
quantization and optimize()'s measured report."""
import copy
import math
import struct
import zlib

import pytest
import torch
from torch import nn

import recsys_kernels as rk
from recsys_kernels import compress as C
from recsys_kernels import data as D
from recsys_kernels import graph as G
from recsys_kernels.compress import pipeline as P
from recsys_kernels.models.recommender import Recommender, train_model
from recsys_kernels.nn import FusedEmbeddingBag, Int8Linear


def _mlp(seed=0, dims=(24, 40, 16), act=nn.ReLU):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_magnitude_layer_amount_exact(amount):
    model = _mlp()
    report = C.magnitude_prune_(model, amount, scope="layer")
    for layer in (model[0], model[2]):
        assert int((layer.weight == 0).sum()) == round(amount * layer.weight.numel())
    assert report.zeros == sum(round(amount * m.weight.numel()) for m in (model[0], model[2]))


def test_magnitude_removes_the_smallest():
    model = _mlp()
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    C.magnitude_prune_(model, 0.4, scope="layer")
    for w0, m in zip(before, (model[0], model[2])):
        pruned = m.weight == 0
        assert float(w0[pruned].abs().max()) <= float(w0[~pruned].abs().min())
        torch.testing.assert_close(m.weight[~pruned], w0[~pruned], rtol=0, atol=0)


def test_magnitude_global_amount_exact_and_uneven():
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # the second layer's weights are all small: global takes more there
    total = model[0].weight.numel() + model[2].weight.numel()
    report = C.magnitude_prune_(model, 0.5, scope="global")
    assert report.zeros == round(0.5 * total)
    assert report.layers[1].sparsity > report.layers[0].sparsity
    w = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()])
    assert int((w == 0).sum()) == round(0.5 * total)


def test_magnitude_ties_are_deterministic():
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    C.magnitude_prune_(nn.Sequential(lin), 0.5, scope="layer")
    assert lin.weight.flatten().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # lower flat index goes first


def test_bad_amount_and_scope():
    with pytest.raises(ValueError, match="amount"):
        C.magnitude_prune_(_mlp(), 1.5)
    with pytest.raises(ValueError, match="scope"):
        C.magnitude_prune_(_mlp(), 0.5, scope="row")
    with pytest.raises(TypeError, match="model"):
        C.magnitude_prune_(torch.zeros(3), 0.5)


def test_keep_zeros_during_retraining():
    model = _mlp()
    C.magnitude_prune_(model, 0.6)
    zero = [m.weight == 0 for m in (model[0], model[2])]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    with C.keep_zeros(model):
        for _ in range(5):
            loss = model(torch.randn(8, 24)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for z, m in zip(zero, (model[0], model[2])):
        assert bool((m.weight[z] == 0).all())
        assert not torch.equal(m.weight != 0, torch.zeros_like(z))  # the rest did train
    # hooks are gone afterwards
    loss = model(torch.randn(8, 24)).pow(2).mean()
    loss.backward()
    assert bool((model[0].weight.grad[zero[0]] != 0).any())


# ----------------------------------------------------------------------------- structured
@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh])
@pytest.mark.parametrize("amount", [0.25, 0.5, 0.9])
def test_structured_equals_masked(act, amount):
    model = _mlp(dims=(24, 40, 32, 16), act=act)
    masked = copy.deepcopy(model)
    C.structured_mask_(masked, amount)
    report = C.structured_prune_(model, amount)
    # real smaller matrices
    assert model[0].weight.shape == (40 - round(amount * 40), 24)
    assert model[2].weight.shape == (32 - round(amount * 32), 40 - round(amount * 40))
    assert model[4].weight.shape == (16, 32 - round(amount * 32))
    assert model[0].bias.shape == (40 - round(amount * 40),)
    assert report.removed_params == sum(p.numel() for p in masked.parameters()) - sum(
        p.numel() for p in model.parameters())
    x = torch.randn(7, 24)
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


def test_structured_keeps_the_strongest_neurons():
    lin, nxt = nn.Linear(3, 5), nn.Linear(5, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1, 6, dtype=torch.float32)[:, None].repeat(1, 3))
        lin.bias.zero_()
    C.prune_linear_outputs_(lin, nxt, C.pruning.kept_neurons(lin, 0.4))
    assert lin.weight[:, 0].tolist() == [3, 4, 5]
    assert nxt.in_features == 3 and nxt.weight.shape == (2, 3)


def test_structured_skips_non_zero_preserving_activation():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))  # sigmoid(0) != 0
    report = C.structured_prune_(model, 0.5)
    assert report.layers == [] and model[0].out_features == 8


def test_structured_skips_shared_layers():
    """A layer registered twice (weights shared with another part of the model) keeps its
    shape: shrinking it broke the other user (a shape error at the next forward)."""
    shared = nn.Linear(16, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), shared, nn.ReLU(), nn.Linear(4, 3))
            self.head = shared

        def forward(self, x, y):
            return self.block(x).sum(1) + self.head(y).sum(1)

    model = Model()
    x, y = torch.randn(2, 8), torch.randn(2, 16)
    expected = model(x, y)
    report = C.structured_prune_(model, 0.5)
    assert [name for name, _ in report.skipped] == ["block.0", "block.2"]
    assert report.removed_params == 0 and shared.in_features == 16
    torch.testing.assert_close(model(x, y), expected)


def test_structured_skips_blocks_it_cannot_follow_and_keeps_frozen_layers_frozen():
    """Left whole: the layers of an nn.Sequential subclass with its own forward (it may use a
    layer's output elsewhere: pruned and masked models differed), and layers whose weight is tied
    to another layer (pruning untied them). A frozen layer's new, smaller Parameters stay frozen."""
    class Residual(nn.Sequential):
        def forward(self, x):
            h = self[1](self[0](x))
            return self[2](h) + h[:, :2]

    tied = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    twin = nn.Linear(4, 8)
    twin.weight = tied[0].weight
    holder = nn.ModuleDict({"block": tied, "twin": twin})
    for model, skipped in [(Residual(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ["0"]),
                           (holder, ["block.0"])]:
        before = copy.deepcopy(model.state_dict())
        report = C.structured_prune_(model, 0.5)
        assert [name for name, _ in report.skipped] == skipped and report.removed_params == 0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    frozen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).requires_grad_(False)
    assert C.structured_prune_(frozen, 0.5).removed_params > 0
    assert not any(p.requires_grad for p in frozen.parameters())


def test_structured_recommender_mlp_still_trains():
    model = _mlp()
    C.structured_prune_(model, 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = model(torch.randn(4, 24)).pow(2).mean()
    loss.backward()
    opt.step()
    assert model[0].weight.grad.shape == model[0].weight.shape


# ----------------------------------------------------------------------------- N:M
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_nm_pattern(n, m):
    model = _mlp(dims=(32, 24, 16))
    before = [lin.weight.detach().clone() for lin in (model[0], model[2])]
    report = C.nm_prune_(model, n, m)
    for w0, lin in zip(before, (model[0], model[2])):
        w = lin.weight.detach()
        assert C.check_nm_pattern(w, n, m)
        groups, groups0 = w.reshape(-1, m), w0.reshape(-1, m)
        assert bool(((groups != 0).sum(-1) == n).all())  # random weights: exactly n survive
        kept_min = torch.where(groups != 0, groups0.abs(), torch.full_like(groups0, math.inf)).min(-1).values
        dropped_max = torch.where(groups == 0, groups0.abs(), torch.zeros_like(groups0)).max(-1).values
        assert bool((kept_min >= dropped_max).all())
    assert report.sparsity == pytest.approx(1 - n / m)


def test_nm_skips_odd_layers_and_rejects_bad_args():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    report = C.nm_prune_(model)
    assert [name for name, _ in report.skipped] == ["0"]
    assert C.check_nm_pattern(model[2].weight)
    assert not C.check_nm_pattern(torch.ones(2, 4))
    with pytest.raises(ValueError):
        C.nm_prune_(model, 3, 2)


# ----------------------------------------------------------------------------- embedding rows
@pytest.mark.parametrize("by", ["frequency", "norm"])
@pytest.mark.parametrize("default", ["mean", "zero"])
def test_row_pruned_embedding_matches_reference_on_kept_ids(by, default):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8)
    counts = torch.randint(0, 100, (50,))
    pruned = C.prune_embedding(emb, 0.4, by=by, counts=counts, default=default)
    assert pruned.table.num_embeddings == 50 - 20 + 1  # kept rows + the shared default row
    scores = counts.double() if by == "frequency" else emb.weight.detach().double().norm(dim=1)
    kept = pruned.remap < 30
    assert int(kept.sum()) == 30
    assert float(scores[kept].min()) >= float(scores[~kept].max())
    ids = torch.randint(0, 50, (6, 7))
    out = pruned(ids)
    ref = emb(ids)
    mask = kept[ids]
    torch.testing.assert_close(out[mask], ref[mask], rtol=0, atol=0)
    expect_default = emb.weight[~kept].mean(0) if default == "mean" else torch.zeros(8)
    torch.testing.assert_close(out[~mask], expect_default.expand(int((~mask).sum()), 8).detach())


@pytest.mark.parametrize("default", ["mean", "zero", "drop"])
def test_row_pruned_bag_matches_reference(default):
    torch.manual_seed(1)
    bag = nn.EmbeddingBag(40, 6, mode="mean")
    counts = torch.arange(40)  # the 20 highest ids are kept
    pruned = C.prune_embedding(bag, 0.5, counts=counts, default=default)
    idx = torch.randint(20, 40, (30,))  # kept ids only: the reference lookup
    off = torch.tensor([0, 5, 5, 17])
    torch.testing.assert_close(pruned(idx, off), bag(idx, off), rtol=1e-6, atol=1e-6)
    # a bag with a pruned id
    idx2, off2 = torch.tensor([25, 3, 30]), torch.tensor([0])
    kept_mean = bag.weight[[25, 30]].detach()
    if default == "drop":
        expect = kept_mean.mean(0)
    elif default == "zero":
        expect = kept_mean.sum(0) / 3
    else:
        expect = (kept_mean.sum(0) + bag.weight[:20].detach().mean(0)) / 3
    torch.testing.assert_close(pruned(idx2, off2)[0], expect, rtol=1e-5, atol=1e-6)


def test_row_pruned_quantized_and_errors():
    emb = nn.Embedding(30, 16)
    pruned = C.prune_embedding(emb, 0.5, by="norm").quantize(8)
    ids = torch.arange(30)
    kept = pruned.remap < 15
    torch.testing.assert_close(pruned(ids)[kept], emb(ids)[kept], rtol=0, atol=0.02)
    assert pruned.weight.shape == (30, 16)
    with pytest.raises(ValueError, match="counts"):
        C.prune_embedding(emb, 0.5, by="frequency")
    with pytest.raises(ValueError, match="by"):
        C.prune_embedding(emb, 0.5, by="random")
    with pytest.raises(ValueError, match="bags"):
        C.prune_embedding(emb, 0.5, by="norm", default="drop")
    # a padding row (zeros, the lowest norm) would be pruned first and padding ids get the shared
    # row; max_norm renormalizes in forward, which the pruned module does not
    with pytest.raises(ValueError, match="padding_idx"):
        C.prune_embedding(nn.Embedding(30, 16, padding_idx=0), 0.5, by="norm")
    with pytest.raises(NotImplementedError, match="max_norm"):
        C.prune_embedding(nn.Embedding(30, 16, max_norm=0.5), 0.5, by="norm")
    with pytest.raises(NotImplementedError, match="max_norm"):
        C.prune_embedding(nn.EmbeddingBag(30, 16, max_norm=0.5), 0.5, by="norm")


def test_quantized_tables_keep_the_bags_options():
    """quantize_tables_ keeps a bag's padding_idx (padding ids were counted by mean), sparse,
    bounds and backend."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.history = nn.EmbeddingBag(10, 4, mode="mean", padding_idx=0)
            self.item_emb = FusedEmbeddingBag(10, 4, mode="sum", bounds="clamp", padding_idx=2)

    model = Model()
    idx, off = torch.tensor([0, 0, 3, 12, 2]), torch.tensor([0, 3])
    expected = (model.history(idx[:3], off[:1]), model.item_emb(idx, off))
    assert C.quantize_tables_(model, 8, ("history", "item_emb")) == ["history -> int8", "item_emb -> int8"]
    assert model.item_emb.bag.bounds == "clamp" and model.item_emb.bag.padding_idx == 2
    torch.testing.assert_close(model.history(idx[:3], off[:1]), expected[0], rtol=0, atol=0.02)
    torch.testing.assert_close(model.item_emb(idx, off), expected[1], rtol=0, atol=0.05)


# ----------------------------------------------------------------------------- SparseLinear
def test_sparse_linear_matches_dense():
    lin = nn.Linear(33, 17)
    C.magnitude_prune_(nn.Sequential(lin), 0.9, scope="layer")
    sp = C.SparseLinear.from_linear(lin)
    assert sp.nnz == int((lin.weight != 0).sum())
    assert sp.sparsity == pytest.approx(float((lin.weight == 0).float().mean()))
    x = torch.randn(2, 5, 33)
    with torch.no_grad():
        torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)


def test_sparse_linear_copies_and_loads_any_nnz():
    # deepcopy / pickle (torch cannot deep-copy a CSR tensor), and a checkpoint whose nnz differs
    # from the module it is loaded into (global pruning makes it data-dependent)
    import io
    import pickle

    def sparse_model(seed, amount):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
        C.magnitude_prune_(m[0:1], amount, scope="layer")
        assert C.sparsify_(m, min_sparsity=0.5) == ["0"]
        return m.eval()

    src, x = sparse_model(0, 0.95), torch.randn(3, 16)
    with torch.no_grad():
        y = src(x)
        for clone in (copy.deepcopy(src), pickle.loads(pickle.dumps(src))):
            assert clone[0].weight_csr.values().data_ptr() != src[0].weight_csr.values().data_ptr()
            torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
        assert G.optimize_graph(src, int8=False)[0](x).allclose(y, atol=1e-6)  # deep-copies the model
        fresh = sparse_model(1, 0.6)
        assert fresh[0].nnz != src[0].nnz
        buf = io.BytesIO()
        torch.save(src.state_dict(), buf)
        buf.seek(0)
        fresh.load_state_dict(torch.load(buf))
        assert fresh[0].nnz == src[0].nnz
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
        again = sparse_model(1, 0.6)
        assert again.load_state_dict(src.state_dict(), strict=False) == ([], [])
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="weight_csr: expected a torch.sparse_csr tensor of shape"):
            fresh.load_state_dict({**src.state_dict(), "0.weight_csr": torch.zeros(12, 16)})
        with pytest.raises(RuntimeError, match="Missing key.*0.weight_csr"):
            fresh.load_state_dict({k: v for k, v in src.state_dict().items() if k != "0.weight_csr"})


def test_sparsify_converts_a_shared_linear_once_in_every_place():
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight[:, 1:] = 0
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Sequential(lin))
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = model(x)
        assert C.sparsify_(model, min_sparsity=0.5) == ["0", "2", "3.0"]
        assert model[0] is model[2] is model[3][0] and isinstance(model[0], C.SparseLinear)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_sparsify_keeps_dense_below_break_even():
    model = _mlp()
    C.magnitude_prune_(model[0:1], 0.99, scope="layer")
    C.magnitude_prune_(model[2:3], 0.3, scope="layer")
    converted = C.sparsify_(model, min_sparsity=C.BREAK_EVEN_SPARSITY)
    assert converted == ["0"]
    assert isinstance(model[0], C.SparseLinear) and type(model[2]) is nn.Linear


def test_measure_break_even_runs():
    res = C.measure_break_even((16, 16), batch=8, sparsities=(0.5, 0.99), repeats=2)
    assert len(res["rows"]) == 2 and all(d > 0 and c > 0 for _, d, c in res["rows"])


# ----------------------------------------------------------------------------- model level
@pytest.fixture(scope="module")
def trained():
    full = D.synthetic_interactions(150, 90, seed=3, interactions_per_user=12, min_per_user=4)
    train, test = D.train_test_split(full, 2)
    torch.manual_seed(0)
    model = Recommender.for_data(train, dim=16, hidden=32)
    train_model(model, train, epochs=3, progress=False)
    return model, train, test


def test_bytes_count_shared_storage_once(trained):
    model, *_ = trained
    expect = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert C.model_bytes(model) == expect
    twin = copy.deepcopy(model)
    twin.extra = twin.user_emb  # the same module twice
    assert C.model_bytes(twin) == expect


def test_bytes_leave_out_caches_unless_asked(trained):
    model, *_ = trained
    opt, _ = rk.optimize(model, quantize="int8", embeddings=8)
    packed = sum(m.weight_packed.numel() for m in opt.mlp if isinstance(m, Int8Linear))
    assert packed > 0 and "mlp.0.weight_packed" not in opt.state_dict()
    unique = {(t.data_ptr(), t.numel(), t.dtype): t for t in opt.state_dict().values()}  # the catalog is shared
    state = sum(t.numel() * t.element_size() for t in unique.values())
    assert C.model_bytes(opt) == state
    assert C.model_bytes(opt, caches=True) == state + packed


def test_int8_everywhere_model(trained):
    model, train, test = trained
    opt, report = rk.optimize(model, quantize="int8", embeddings=8, data=(train, test), repeats=2)
    assert isinstance(opt.mlp[0], Int8Linear) and opt.mlp[0].activation == "relu"
    assert opt.user_emb.bits == 8 and opt.history.bits == 8 and opt.item_emb.bits == 8
    assert opt.catalog is opt.item_emb.table.weight  # the catalog is the int8 item table
    assert opt.folded_bias is not None and opt.item_feat is None
    assert isinstance(model.mlp[0], nn.Linear) and model.catalog is None  # the input is untouched
    # scores stay close to the fp32 model's
    ev = C.EvalData.build(train, test, 16)
    with torch.no_grad():
        a = model.score(ev.pair_users, ev.pair_items, *ev.pair_hist)
        b = opt.score(ev.pair_users, ev.pair_items, *ev.pair_hist)
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max()) + 1e-3
    assert report.final.bytes < report.baseline.bytes / 3


def test_report_numbers_are_measured(trained, monkeypatch):
    model, train, test = trained
    _, report = rk.optimize(model, quantize="int8", embeddings=8, data=(train, test), repeats=2)
    names = [s.step for s in report.steps]
    assert names[0] == "fp32 (input)" and names[-1] == "int8 MLP + int8 catalog"
    # bytes and parameters: recomputed from the models
    assert report.baseline.bytes == C.model_bytes(model)
    assert report.baseline.params == sum(p.numel() for p in model.parameters())
    # quality: the metric of the model's own top-k lists
    ev = C.EvalData.build(train, test, 256)
    ranked = P.ranked_lists(model, ev, 10)
    assert report.baseline.ndcg == pytest.approx(float(rk.metrics.ndcg_at_k(ranked, ev.relevant, 10)))
    assert report.baseline.dcg == pytest.approx(float(rk.metrics.dcg_at_k(ranked, ev.relevant, 10)))
    # latency: a clock that advances 7 ms per call reads exactly 7 ms per timed run
    clock = iter(range(0, 10 ** 6, 7))
    monkeypatch.setattr(P, "_clock", lambda: next(clock) / 1e3)
    _, fake = rk.optimize(model, quantize="int8", data=(train, test), repeats=3)
    assert all(s.score_ms == pytest.approx(7) and s.topk_ms == pytest.approx(7) for s in fake.steps)
    assert fake.paired_ms == pytest.approx((7, 7, 7, 7))


def test_struct_int4_retrain_pipeline(trained):
    model, train, test = trained
    opt, report = rk.optimize(model, quantize="int8", embeddings=4, structured=0.5, retrain_epochs=1,
                              data=(train, test), repeats=1)
    assert opt.mlp[0].out_features == 16 and opt.mlp[2].in_features == 16
    assert opt.user_emb.bits == 4 and opt.history.bits == 4 and opt.item_emb.bits == 8
    assert [s.step for s in report.steps][1:3] == ["structured 50% MLP neurons", "retrain 1 epoch(s)"]
    assert report.final.bytes < report.steps[1].bytes
    r = report.ratios()
    assert r["bytes_x"] == pytest.approx(report.baseline.bytes / report.final.bytes)
    users = test.users[:5]
    off, items = D.csr_rows(*train.user_history(), users)
    scores, ids = opt.recommend(users, 5, off, items)
    assert ids.shape == (5, 5) and bool((ids >= 0).all())


def test_rows_and_magnitude_pipeline(trained):
    model, train, test = trained
    opt, report = rk.optimize(model, prune=0.95, rows=0.5, retrain_epochs=1, data=(train, test), repeats=1)
    assert opt.user_emb.table.num_embeddings == model.num_users - round(0.5 * model.num_users) + 1
    assert isinstance(opt.mlp[0], C.SparseLinear)  # 95% is past the break-even
    nonzero = [s.nonzero for s in report.steps]
    assert nonzero[-1] == nonzero[-2]  # retraining and CSR kept the zeros


def test_optimize_without_data_and_bad_args(trained):
    model, *_ = trained
    opt, report = rk.optimize(model, quantize="int8", embeddings=8)
    assert report.final.ndcg is None and report.final.bytes == C.model_bytes(opt)
    with pytest.raises(ValueError, match="quantize"):
        rk.optimize(model, quantize="int4")
    with pytest.raises(ValueError, match="retrain"):
        rk.optimize(model, structured=0.5, retrain_epochs=1)
    with pytest.raises(TypeError):
        rk.optimize(nn.Linear(2, 2))


def test_table_and_plot(tmp_path, trained):
    from recsys_kernels.compress.plot import plot_reports

    model, train, test = trained
    _, report = rk.optimize(model, quantize="int8", embeddings=8, data=(train, test), repeats=1, name="int8")
    text = report.table()
    assert "ndcg@10" in text and "int8 MLP + int8 catalog" in text
    path = plot_reports([report], str(tmp_path / "r.png"))
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    idat = raw[raw.index(b"IDAT") + 4:raw.index(b"IEND") - 8]
    pixels = zlib.decompress(idat)
    assert len(pixels) == height * (1 + 3 * width)
    assert len(set(pixels)) > 3  # something was drawn
