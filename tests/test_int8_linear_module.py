import copy
import io
import pickle

import pytest
import torch
from torch import nn

from recsys_kernels.nn.linear import Int8Linear
from recsys_kernels.ops.int8_matmul import int8_linear, quantize_weight_int8
from recsys_kernels.quant import quantize_


def _rel(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ----------------------------------------------------------------------------- Int8Linear
@pytest.mark.parametrize("activation,act", [(None, lambda t: t), ("relu", torch.relu),
                                            ("gelu", nn.functional.gelu), ("silu", nn.functional.silu)])
@pytest.mark.parametrize("act_quant", ["dynamic", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_from_float(activation, act, act_quant, bias):
    linear = nn.Linear(50, 23, bias=bias)
    q = Int8Linear.from_float(linear, activation=activation, act_quant=act_quant)
    wq, ws = quantize_weight_int8(linear.weight.detach())
    assert torch.equal(q.weight_q, wq) and torch.equal(q.weight_scale, ws)
    assert (q.bias is None) == (not bias)
    x = torch.randn(4, 3, 50)
    with torch.no_grad():
        got = q(x)
        exp = act(linear(x))
    assert got.shape == (4, 3, 23) and got.dtype == torch.float32
    assert torch.equal(got, int8_linear(x, wq, ws, q.bias, activation=q.activation, act_quant=act_quant))
    assert _rel(got, exp) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_linear_and_input(dtype):
    linear = nn.Linear(32, 8).to(dtype)
    q = Int8Linear.from_float(linear)
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float32
    x = torch.randn(5, 32, dtype=dtype)
    with torch.no_grad():
        got = q(x)
        exp = linear(x)
    assert got.dtype == dtype
    assert _rel(got, exp) < 3e-2
    # out_dtype overrides x's dtype; a model cast after conversion still runs
    assert Int8Linear.from_float(linear, out_dtype=torch.float32)(x).dtype == torch.float32
    assert q.half()(x).dtype == dtype


def test_extra_repr():
    q = Int8Linear.from_float(nn.Linear(4, 3), activation="gelu", act_quant="none")
    text = repr(q)
    for part in ("in_features=4", "out_features=3", "bias=True", "activation='gelu'", "act_quant='none'"):
        assert part in text


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias):
    q = Int8Linear.from_float(nn.Linear(17, 9, bias=bias), activation="relu")
    assert set(q.state_dict()) == {"weight_q", "weight_scale"} | ({"bias"} if bias else set())
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = Int8Linear(17, 9, bias=bias, activation="relu")
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(6, 17)
    assert torch.equal(fresh(x), q(x))


def test_empty_module_and_bad_arguments():
    m = Int8Linear(5, 2)
    assert m.weight_q.dtype == torch.int8 and m.weight_q.shape == (2, 5)
    assert torch.equal(m(torch.randn(3, 5)), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="linear"):
        Int8Linear.from_float(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="activation"):
        Int8Linear.from_float(nn.Linear(3, 3), activation="tanh")
    with pytest.raises(ValueError, match="act_quant"):
        Int8Linear(3, 3, act_quant="static")
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(3, 4))


def test_backward_raises_clearly():
    q = Int8Linear.from_float(nn.Linear(8, 4))
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x).sum().backward()


# ----------------------------------------------------------------------------- quantize_
def _mlp():
    return nn.Sequential(
        nn.Linear(24, 40), nn.ReLU(),
        nn.Linear(40, 40), nn.GELU(),
        nn.Linear(40, 40), nn.SiLU(),
        nn.Linear(40, 40), nn.GELU(approximate="tanh"),  # not fusable: the epilogue's gelu is erf
        nn.Linear(40, 40), nn.Dropout(0.0), nn.ReLU(),   # not directly after the Linear
        nn.Linear(40, 8),
    ).eval()


