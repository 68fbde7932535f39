"""embedding_bag_grouped: every backend against the loop of embedding_bag's reference (mixed table
formats and dims, modes, index dtypes per lookup, per-sample weights, padding, bounds, empty
inputs), the value errors of embedding_bag in a later lookup, front-door checks, a table shared
by two lookups, gradients against the per-table loop, opcheck and torch.compile. Triton runs
under TRITON_INTERPRET=1 on CPU tensors without a GPU: shapes are small."""
import functools

import pytest
import torch

import recsys_kernels as rk
from helpers import backend_params
from recsys_kernels import _backend
from recsys_kernels.ops.embedding import embedding_bag
from recsys_kernels.ops.embedding_grouped import embedding_bag_grouped
from recsys_kernels.ops.rowwise import quantize_rowwise

PARAMS = backend_params("embedding_bag_grouped")
F32 = torch.float32


def bags(n_bags, n_rows, max_len=4, lo=0, hi=None, dtype=torch.int64):
    lengths = torch.randint(0, max_len + 1, (n_bags,))
    if n_bags > 1:
        lengths[1] = 0  # always an empty bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(lo, n_rows if hi is None else hi, (int(offsets[-1]),))
    return indices.to(dtype), offsets.to(dtype)


def table(kind, n, d):
    """A table of `kind` ("float32", "float16", "bfloat16", "int8", "int4") and its bits."""
    w = torch.randn(n, d) * torch.rand(n, 1) * 3
    if kind in ("int8", "int4"):
        bits = 8 if kind == "int8" else 4
        return quantize_rowwise(w, bits), bits
    return w.to(getattr(torch, kind)), 8


def loop_reference(weights, indices, offsets, psws, modes, pads, bits, bounds="raise", output_dtype=None):
    """The definition: embedding_bag's reference per lookup in fp32, side by side, cast once."""
    cols = [embedding_bag(w, i, o, per_sample_weights=p, mode=m, padding_idx=pad, bounds=bounds, bits=b,
                          output_dtype=F32, backend="reference")
            for w, i, o, p, m, pad, b in zip(weights, indices, offsets, psws, modes, pads, bits)]
    if output_dtype is None:  # the promotion of what each embedding_bag returns
        output_dtype = functools.reduce(torch.promote_types, [F32 if w.dtype == torch.uint8 else w.dtype
                                                              for w in weights])
    return torch.cat(cols, 1).to(output_dtype)


def run(device, backend, weights, indices, offsets, psws=None, **kw):
    mv = lambda ts: None if ts is None else [None if t is None else t.to(device) for t in ts]  # noqa: E731
    out = embedding_bag_grouped(mv(weights), mv(indices), mv(offsets), per_sample_weights=mv(psws),
                                backend=backend, **kw)
    return out.cpu()


