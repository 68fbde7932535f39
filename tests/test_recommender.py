"""The Recommender (the seed's model made correct), its training and evaluation, the optimized
int8 twin and the demo."""
import pytest
import torch

from recsys_kernels import data, demo
from recsys_kernels.models import recommender as rec
from recsys_kernels.models.recommender import Recommender, evaluate, train_model


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: extra intra-op threads only contend with each other on a shared machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def split():
    d = data.synthetic_interactions(150, 80, seed=0, interactions_per_user=12)
    return data.train_test_split(d, 2)


def _model(train, seed=0, **kw):
    torch.manual_seed(seed)
    return Recommender.for_data(train, dim=kw.pop("dim", 16), hidden=kw.pop("hidden", 32), **kw)


def _batch(train, users):
    off, items = train.user_history()
    return data.csr_rows(off, items, users)


def _brute_topk(model, users, h_off, h_items, k, exclude=True):
    """Dense scores, seen items to -inf, ties to the lower id: a stable descending sort."""
    with torch.no_grad():
        u = model.user_vectors(users, h_off, h_items)
        scores = u @ model.item_emb.weight.T + model.item_bias()
    if exclude:
        for r in range(users.numel()):
            scores[r, h_items[h_off[r]:h_off[r + 1]]] = float("-inf")
    values, ids = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], ids[:, :k]


def test_shapes(split):
    train, _ = split
    m = _model(train)
    users = torch.tensor([0, 5, 5, 149])
    h_off, h_items = _batch(train, users)
    assert m.user_vectors(users, h_off, h_items).shape == (4, 16)
    assert m.item_vectors().shape == (80, 16)
    assert m.item_bias().shape == (80,)
    items = torch.tensor([1, 2, 79, 0])
    s = m.score(users, items, h_off, h_items)
    assert s.shape == (4,) and s.dtype == torch.float32
    assert torch.equal(m(users, items, h_off, h_items), s)
    values, ids = m.recommend(users, 7, h_off, h_items)
    assert values.shape == ids.shape == (4, 7) and ids.dtype == torch.int64
    # an empty history pools to zeros instead of failing
    empty = torch.zeros(3, dtype=torch.int64)
    out = m.user_vectors(torch.tensor([1, 2]), empty, torch.empty(0, dtype=torch.int64))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_score_is_dot_plus_content_bias(split):
    """score = <f(u), v_i> + <a_attr(i), W x_i>, written out by hand."""
    train, _ = split
    m = _model(train)
    users, items = torch.tensor([3, 9]), torch.tensor([4, 60])
    h_off, h_items = _batch(train, users)
    with torch.no_grad():
        pooled = torch.stack([m.history.weight[h_items[h_off[r]:h_off[r + 1]]].mean(0) for r in range(2)])
        hidden = torch.relu(torch.cat([m.user_emb.weight[users], pooled], 1) @ m.mlp[0].weight.T + m.mlp[0].bias)
        f_u = hidden @ m.mlp[2].weight.T + m.mlp[2].bias
        bias = (m.attr_emb.weight[train.item_attr[items]] * (train.item_feat[items] @ m.feat_proj.weight.T)).sum(1)
        expected = (f_u * m.item_emb.weight[items]).sum(1) + bias
    torch.testing.assert_close(m.score(users, items, h_off, h_items), expected, rtol=1e-5, atol=1e-6)
    # the inference path (fused pair_scores when available) gives the same numbers
    with torch.no_grad():
        torch.testing.assert_close(m.score(users, items, h_off, h_items), expected, rtol=1e-5, atol=1e-6)


def test_fx_traceable_with_swappable_leaves(split):
    """The graph passes trace the model with torch.fx and swap its EmbeddingBag / Linear
    layers: they must show up as call_module nodes, and the traced module must compute the same."""
    train, _ = split
    m = _model(train).eval()
    gm = torch.fx.symbolic_trace(m)
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"history", "mlp.0", "mlp.1", "mlp.2", "user_emb", "item_emb", "attr_emb", "feat_proj"} <= modules
    users, items = torch.tensor([2, 4, 4]), torch.tensor([0, 11, 79])
    h_off, h_items = _batch(train, users)
    torch.testing.assert_close(gm(users, items, h_off, h_items), m(users, items, h_off, h_items))


def test_gradients_reach_every_parameter(split):
    """The seed trained under torch.no_grad(): nothing learned. Here every parameter gets a
    nonzero gradient from one loss."""
    train, _ = split
    m = _model(train)
    users = torch.arange(0, 150, 3)
    items = torch.randint(80, (users.numel(),))
    h_off, h_items = _batch(train, users)
    m.score(users, items, h_off, h_items).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert float(p.grad.abs().sum()) > 0, name