def test_quantize_sequential_fuses_activations():
    model = _mlp()
    ref = copy.deepcopy(model)
    assert quantize_(model) is model
    kinds = [(type(m).__name__, getattr(m, "activation", None)) for m in model]
    assert kinds == [("Int8Linear", "relu"), ("Identity", None), ("Int8Linear", "gelu"), ("Identity", None),
                     ("Int8Linear", "silu"), ("Identity", None), ("Int8Linear", "none"), ("GELU", None),
                     ("Int8Linear", "none"), ("Dropout", None), ("ReLU", None), ("Int8Linear", "none")]
    x = torch.randn(16, 24)
    with torch.no_grad():
        assert _rel(model(x), ref(x)) < 5e-2


def test_quantize_filter_fn_and_nesting():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.mlp(x))

    model = Block()
    ref = copy.deepcopy(model)
    seen = []

    def only_first(module, fqn):
        seen.append((type(module), fqn))
        return fqn in ("mlp.0", "head")

    quantize_(model, only_first, act_quant="none")
    assert seen == [(nn.Linear, "mlp.0"), (nn.Linear, "mlp.2"), (nn.Linear, "head")]
    assert isinstance(model.mlp[0], Int8Linear) and model.mlp[0].activation == "relu"
    assert model.mlp[0].act_quant == "none" and isinstance(model.mlp[1], nn.Identity)
    assert type(model.mlp[2]) is nn.Linear and isinstance(model.mlp[3], nn.ReLU)  # left alone, not fused
    assert isinstance(model.head, Int8Linear)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert _rel(model(x), ref(x)) < 2e-2


def test_quantize_fuses_only_where_the_activation_runs_next():
    """Fusion follows the execution order: not into a Linear that sits in two places (one
    Int8Linear serves both, as the Linear did), not inside an nn.Sequential subclass with its own
    forward; a subclass that keeps Sequential's forward still fuses."""
    x = torch.randn(6, 8)
    shared = nn.Linear(8, 8)
    twice = nn.Sequential(shared, shared, nn.ReLU())  # relu(l(l(x)))

    class Residual(nn.Sequential):
        def forward(self, x):
            h = self[0](x)
            return self[1](h) + h

    class Plain(nn.Sequential):
        pass

    across = nn.Linear(8, 8)
    two_parents = nn.Sequential(nn.Sequential(across, nn.ReLU()), nn.Sequential(across))  # l(relu(l(x)))
    for model, fused in [(twice, []), (Residual(nn.Linear(8, 8), nn.ReLU()), []), (Plain(nn.Linear(8, 8), nn.ReLU()), ["relu"]),
                         (two_parents, [])]:
        ref = copy.deepcopy(model)
        quantize_(model)
        linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert [m.activation for m in linears if m.activation != "none"] == fused
        assert not any(type(m) is nn.Linear for m in model.modules())
        with torch.no_grad():
            assert _rel(model(x), ref(x)) < 2e-2
    assert twice[0] is twice[1] and two_parents[0][0] is two_parents[1][0]


def test_quantize_block_in_two_places_after_many_layers():
    """A block that sits in two slots is walked twice; the Linears converted before it are freed as
    the walk goes on, and a module made during the walk can get a freed Linear's id. Every slot
    must still hold its own layer (until 2026-11-30 most of these models got another layer's)."""
    x = torch.randn(4, 16)
    for _ in range(10):
        pre = nn.Sequential(*[m for _ in range(32) for m in (nn.Linear(16, 16), nn.ReLU())])
        block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        model = nn.Sequential(pre, block, block)
        ref = copy.deepcopy(model)
        quantize_(model)
        layers = zip(model.named_modules(remove_duplicate=False), ref.named_modules(remove_duplicate=False))
        for (name, q), (_, f) in layers:
            if isinstance(f, nn.Linear):
                assert isinstance(q, Int8Linear), name
                torch.testing.assert_close(q.dequantized_weight(), f.weight.detach(), rtol=0,
                                           atol=f.weight.detach().abs().max().item() / 127)
        assert model[1] is model[2]
        with torch.no_grad():
            assert _rel(model(x), ref(x)) < 2e-2