def mixed_case(n_bags=6, bounds="raise", index_dtypes=(torch.int64, torch.int32)):
    """Tables of every format and D in {1, 3, 8, 64, 129}, every mode, padding, psw, mixed index
    dtypes. Returns the grouped call's arguments as lists."""
    spec = [("float32", 7, 3, "sum", True, None), ("float16", 9, 8, "mean", False, 2),
            ("bfloat16", 6, 129, "max", False, None), ("int8", 5, 64, "sum", True, 1),
            ("int4", 4, 8, "mean", False, None), ("float32", 3, 1, "max", False, 0),
            ("int8", 8, 3, "max", False, None), ("bfloat16", 5, 8, "sum", True, 4)]
    weights, bits, indices, offsets, psws, modes, pads = [], [], [], [], [], [], []
    for k, (kind, n, d, mode, weighted, pad) in enumerate(spec):
        w, b = table(kind, n, d)
        lo, hi = (0, n) if bounds == "raise" else (-2, n + 2)
        i, o = bags(n_bags, n, lo=lo, hi=hi, dtype=index_dtypes[k % len(index_dtypes)])
        weights.append(w)
        bits.append(b)
        indices.append(i)
        offsets.append(o)
        psws.append(torch.rand(i.numel()) * 2 - 0.5 if weighted else None)
        modes.append(mode)
        pads.append(pad)
    return weights, indices, offsets, psws, modes, pads, bits


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("bounds", ["raise", "zero", "clamp"])
@pytest.mark.parametrize("index_dtypes", [(torch.int64, torch.int32), (torch.int32,)])
def test_mixed_formats_match_loop(device, backend, bounds, index_dtypes):
    weights, indices, offsets, psws, modes, pads, bits = mixed_case(bounds=bounds, index_dtypes=index_dtypes)
    got = run(device, backend, weights, indices, offsets, psws, modes=modes, padding_idx=pads, bits=bits,
              bounds=bounds)
    expected = loop_reference(weights, indices, offsets, psws, modes, pads, bits, bounds)
    assert got.dtype == F32 and got.shape == (6, 3 + 8 + 129 + 64 + 8 + 1 + 3 + 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("output_dtype", [torch.float16, torch.bfloat16])
def test_output_dtype(device, backend, output_dtype):
    weights, indices, offsets, psws, modes, pads, bits = mixed_case(n_bags=4)
    got = run(device, backend, weights, indices, offsets, psws, modes=modes, padding_idx=pads, bits=bits,
              output_dtype=output_dtype)
    assert got.dtype == output_dtype
    # computed in fp32, rounded once: the fp32 result rounded
    expected = loop_reference(weights, indices, offsets, psws, modes, pads, bits).to(output_dtype)
    if backend == "reference":
        assert torch.equal(got, expected)
    else:  # another summation order, then one rounding: within one ulp of the output dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("output_dtype", [F32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bounds", ["raise", "zero"])
def test_a_lookup_of_no_columns(device, backend, output_dtype, bounds):
    # D = 0 among other lookups: no columns, its indices still checked (the CPU kernel divided by
    # D when staging a non-fp32 output: SIGFPE)
    empty, other = torch.randn(5, 0), torch.randn(5, 4)
    i, o = torch.tensor([0, 1, 4], dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32)
    got = run(device, backend, [other, empty, other], [i, i, i], [o, o, o], output_dtype=output_dtype,
              bounds=bounds)
    expected = loop_reference([other, empty, other], [i] * 3, [o] * 3, [None] * 3, ["sum"] * 3, [None] * 3,
                              [8] * 3, bounds, output_dtype)
    assert got.shape == (2, 8)
    torch.testing.assert_close(got, expected, rtol=8e-3, atol=8e-3)
    if bounds == "raise":
        with pytest.raises(IndexError, match="index 5"):
            run(device, backend, [other, empty], [i, i + 1], [o, o], output_dtype=output_dtype)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_default_output_dtype_is_the_promotion(device, backend):
    i, o = bags(3, 5)
    w16, wb16 = torch.randn(5, 4).half(), torch.randn(5, 2).bfloat16()
    out = run(device, backend, [w16, w16], [i, i], [o, o])
    assert out.dtype == torch.float16  # every lookup fp16: what embedding_bag returns
    torch.testing.assert_close(out, torch.cat([embedding_bag(w16, i, o)] * 2, 1), rtol=1e-3, atol=1e-3)
    assert run(device, backend, [w16, wb16], [i, i], [o, o]).dtype == F32  # fp16 + bf16 -> fp32
    assert run(device, backend, [wb16, quantize_rowwise(torch.randn(5, 4))], [i, i], [o, o]).dtype == F32


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_each_mode_with_padding_and_bounds(device, backend, mode):
    weights = [torch.randn(6, 3), torch.randn(4, 5).half(), quantize_rowwise(torch.randn(5, 8), 4)]
    bits = [8, 8, 4]
    for bounds in ("zero", "clamp"):
        io = [bags(5, w.shape[0], lo=-2, hi=w.shape[0] + 2) for w in weights]
        for i, _ in io:
            if i.numel():
                i[0] = 1  # the padding row shows up
        psws = [torch.rand(i.numel()) if mode == "sum" else None for i, _ in io]
        got = run(device, backend, weights, [i for i, _ in io], [o for _, o in io], psws, modes=mode, padding_idx=1,
                  bits=bits, bounds=bounds)
        expected = loop_reference(weights, [i for i, _ in io], [o for _, o in io], psws, [mode] * 3, [1] * 3, bits,
                                  bounds)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_negative_padding_idx_and_lengths_and_2d_indices(device, backend):
    w0, w1 = torch.randn(6, 3), torch.randn(5, 4)
    i0, o0 = bags(4, 6)
    i1 = torch.randint(0, 5, (4, 2))  # [B, L]: one bag per row
    lengths0 = o0[1:] - o0[:-1]
    got = embedding_bag_grouped([w0.to(device), w1.to(device)], [i0.to(device), i1.to(device)],
                                lengths=[lengths0.to(device), None], padding_idx=[-1, None], backend=backend).cpu()
    expected = torch.cat([embedding_bag(w0, i0, o0, padding_idx=5), embedding_bag(w1, i1)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_empty_batch_and_empty_bags(device, backend, mode):
    weights = [torch.randn(5, 3), quantize_rowwise(torch.randn(4, 8), 8)]
    none = torch.zeros(0, dtype=torch.long)
    out = run(device, backend, weights, [none, none.int()], [torch.zeros(1, dtype=torch.long),
                                                             torch.zeros(1, dtype=torch.int32)], modes=mode)
    assert out.shape == (0, 11) and out.dtype == F32  # B = 0
    out = run(device, backend, weights, [none, none], [torch.zeros(4, dtype=torch.long)] * 2, modes=mode)
    assert torch.equal(out, torch.zeros(3, 11))  # nnz = 0: every bag empty
    # an empty table (bounds="zero") and bags of only padding / out-of-range indices
    out = run(device, backend, [torch.randn(0, 2), torch.randn(5, 3)], [torch.tensor([0, 4]), torch.tensor([1, 7])],
              [torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])], modes=mode, padding_idx=[None, 1], bounds="zero")
    assert torch.equal(out, torch.zeros(2, 5))
    # max of negative rows is negative, not the empty-bag 0
    neg = -torch.rand(4, 3) - 1
    out = run(device, backend, [neg], [torch.tensor([0, 2])], [torch.tensor([0, 2])], modes=mode)
    assert (out < 0).all()


@pytest.mark.parametrize("device,backend", PARAMS)
def test_shared_table(device, backend):
    w = torch.randn(8, 5)
    (i0, o0), (i1, o1) = bags(4, 8), bags(4, 8, dtype=torch.int32)
    got = run(device, backend, [w, w], [i0, i1], [o0, o1], modes=["sum", "max"])
    torch.testing.assert_close(got, torch.cat([embedding_bag(w, i0, o0), embedding_bag(w, i1, o1, mode="max")], 1))


# ----------------------------------------------------------------------------- value errors
def _bad_lookup(kind):
    """(weight, indices, offsets, bits, bounds) of a lookup embedding_bag rejects."""
    w = torch.randn(5, 4)
    idx = torch.tensor([0, 1, 2, 3])
    if kind == "offsets0":
        return w, idx, torch.tensor([1, 2, 3, 4]), 8, "raise"
    if kind == "decreasing":
        return w, idx, torch.tensor([0, 3, 2, 4]), 8, "raise"
    if kind == "last":
        return w, idx, torch.tensor([0, 2, 3, 3]), 8, "raise"
    if kind == "index":
        return w, torch.tensor([0, 9, 2, 3]).int(), torch.tensor([0, 1, 2, 4]).int(), 8, "raise"
    if kind == "negative_index":
        return w, torch.tensor([0, 1, -1, 3]), torch.tensor([0, 1, 2, 4]), 8, "raise"
    if kind == "clamp_empty":
        return torch.randn(0, 4), idx, torch.tensor([0, 1, 2, 4]), 8, "clamp"
    if kind == "clamp_empty_and_offsets":  # the offsets error comes first
        return torch.randn(0, 4), idx, torch.tensor([0, 3, 2, 4]), 8, "clamp"
    if kind in ("scale8", "scale4"):
        bits = 8 if kind == "scale8" else 4
        packed = quantize_rowwise(torch.randn(5, 4), bits)
        tail = packed[:, 4:] if bits == 8 else packed[:, 2:]
        row = tail[2].clone().view(F32 if bits == 8 else torch.float16)
        row[0] = float("inf")
        tail[2] = row.view(torch.uint8)
        return packed, idx, torch.tensor([0, 1, 2, 4]), bits, "raise"
    raise AssertionError(kind)


KINDS = ["offsets0", "decreasing", "last", "index", "negative_index", "clamp_empty", "clamp_empty_and_offsets",
         "scale8", "scale4"]


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_value_errors_of_a_later_lookup(device, backend, kind):
    w, idx, off, bits, bounds = _bad_lookup(kind)
    with pytest.raises((ValueError, IndexError)) as theirs:
        embedding_bag(w, idx, off, bits=bits, bounds=bounds, backend="reference")
    # lookups 0 and 1 are fine; lookup 2 is the bad one, lookup 3 is fine; every offsets has B+1 = 4
    good = [(torch.randn(5, 4), *bags(3, 5)) for _ in range(3)]
    weights = [good[0][0], good[1][0], w, good[2][0]]
    indices = [good[0][1], good[1][1].int(), idx, good[2][1]]
    offsets = [good[0][2], good[1][2].int(), off, good[2][2]]
    with pytest.raises(type(theirs.value)) as ours:
        run(device, backend, weights, indices, offsets, bits=[8, 8, bits, 8], bounds=bounds)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_first_bad_lookup_wins(device, backend):
    # errors found on the device (bad index, bad offsets) in lookup 0 and one found from the
    # shapes alone (clamping into the empty table of lookup 1): the error is the first lookup's
    off = torch.tensor([0, 1, 2])
    weights = [torch.randn(5, 3), torch.randn(0, 3)]
    with pytest.raises(IndexError, match="index 7 "):
        run(device, backend, weights, [torch.tensor([7, 0]), torch.tensor([0, 0])], [off, off])
    with pytest.raises(IndexError, match="empty table"):
        run(device, backend, weights, [torch.tensor([4, 0]), torch.tensor([0, 0])], [off, off], bounds="clamp")
    with pytest.raises(ValueError, match=r"offsets\[0\] must be 0"):
        run(device, backend, weights, [torch.tensor([4, 0]), torch.tensor([0, 0])],
            [torch.tensor([1, 1, 2]), off], bounds="clamp")


# ----------------------------------------------------------------------------- front door
W, I, O = torch.randn(5, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weights=[]), ValueError, "at least one"),
    (dict(weights=W), TypeError, "lists"),
    (dict(indices=[I]), ValueError, "indices"),
    (dict(offsets=[O]), ValueError, "offsets"),
    (dict(weights=[W, W.double()]), TypeError, "lookup 1: .*float64"),
    (dict(weights=[W, torch.randint(0, 3, (5, 4))]), TypeError, "lookup 1: weight"),
    (dict(indices=[I, I.float()]), TypeError, "lookup 1: indices"),
    (dict(offsets=[O, torch.tensor([0, 3])]), ValueError, "same number of bags"),
    (dict(modes=["sum", "median"]), ValueError, "lookup 1: mode"),
    (dict(modes=["sum"]), ValueError, "modes"),
    (dict(modes=3), TypeError, "modes"),
    (dict(padding_idx=[None, 5]), ValueError, "lookup 1: padding_idx"),
    (dict(bits=[8, 3]), ValueError, "lookup 1: bits"),
    (dict(sparse=[False, "yes"]), TypeError, "lookup 1: sparse"),
    (dict(per_sample_weights=[None, torch.ones(3)], modes=["sum", "mean"]), ValueError,
     "lookup 1: per_sample_weights"),
    (dict(per_sample_weights=[None, torch.ones(4)]), ValueError, "lookup 1: per_sample_weights"),
    (dict(bounds="wrap"), ValueError, "bounds"),
    (dict(output_dtype=torch.float64), TypeError, "output_dtype"),
    (dict(indices=[I, I.to("meta")]), ValueError, "device"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(weights=[W, W], indices=[I, I], offsets=[O, O])
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        embedding_bag_grouped(args.pop("weights"), args.pop("indices"), args.pop("offsets"), **args)


@pytest.mark.parametrize("short", range(1, 8))
@pytest.mark.parametrize("device,backend", backend_params("embedding_bag_grouped", include_reference=False))
def test_raw_op_checks_every_list_length(device, backend, short):
    """The op called directly (no front door): a per-lookup list one entry short raises the front
    door's message, naming the list."""
    names = ["weights", "indices", "offsets", "per_sample_weights", "modes", "padding_idx", "bits", "sparse"]
    args = [[W, W], [I, I], [O, O], [None, None], ["sum", "sum"], [-1, -1], [8, 8], [False, False]]
    args[short] = args[short][:1]
    args = [[t.to(device) if isinstance(t, torch.Tensor) else t for t in a] for a in args]
    op = torch.ops.recsys_kernels.embedding_bag_grouped_triton if backend == "triton" else \
        torch.ops.recsys_kernels.embedding_bag_grouped
    with pytest.raises(ValueError, match=rf"^{names[short]} must have one entry per lookup \(2\), got 1$"):
        op(*args, "raise", torch.float32)


def test_quantized_table_has_no_gradient():
    packed = quantize_rowwise(torch.randn(5, 8))
    with pytest.raises(NotImplementedError, match="lookup 1: .*inference only"):
        embedding_bag_grouped([W, packed], [I, I], [O, O], per_sample_weights=[None, torch.ones(3, requires_grad=True)])
    # the raw op (no front door) raised nothing: the weights' gradient was silently None
    for op in (torch.ops.recsys_kernels.embedding_bag_grouped, torch.ops.recsys_kernels.embedding_bag_grouped_reference):
        out = op([packed], [I], [O], [torch.ones(3, requires_grad=True)], ["sum"], [-1], [8], [False], "raise", F32)
        with pytest.raises(NotImplementedError, match="inference only"):
            out.sum().backward()


@pytest.mark.parametrize("device,backend", PARAMS)
def test_skipped_index_weight_and_integer_scalars(device, backend):
    """An inf / NaN per-sample weight at a skipped index (padding, out of range under "zero")
    contributes nothing (embedding_bag's rule); padding_idx and bits may be numpy integers."""
    import numpy as np

    w0, w1 = torch.randn(6, 3), torch.randn(5, 4)
    i0, o0 = torch.tensor([0, 1, 9, 2]), torch.tensor([0, 3, 4])
    psw = torch.tensor([float("inf"), 2.0, float("nan"), 3.0])
    got = embedding_bag_grouped([w0.to(device), w1.to(device)], [i0.to(device), i0.clamp(max=4).to(device)],
                                [o0.to(device)] * 2, per_sample_weights=[psw.to(device), None],
                                padding_idx=np.int64(0), bits=np.int32(8), bounds="zero", backend=backend).cpu()
    expected = torch.cat([torch.stack([2.0 * w0[1], 3.0 * w0[2]]),
                          embedding_bag(w1, i0.clamp(max=4), o0, padding_idx=0)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_backend_selection():
    assert _backend.resolve("embedding_bag_grouped", "cpu", "auto")[0] in ("cpu", "reference")
    prev = rk.set_backend("reference")
    try:
        torch.testing.assert_close(rk.embedding_bag_grouped([W], [I], [O]), embedding_bag(W, I, O))
    finally:
        rk.set_backend(prev)


# ----------------------------------------------------------------------------- autograd
def _grads(fn, leaves):
    out = fn()
    g_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    gs = torch.autograd.grad(out, leaves, g_out, allow_unused=True)
    return out, [None if g is None else (g.to_dense() if g.is_sparse else g).cpu() for g in gs], \
        [g is not None and g.is_sparse for g in gs]


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("all_weighted", [True, False])
def test_grads_match_per_table_loop(device, backend, all_weighted):
    # float tables of three dtypes, a quantized one, a table shared by two lookups, sparse and
    # dense, every mode; per-sample weights on every lookup (one Tensor[] in autograd) or on some
    # (the per-lookup path keeps their gradients)
    base = [torch.randn(8, 4), torch.randn(6, 3).half(), torch.randn(5, 8).bfloat16()]
    packed = quantize_rowwise(torch.randn(4, 8))
    idx = [bags(5, n, max_len=5, dtype=dt) for n, dt in ((8, torch.int64), (6, torch.int32), (5, torch.int64),
                                                          (4, torch.int64), (8, torch.int32))]
    modes = ["sum", "sum" if all_weighted else "mean", "sum" if all_weighted else "max", "sum", "sum"]
    sparse = [False, True, False, False, True]
    psw_base = [torch.rand(i.numel()) if m == "sum" and (all_weighted or k != 3) else None
                for k, ((i, _), m) in enumerate(zip(idx, modes))]
    pads = [1, None, 2, None, None]
    results = []
    for impl in ("grouped", "loop"):
        ws = [b.clone().to(device).requires_grad_() for b in base]
        # (the quantized lookup 3's weights cannot require grad: inference only)
        psw = [None if p is None else p.clone().to(device).requires_grad_(k != 3) for k, p in enumerate(psw_base)]
        tables = [ws[0], ws[1], ws[2], packed.to(device), ws[0]]  # ws[0] serves lookups 0 and 4
        bits = [8] * 5
        ii = [i.to(device) for i, _ in idx]
        oo = [o.to(device) for _, o in idx]
        if impl == "grouped":
            def fn():
                return embedding_bag_grouped(tables, ii, oo, per_sample_weights=psw, modes=modes, padding_idx=pads,
                                             bits=bits, sparse=sparse, backend=backend)
        else:
            def fn():
                return torch.cat([embedding_bag(t, i, o, per_sample_weights=p, mode=m, padding_idx=pad, bits=b,
                                                sparse=s, output_dtype=F32, backend="reference")
                                  for t, i, o, p, m, pad, b, s in zip(tables, ii, oo, psw, modes, pads, bits, sparse)],
                                 1)
        leaves = ws + [p for p in psw if p is not None and p.requires_grad]
        results.append(_grads(fn, leaves))
    (out_g, grads_g, sparse_g), (out_l, grads_l, sparse_l) = results
    torch.testing.assert_close(out_g.cpu(), out_l.cpu(), rtol=1e-5, atol=1e-5)
    assert sparse_g == sparse_l
    for g, e in zip(grads_g, grads_l):
        assert g is not None and g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-2, atol=1e-2)  # fp16/bf16 grads: other order


@pytest.mark.parametrize("device,backend", PARAMS)
def test_gradcheck_fp32(device, backend):
    w0 = torch.randn(6, 3, device=device, requires_grad=True)
    w1 = torch.randn(5, 2, device=device, requires_grad=True)
    i0, o0 = bags(4, 6, max_len=3)
    i1, o1 = bags(4, 5, max_len=3, dtype=torch.int32)
    p0 = torch.rand(i0.numel(), device=device, requires_grad=True)
    p1 = torch.rand(i1.numel(), device=device, requires_grad=True)
    ii, oo = [i0.to(device), i1.to(device)], [o0.to(device), o1.to(device)]
    assert torch.autograd.gradcheck(
        lambda a, b, pa, pb: embedding_bag_grouped([a, b], ii, oo, per_sample_weights=[pa, pb], padding_idx=[1, None],
                                                   bounds="clamp", backend=backend),
        (w0, w1, p0, p1), eps=1e-2, atol=5e-3, rtol=5e-3)


def test_no_grad_needed_for_quantized_only():
    packed = quantize_rowwise(torch.randn(5, 8))
    w = torch.randn(5, 4, requires_grad=True)
    out = embedding_bag_grouped([packed, w], [I, I], [O, O])
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 1, 1, 0, 0])[:, None].expand(5, 4))  # rows 0, 1, 2 once