def test_training_lowers_loss_and_beats_random(split):
    train, test = split
    m = _model(train)
    before = evaluate(m, train, test, k=10)
    losses = train_model(m, train, epochs=6, batch_size=256, lr=2e-2, seed=0, progress=False)
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    after = evaluate(m, train, test, k=10)
    users, history, relevant = rec.held_out_users(train, test)
    base = rec.baseline_rankings(train, users, history, 10)
    random_ndcg = rec.ranking_metrics(base["random"], relevant, 10)["ndcg@10"]
    assert after["ndcg@10"] > 2 * random_ndcg
    assert after["ndcg@10"] > before["ndcg@10"]
    assert after["users"] == users.numel() and set(after) >= {"ndcg@10", "recall@10", "hit_rate@10", "mrr"}


def test_training_is_seeded(split):
    train, _ = split
    a, b = _model(train), _model(train)
    la = train_model(a, train, epochs=1, batch_size=256, seed=5, progress=False)
    lb = train_model(b, train, epochs=1, batch_size=256, seed=5, progress=False)
    assert la == lb
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_training_losses_and_progress_bar(split, loss, capsys):
    train, _ = split
    m = _model(train)
    losses = train_model(m, train, epochs=2, batch_size=512, seed=0, loss=loss, progress=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "loss" in err


def test_recommend_excludes_history_and_matches_brute_force(split):
    train, _ = split
    m = _model(train)
    train_model(m, train, epochs=1, batch_size=256, seed=0, progress=False)
    users = torch.tensor([0, 7, 7, 31, 149])
    h_off, h_items = _batch(train, users)
    values, ids = m.recommend(users, 12, h_off, h_items)
    exp_values, exp_ids = _brute_topk(m, users, h_off, h_items, 12)
    assert torch.equal(ids, exp_ids)
    torch.testing.assert_close(values, exp_values, rtol=1e-5, atol=1e-5)
    for r in range(users.numel()):
        assert not set(ids[r].tolist()) & set(h_items[h_off[r]:h_off[r + 1]].tolist())
    # no exclusion: history items may come back, ranking is the plain one
    _, ids_all = m.recommend(users, 12, h_off, h_items, exclude=None)
    assert torch.equal(ids_all, _brute_topk(m, users, h_off, h_items, 12, exclude=False)[1])
    # a custom exclusion list
    ex = data.csr_from_lists([[int(ids_all[r, 0])] for r in range(users.numel())])
    _, ids_ex = m.recommend(users, 12, h_off, h_items, exclude=ex)
    assert torch.equal(ids_ex[:, :11], ids_all[:, 1:])


def test_recommend_pads_when_catalog_runs_out():
    d = data.InteractionData(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 3]), torch.arange(4), 2, 5,
                             torch.zeros(5, dtype=torch.int64), torch.zeros(5, 1), 1)
    m = _model(d)
    off, items = d.user_history()
    values, ids = m.recommend(torch.tensor([0, 1]), 5, off, items)
    assert sorted(ids[0, :2].tolist()) == [3, 4] and ids[0, 2:].tolist() == [-1, -1, -1]
    assert torch.isneginf(values[0, 2:]).all() and torch.isfinite(values[1, :4]).all()


def test_fallback_matches_fused_ops(split, monkeypatch):
    train, _ = split
    m = _model(train)
    users = torch.arange(20)
    h_off, h_items = _batch(train, users)
    v1, i1 = m.recommend(users, 10, h_off, h_items)
    with torch.no_grad():
        s1 = m.score(users, torch.arange(20) % 80, h_off, h_items)
    monkeypatch.setattr(rec, "_scoring_ops", lambda: None)  # as if recsys_kernels.ops.scoring were missing
    v2, i2 = m.recommend(users, 10, h_off, h_items)
    with torch.no_grad():
        s2 = m.score(users, torch.arange(20) % 80, h_off, h_items)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)


def test_frozen_int8_catalog(split):
    train, test = split
    m = _model(train)
    train_model(m, train, epochs=2, batch_size=256, seed=0, progress=False)
    users = torch.arange(40)
    h_off, h_items = _batch(train, users)
    v32, i32 = m.recommend(users, 10, h_off, h_items)
    m.freeze_catalog(bits=8)
    assert m.catalog.dtype == torch.uint8 and m.catalog.shape == (80, 16 + 8)
    v8, i8 = m.recommend(users, 10, h_off, h_items)
    # int8 row-wise codes: scores move by at most ~|q| * scale / 2 per dim; lists mostly agree
    torch.testing.assert_close(v8, v32, rtol=0, atol=0.05)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(i8, i32)) / i32.numel()
    assert overlap > 0.8
    with pytest.raises(ValueError, match="frozen"):
        train_model(m, train, epochs=1, progress=False)
    m.unfreeze_catalog()
    assert torch.equal(m.recommend(users, 10, h_off, h_items)[1], i32)
    with pytest.raises(ValueError, match="bits"):
        m.freeze_catalog(bits=4)