def test_quantize_leaves_linear_subclasses_with_their_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 10 * super().forward(x)

    class Plain(nn.Linear):
        pass

    model = nn.Sequential(Scaled(4, 4), nn.ReLU(), Plain(4, 4), nn.ReLU())
    x = torch.randn(3, 4)
    expected = model(x).detach()
    quantize_(model)
    assert type(model[0]) is Scaled and isinstance(model[1], nn.ReLU)
    assert isinstance(model[2], Int8Linear) and model[2].activation == "relu"
    with torch.no_grad():
        assert _rel(model(x), expected) < 2e-2


def test_quantize_root_linear_and_bad_arguments():
    linear = nn.Linear(4, 4)
    assert isinstance(quantize_(linear), Int8Linear)
    assert quantize_(linear, lambda m, fqn: False) is linear
    with pytest.raises(TypeError, match="model"):
        quantize_(torch.randn(3))
    with pytest.raises(TypeError, match="filter_fn"):
        quantize_(nn.Sequential(nn.Linear(2, 2)), filter_fn="linear")
    with pytest.raises(ValueError, match="act_quant"):
        quantize_(nn.Sequential(nn.Linear(2, 2)), act_quant="static")


def test_quantized_state_dict_loads_into_fresh_quantized_model():
    model = quantize_(_mlp())
    fresh = quantize_(_mlp())  # different random weights, same structure
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 24)
    assert torch.equal(fresh(x), model(x))


class _TinyBert(nn.Module):
    """Embedding + post-norm transformer encoder + pooled classification head."""

    def __init__(self, vocab=50, d=32, heads=4, layers=2, batch_first=True, norm_first=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=batch_first and not norm_first)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 3))
        self.batch_first = batch_first

    def forward(self, tokens, pad_mask=None):
        h = self.embed(tokens)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=pad_mask)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_quantize_transformer_encoder(batch_first, norm_first, with_mask):
    model = _TinyBert(batch_first=batch_first, norm_first=norm_first).eval()
    ref = copy.deepcopy(model)
    quantize_(model)
    for layer in model.encoder.layers:
        assert isinstance(layer.linear1, Int8Linear) and isinstance(layer.linear2, Int8Linear)
        assert type(layer.self_attn.out_proj) is not Int8Linear  # MHA reads its .weight directly
    assert model.head[0].activation == "gelu"
    tokens = torch.randint(0, 50, (3, 9))
    mask = None
    if with_mask:
        mask = torch.zeros(3, 9, dtype=torch.bool)
        mask[0, 6:] = True
        mask[2, 4:] = True
    with torch.no_grad():
        got, exp = model(tokens, mask), ref(tokens, mask)
    if mask is not None:  # the reference's nested-tensor fast path zeroes padded positions
        got, exp = got[~mask], exp[~mask]
    assert _rel(got, exp) < 5e-2


def test_compiled_quantized_model_fullgraph():
    model = quantize_(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval())
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        assert torch.equal(torch.compile(model, fullgraph=True)(x), model(x))


# ----------------------------------------------------------------------------- prepacked weight
def test_packed_weight_is_a_cache_rebuilt_on_load():
    from recsys_kernels.ops.int8_matmul import PACKED_CPU_KERNEL, pack_weight_int8

    q = Int8Linear.from_float(nn.Linear(40, 21), activation="gelu")
    assert "weight_packed" not in q.state_dict()
    assert torch.equal(q.weight_packed, pack_weight_int8(q.weight_q))
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = Int8Linear(40, 21, activation="gelu")
    stale = fresh.weight_packed.clone()
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.weight_packed, q.weight_packed) and not torch.equal(stale, q.weight_packed)
    x = torch.randn(2, 5, 40)
    assert fresh._packed_path(x) == PACKED_CPU_KERNEL
    exp = int8_linear(x, q.weight_q, q.weight_scale, q.bias, activation="gelu", backend="reference")
    torch.testing.assert_close(fresh(x), exp, rtol=1e-5, atol=1e-5)
    # the plain op path (reference backend) gives the same numbers
    ref_module = copy.deepcopy(fresh)
    ref_module.backend = "reference"
    assert not ref_module._packed_path(x)
    torch.testing.assert_close(ref_module(x), fresh(x), rtol=1e-5, atol=1e-5)
    # after an in-place edit of weight_q, repack() refreshes the cache (the forward does it too)
    with torch.no_grad():
        fresh.weight_q.neg_()
    fresh.repack()
    assert torch.equal(fresh.weight_packed, pack_weight_int8(fresh.weight_q))