# ----------------------------------------------------------------------------- opcheck / compile
def _opcheck_cases(device):
    idx, off = torch.tensor([0, 3, 3, 1, 4], device=device), torch.tensor([0, 2, 2, 5], device=device)
    w = torch.randn(5, 4, device=device, requires_grad=True)
    w16 = torch.randn(6, 3, device=device).half().requires_grad_()
    packed = quantize_rowwise(torch.randn(5, 8), 4).to(device)
    psw = torch.rand(5, device=device, requires_grad=True)
    return [
        ([w, w16], [idx, idx.int()], [off, off.int()], [psw, None], ["sum", "mean"], [-1, 2], [8, 8], [False, True],
         "raise", torch.float32),
        ([w, packed, w], [idx, idx, idx], [off, off, off], [None, None, None], ["max", "sum", "mean"], [3, -1, -1],
         [8, 4, 8], [False, False, False], "clamp", torch.bfloat16),
        ([w], [idx[:0]], [torch.zeros(1, dtype=torch.long, device=device)], [None], ["max"], [-1], [8], [False],
         "zero", torch.float16),
    ]


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("case", range(3))
def test_opcheck(device, backend, case):
    op = _backend.resolve("embedding_bag_grouped", device, backend)[1]
    torch.library.opcheck(op, _opcheck_cases(device)[case])