def test_optimized_twin_keeps_quality(split):
    train, test = split
    m = _model(train)
    train_model(m, train, epochs=3, batch_size=256, seed=0, progress=False)
    opt = demo.build_optimized(m)
    from recsys_kernels.nn.embedding import FusedEmbeddingBag
    from recsys_kernels.nn.linear import Int8Linear

    assert isinstance(opt.history, FusedEmbeddingBag) and opt.history.bits == 8
    assert isinstance(opt.mlp[0], Int8Linear) and isinstance(opt.mlp[2], Int8Linear)
    assert isinstance(m.history, torch.nn.EmbeddingBag) and isinstance(m.mlp[0], torch.nn.Linear)  # untouched
    users = torch.arange(30)
    h_off, h_items = _batch(train, users)
    with torch.no_grad():
        u32 = m.user_vectors(users, h_off, h_items)
        u8 = opt.user_vectors(users, h_off, h_items)
    assert (u8 - u32).norm() / u32.norm() < 0.05
    a, b = evaluate(m, train, test), evaluate(opt, train, test)
    assert abs(a["ndcg@10"] - b["ndcg@10"]) < 0.05


def test_bad_input(split):
    train, _ = split
    m = _model(train)
    users = torch.tensor([0, 1])
    h_off, h_items = _batch(train, users)
    with pytest.raises(ValueError, match="k must"):
        m.recommend(users, 81, h_off, h_items)
    with pytest.raises(ValueError, match="k must"):
        m.recommend(users, 0, h_off, h_items)
    with pytest.raises(ValueError, match="hist_offsets"):
        m.user_vectors(users, h_off[:-1], h_items)
    with pytest.raises(ValueError, match="loss"):
        train_model(m, train, epochs=1, loss="mse", progress=False)
    with pytest.raises(IndexError, match="item_attr"):
        Recommender(3, 4, num_item_attrs=2, item_attr=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="item_feat"):
        Recommender(3, 4, feat_dim=2, item_feat=torch.zeros(4, 3))


def test_demo_quick_end_to_end(capsys):
    assert demo.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for word in ("random", "popularity", "fp32 (PyTorch)", "int8 optimized", "ndcg@10", "latency ms"):
        assert word in out


def test_run_demo_returns_numbers():
    args = demo.build_parser().parse_args(["--quick", "--no-progress", "--repeats", "2", "--epochs", "8"])
    res = demo.run_demo(args)
    m = res["metrics"]
    assert set(m) == {"random", "popularity", "fp32", "optimized"}
    assert m["fp32"]["ndcg@10"] > 3 * m["random"]["ndcg@10"]
    assert m["fp32"]["ndcg@10"] > m["popularity"]["ndcg@10"]
    assert abs(m["optimized"]["ndcg@10"] - m["fp32"]["ndcg@10"]) < 0.03
    assert res["latency_ms"]["fp32"] > 0 and res["latency_ms"]["optimized"] > 0
    assert len(res["train_loss"]) == 8 and res["optimized_error"] is None


def test_demo_movielens_and_bad_args(tmp_path, capsys):
    rows = [f"{u}\t{i}\t{1 + (u * i) % 5}\t{1000 + u * 50 + i}" for u in range(1, 31) for i in range(1, 41)
            if (u + i) % 3 == 0]
    (tmp_path / "u.data").write_text("\n".join(rows) + "\n")
    assert demo.main(["--movielens", str(tmp_path), "--epochs", "1", "--no-progress", "--repeats", "1",
                      "--dim", "8"]) == 0
    assert "data: " + str(tmp_path) in capsys.readouterr().out
    assert demo.main(["--movielens", str(tmp_path / "nope"), "--no-progress"]) == 1
    assert "u.data" in capsys.readouterr().err
    assert demo.main(["--movielens", "", "--no-progress"]) == 1  # a path, not "synthetic"
    assert "no u.data in ''" in capsys.readouterr().err
    # nothing held out (no user has more than --num-test interactions): an error, not NaN metrics
    assert demo.main(["--quick", "--no-progress", "--num-test", "100"]) == 1
    assert "nothing is held out" in capsys.readouterr().err
    from recsys_kernels.compress import cli as compress_cli
    assert compress_cli.main(["--quick", "--no-progress", "--configs", "int8", "--num-test", "100", "--plot", ""]) == 1
    assert compress_cli.main(["--quick", "--configs", "prune90", "--retrain-epochs", "-1"]) == 2
    assert demo.main(["--epochs", "0"]) == 2
    assert demo.main(["--device", "not-a-device"]) == 2
    if not torch.cuda.is_available():
        assert demo.main(["--device", "cuda", "--quick"]) == 2