def test_packed_weight_follows_the_weight_it_runs_with():
    """The cache never serves stale weights: weight_q edited in place (repacked by the forward),
    swapped in by torch.func.functional_call with another layer's state dict (that call multiplies
    by the swapped-in weight_q), moved by .to() / .double() (bias cast back to fp32), copied and then
    edited, given new data."""
    from torch.func import functional_call

    a = Int8Linear.from_float(nn.Linear(24, 9), activation="relu")
    b = Int8Linear.from_float(nn.Linear(24, 9), activation="relu")
    x = torch.randn(5, 24)

    def expected(m):
        return int8_linear(x, m.weight_q, m.weight_scale, m.bias, activation="relu", backend="reference")

    with torch.no_grad():
        torch.testing.assert_close(functional_call(a, b.state_dict(), (x,)), expected(b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(x), expected(a), rtol=1e-5, atol=1e-5)  # a's own weights again
        a.weight_q.neg_()
        a.bias.zero_()
        torch.testing.assert_close(a(x), expected(a), rtol=1e-5, atol=1e-5)
        moved = copy.deepcopy(a).double()
        assert moved.bias.dtype == torch.float64 and moved._packed_is_current()
        torch.testing.assert_close(moved(x), expected(a), rtol=1e-5, atol=1e-5)
        for clone in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
            assert clone._packed_is_current()
            torch.testing.assert_close(clone(x), expected(a), rtol=1e-5, atol=1e-5)
        # a copy's version counter starts again: an edit that brings it to the recorded number is
        # still seen (the data pointer moved); so is new data under the same tensor
        a.load_state_dict(b.state_dict())
        for clone in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
            clone.weight_q.zero_()
            torch.testing.assert_close(clone(x), expected(clone), rtol=1e-5, atol=1e-5)
        a.weight_q.data = -a.weight_q
        torch.testing.assert_close(a(x), expected(a), rtol=1e-5, atol=1e-5)
        shared = copy.deepcopy(a)
        shared(x)  # (a copy's data is elsewhere: its first call repacks once)
        packed = shared.weight_packed
        shared.share_memory()  # in place: the shared packed buffer is the one kept
        assert shared.weight_packed is packed and packed.is_shared()


def test_packed_weight_is_never_taken_for_a_freed_weights_successor():
    """A freed weight's address (and version number) can come back: a module saved and loaded
    whole in the same process, or `.data` given new storage twice. The record now holds the
    storage weakly, which cannot come back (it held the address: 13-27 of 30 loads and 9-97 of
    100 reassignments were stale)."""
    x = torch.randn(4, 64)

    def expected(m):
        return int8_linear(x, m.weight_q, m.weight_scale, m.bias, backend="reference")

    with torch.no_grad():
        for _ in range(30):
            m = Int8Linear.from_float(nn.Linear(64, 32))
            m(x)
            m.weight_q.copy_(torch.randint(-127, 128, m.weight_q.shape, dtype=torch.int8))
            buf = io.BytesIO()
            torch.save(m, buf)
            del m
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
            torch.testing.assert_close(loaded(x), expected(loaded), rtol=1e-5, atol=1e-5)
        m = Int8Linear.from_float(nn.Linear(64, 32))
        for _ in range(30):
            m(x)
            new = torch.randint(-127, 128, m.weight_q.shape, dtype=torch.int8)
            m.weight_q.data = torch.zeros(0, 64, dtype=torch.int8)  # frees the storage that was packed
            m.weight_q.data = new
            torch.testing.assert_close(m(x), expected(m), rtol=1e-5, atol=1e-5)


def test_replaced_weight_is_not_kept_and_a_parametrized_one_is_used():
    import weakref
    from torch.nn.utils import parametrize

    m = Int8Linear.from_float(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    with torch.no_grad():
        m(x)
        old = weakref.ref(m.weight_q)
        m.weight_q = -m.weight_q  # replaced for good: the next call packs it
        assert old() is None
        torch.testing.assert_close(m(x), int8_linear(x, m.weight_q, m.weight_scale, m.bias, backend="reference"),
                                   rtol=1e-5, atol=1e-5)
        assert m._packed_is_current()

        class Negate(nn.Module):
            def forward(self, w):
                return -w

        parametrize.register_parametrization(m, "weight_q", Negate())  # weight_q leaves _buffers (a KeyError)
        torch.testing.assert_close(m(x), int8_linear(x, m.weight_q, m.weight_scale, m.bias, backend="reference"),
                                   rtol=1e-5, atol=1e-5)


def test_an_edit_made_while_packing_is_seen_by_the_next_call(monkeypatch):
    # another thread's in-place edit that lands while repack() packs: the pack holds the old
    # weights, so the record must be the one taken before packing (it was taken after: the
    # stale pack was marked current for good)
    import recsys_kernels.nn.linear as linear_module

    layer = Int8Linear.from_float(nn.Linear(24, 9))
    x = torch.randn(3, 24)
    pack = linear_module.pack_weight_int8

    def pack_then_edit(weight_q):
        packed = pack(weight_q)
        with torch.no_grad():
            weight_q.neg_()  # the concurrent edit, finished before the record is written
        return packed

    monkeypatch.setattr(linear_module, "pack_weight_int8", pack_then_edit)
    layer.repack()
    monkeypatch.setattr(linear_module, "pack_weight_int8", pack)
    with torch.no_grad():
        expected = int8_linear(x, layer.weight_q, layer.weight_scale, layer.bias, backend="reference")
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_eager_fast_path_matches_the_dispatched_op():
    # In plain eager inference Int8Linear calls the CPU kernel below the op's autograd wrapper;
    # under a dispatch mode (here one that records the ops it sees) it must go through the op.
    from torch.utils._python_dispatch import TorchDispatchMode
    from recsys_kernels.ops.int8_matmul import PACKED_CPU_KERNEL

    if not PACKED_CPU_KERNEL:
        pytest.skip("the C++ CPU kernel of int8_linear_packed is not built")

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    q = Int8Linear.from_float(nn.Linear(33, 17), activation="relu")
    for x in (torch.randn(5, 33), torch.randn(2, 3, 33), torch.randn(33), torch.randn(0, 33), torch.randn(2, 0, 33)):
        with torch.no_grad():
            fast = q(x)
            with Recorder() as rec:
                slow = q(x)
        assert torch.ops.recsys_kernels.int8_linear_packed.default in rec.ops
        assert fast.shape == (*x.shape[:-1], 17) and torch.equal(fast, slow)
        assert torch.equal(fast, int8_linear(x, q.weight_q, q.weight_scale, q.bias, activation="relu"))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated, still in use
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_op():
    # torch.jit.trace records what reaches the dispatcher's Tracer key: the eager fast path must
    # not skip it (it did, and the traced module returned an uninitialised tensor).
    q = Int8Linear.from_float(nn.Linear(16, 8), activation="relu")
    with torch.no_grad():
        traced = torch.jit.trace(q, torch.randn(4, 16), check_trace=False)
        for x in (torch.randn(4, 16), torch.randn(4, 16) * 3):
            assert torch.equal(traced(x), q(x))
    assert "recsys_kernels::int8_linear" in str(traced.graph)


def test_vmap_matches_a_loop():
    # Under torch.vmap the inputs are batched tensors of the plain Tensor type: the fast path must
    # leave them to the dispatcher (it fed them to the kernel: "tensor that doesn't have storage").
    q = Int8Linear.from_float(nn.Linear(16, 8))
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.equal(torch.vmap(q)(x), torch.stack([q(xi) for xi in x]))


def test_under_a_device_context():
    q = Int8Linear.from_float(nn.Linear(16, 8))
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = q(x)
        with torch.device("cpu"):  # a torch-function mode: the call goes through the dispatcher
            assert torch.equal(q(x), expected)