@pytest.mark.parametrize("device,backend", PARAMS)
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    weights = [torch.randn(9, 5, device=device), torch.randn(7, 3, device=device).half(),
               quantize_rowwise(torch.randn(6, 8)).to(device)]
    io = [bags(4, w.shape[0]) for w in weights]
    idx = [i.to(device) for i, _ in io]
    off = [o.to(device) for _, o in io]
    psw = torch.rand(idx[0].numel(), device=device)

    @torch.compile(fullgraph=True)
    def f(weights, idx, off, psw):
        return embedding_bag_grouped(weights, idx, off, per_sample_weights=[psw, None, None],
                                     modes=["sum", "max", "mean"], padding_idx=[-1, None, 0], backend=backend) * 2

    got = f(weights, idx, off, psw)
    expected = embedding_bag_grouped(weights, idx, off, per_sample_weights=[psw, None, None],
                                     modes=["sum", "max", "mean"], padding_idx=[-1, None, 0], backend="reference") * 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    bad = [i.clone() for i in idx]
    bad[1][0] = 7
    with pytest.raises(IndexError, match="index 7 "):  # the value checks survive compilation
        f(weights, bad, off, psw)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_compile_backward(device, backend):
    torch._dynamo.reset()
    w0 = torch.randn(9, 5, device=device, requires_grad=True)
    w1 = torch.randn(4, 2, device=device, requires_grad=True)
    (i0, o0), (i1, o1) = bags(4, 9), bags(4, 4)
    ii, oo = [i0.to(device), i1.to(device)], [o0.to(device), o1.to(device)]

    def loss(a, b, backend):
        return embedding_bag_grouped([a, b], ii, oo, modes=["mean", "max"], backend=backend).square().sum()

    g = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(w0, w1, backend), [w0, w1])
    g_ref = torch.autograd.grad(loss(w0, w1, "reference"), [w0, w1])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_triton_column_blocks_and_task_loop(monkeypatch):
    # D = 300 takes two column blocks (tasks) of one lookup; with grid axis 1 capped at 2
    # programs, each program walks several tasks
    if "triton" not in _backend.available_backends("embedding_bag_grouped", "cpu"):
        pytest.skip("the triton backend does not run on CPU tensors here")
    from recsys_kernels._triton import embedding_bag_grouped as kernels
    monkeypatch.setattr(kernels, "MAX_GRID_Y", 2)
    weights = [torch.randn(6, 300), quantize_rowwise(torch.randn(5, 8), 4), torch.randn(4, 1).half()]
    bits = [8, 4, 8]
    io = [bags(3, w.shape[0]) for w in weights]
    args = ([i for i, _ in io], [o for _, o in io])
    for mode in ("sum", "mean", "max"):
        got = embedding_bag_grouped(weights, *args, modes=mode, bits=bits, backend="triton")
        expected = loop_reference(weights, *args, [None] * 3, [mode] * 3, [None] * 3, bits)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_grad", [False, True])
def test_direct_call_equals_the_checked_call(monkeypatch, with_grad):
    """Plain CPU calls go from the front door to the C++ op without the per-lookup checks
    (embedding_grouped._direct_op), FusedEmbeddingBagCollection's too: the same output and
    gradients as through the checks (taken here by passing lengths instead of offsets), the same
    out-of-range error, and prepare_lookup never runs."""
    import recsys_kernels.ops.embedding_grouped as grouped_code
    from recsys_kernels import _backend
    if "cpu" not in _backend.available_backends("embedding_bag_grouped", "cpu"):
        pytest.skip("no C++ extension")
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(10, 8, generator=g), torch.randn(6, 3, generator=g).bfloat16(),
               quantize_rowwise(torch.randn(5, 8, generator=g), 4)]
    if with_grad:
        weights[0].requires_grad_()
    idx = [torch.randint(0, n, (7,), generator=g, dtype=dt) for n, dt in ((10, torch.int64), (6, torch.int32),
                                                                          (5, torch.int64))]
    csr = [torch.tensor([0, 2, 2, 7], dtype=i.dtype) for i in idx]
    kw = dict(modes=["sum", "mean", "max"], padding_idx=[1, None, 0], bits=[8, 8, 4])
    checked = grouped_code.embedding_bag_grouped(weights, idx, lengths=[o.diff() for o in csr], **kw)
    calls = []
    real = grouped_code.prepare_lookup
    monkeypatch.setattr(grouped_code, "prepare_lookup", lambda *a: calls.append(1) or real(*a))
    direct = grouped_code.embedding_bag_grouped(weights, idx, csr, **kw)
    assert not calls and torch.equal(direct.detach(), checked.detach()) and direct.dtype == checked.dtype
    if with_grad:
        assert torch.equal(torch.autograd.grad(direct.sum(), weights[0])[0],
                           torch.autograd.grad(checked.sum(), weights[0])[0])
    bad = [i.clone() for i in idx]
    bad[1][-1] = 6
    with pytest.raises(IndexError) as direct_error:
        grouped_code.embedding_bag_grouped(weights, bad, csr, **kw)
    assert not calls
    with pytest.raises(IndexError) as checked_error:
        grouped_code.embedding_bag_grouped(weights, bad, lengths=[o.diff() for o in csr], **kw)
    assert str(direct_error.value) == str(checked_error.value)
