"""embedding_bag on CPU: our C++ kernel against the peers a user would otherwise pick.

Shape A: a 1,000,000 x 128 table, B = 4096 bags of L = 32 uniform indices, mode="sum": memory-bound
random row gathers (the table is far larger than the caches). fp32 against F.embedding_bag (int64
and int32 indices), and the 8-bit / 4-bit row-wise tables against
torch.ops.quantized.embedding_bag_{byte,4bit}_rowwise_offsets (the same packed bytes); and in
every group torch.compile of our pure-PyTorch reference (what a user gets from Inductor).
Shape B: a 50,000 x 64 fp32 table with Zipf(1.05) indices, same B and L: hot rows stay cached.

bytes = the row bytes gathered (nnz x bytes per row) + the indices, offsets and output: the GB/s
column is the gather throughput. Shape B's hot rows come from cache, so it can pass the copy
bandwidth. The CPU path follows RECSYS_KERNELS_CPU_ISA (set it to "scalar" to time the fallback).

Run: pytest bench/bench_embedding_bag.py -q (add --benchmark-json=out.json to keep the numbers)."""
import functools
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import recsys_kernels as rk
from recsys_kernels import _backend

B, L = 4096, 32
SHAPE_A = (1_000_000, 128)
SHAPE_B = (50_000, 64)


@functools.cache
def _table(n, d):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g)


@functools.cache
def _packed(n, d, bits):
    return rk.quantize_rowwise(_table(n, d), bits)


@functools.cache
def _bags(n, dist):
    g = torch.Generator().manual_seed(1)
    if dist == "uniform":
        idx = torch.randint(0, n, (B * L,), generator=g)
    else:  # Zipf(1.05) over a shuffled vocabulary: hot rows scattered through the table
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.05
        idx = torch.randperm(n, generator=g)[torch.multinomial(p, B * L, replacement=True, generator=g)]
    return idx, torch.arange(B + 1) * L


@functools.cache
def _compiled_reference():
    from recsys_kernels.ops.embedding import _embedding_bag_ref

    def ref(w, i, o, bits=8):
        return _embedding_bag_ref(w, i, o, None, "sum", None, "raise", bits, None, False)
    return torch.compile(ref)


def _torch_quantized(packed, idx, off, bits):
    """torch's row-wise quantized embedding_bag (FBGEMM) on the same packed table, sum pooling."""
    op = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if bits == 8
          else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
    return op(packed, idx, off, mode=0, include_last_offset=True)


def _ours_available():
    return "cpu" in _backend.available_backends("embedding_bag", "cpu")


def _skip_unless_ours(impl):
    if impl in ("ours", "ours_int32") and not _ours_available():
        pytest.skip(_backend.availability("embedding_bag")["cpu"])


def _bytes(row_bytes, idx, out_bytes):
    return idx.numel() * row_bytes + idx.numel() * idx.element_size() + (B + 1) * idx.element_size() + out_bytes


def _fp32_case(run_bench, impl, shape, dist):
    """One fp32 sum-pooling case of `shape` with `dist` indices (int32 ones for impl "..._int32")."""
    _skip_unless_ours(impl)
    w = _table(*shape)
    idx, off = _bags(shape[0], dist)
    if impl.endswith("int32"):
        idx, off = idx.int(), off.int()
    if impl == "torch_compile_ref":
        fn = _compiled_reference()
    elif impl.startswith("torch"):
        def fn(w, i, o):
            return F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)
    else:
        def fn(w, i, o):
            return rk.embedding_bag(w, i, o, backend="reference" if impl == "reference" else "cpu")
        some_idx, some_off = idx[:128 * L], off[:129]  # the first 128 bags: enough to catch a wrong kernel
        expected = F.embedding_bag(some_idx, w, some_off, mode="sum", include_last_offset=True)
        torch.testing.assert_close(fn(w, some_idx, some_off), expected, rtol=1e-5, atol=1e-5)
    run_bench(fn, w, idx, off, bytes_moved=_bytes(shape[1] * 4, idx, B * shape[1] * 4),
              ops=idx.numel() * shape[1], shape=(*shape, B, L), impl=impl, peer=impl.startswith("torch"))


@pytest.mark.benchmark(group=f"embedding_bag sum fp32 {SHAPE_A[0]}x{SHAPE_A[1]} B={B} L={L} uniform",
                       min_rounds=5, max_time=1.0)
@pytest.mark.parametrize("impl", ["torch_int64", "torch_int32", "torch_compile_ref", "ours", "ours_int32"])
def test_fp32_uniform(run_bench, impl):
    _fp32_case(run_bench, impl, SHAPE_A, "uniform")


@pytest.mark.benchmark(group=f"embedding_bag sum row-wise quantized {SHAPE_A[0]}x{SHAPE_A[1]} B={B} L={L} uniform",
                       min_rounds=5, max_time=1.0)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("impl", ["torch_quantized", "torch_compile_ref", "ours"])
def test_quantized_uniform(run_bench, impl, bits):
    _skip_unless_ours(impl)
    packed = _packed(*SHAPE_A, bits)
    idx, off = _bags(SHAPE_A[0], "uniform")
    if impl == "torch_compile_ref":
        def fn(q, i, o):
            return _compiled_reference()(q, i, o, bits)
    elif impl == "torch_quantized":
        def fn(q, i, o):
            return _torch_quantized(q, i, o, bits)
    else:
        def fn(q, i, o):
            return rk.embedding_bag(q, i, o, bits=bits, backend="cpu")
    row_bytes = packed.shape[1]
    run_bench(fn, packed, idx, off, bytes_moved=_bytes(row_bytes, idx, B * SHAPE_A[1] * 4),
              ops=2 * idx.numel() * SHAPE_A[1], shape=(*SHAPE_A, B, L), impl=impl, bits=bits,
              peer=impl.startswith("torch"), case=f"int{bits}")


@pytest.mark.benchmark(group=f"embedding_bag sum fp32 {SHAPE_B[0]}x{SHAPE_B[1]} B={B} L={L} zipf",
                       min_rounds=5, max_time=1.0)
@pytest.mark.parametrize("impl", ["torch_int64", "torch_int32", "torch_compile_ref", "ours", "reference"])
def test_fp32_zipf(run_bench, impl):
    _fp32_case(run_bench, impl, SHAPE_B, "zipf")


@pytest.mark.parametrize("case", ["A_fp32_int64", "A_fp32_int32", "A_int8", "A_int4", "B_fp32_int64"])
def test_paired_vs_torch(paired_ratio, case):
    """The issue's forward ratios measured the steadier way (conftest's paired_ratio): torch's op
    and ours called in turn on the same inputs, the ratio taken per round."""
    _skip_unless_ours("ours")
    shape, dist = (SHAPE_A, "uniform") if case.startswith("A") else (SHAPE_B, "zipf")
    idx, off = _bags(shape[0], dist)
    if case.endswith("int32"):
        idx, off = idx.int(), off.int()
    if case.startswith("A_int"):
        bits = int(case[5:])
        table = _packed(*shape, bits)

        def peer():
            return _torch_quantized(table, idx, off, bits)
    else:
        bits, table = 8, _table(*shape)

        def peer():
            return F.embedding_bag(idx, table, off, mode="sum", include_last_offset=True)

    def ours():
        return rk.embedding_bag(table, idx, off, bits=bits, backend="cpu")

    torch.testing.assert_close(ours(), peer(), rtol=1e-4, atol=1e-4)
    paired_ratio(f"embedding_bag {case}", peer, {"ours": ours})


@pytest.mark.parametrize("n_bags", [1, 64])
def test_paired_serving_batches(paired_ratio, n_bags):
    """Serving-sized calls, where the per-call overhead counts: n_bags bags of 20 from each of 8
    tables of 100,000 x 64 fp32 rows, FusedEmbeddingBagCollection (one launch) against a loop of
    nn.EmbeddingBag modules and a concatenation, and one table's embedding_bag against
    F.embedding_bag. Inference (no_grad)."""
    _skip_unless_ours("ours")
    from recsys_kernels.nn import FusedEmbeddingBag, FusedEmbeddingBagCollection, TableConfig
    g = torch.Generator().manual_seed(3)
    n_tables, n_rows, dim, length = 8, 100_000, 64, 20
    coll = FusedEmbeddingBagCollection([TableConfig(f"t{i}", n_rows, dim) for i in range(n_tables)])
    bags = [torch.nn.EmbeddingBag(n_rows, dim, mode="sum", _weight=coll.embedding_bags[f"t{i}"].weight.detach())
            for i in range(n_tables)]
    feats = {f"t{i}": (torch.randint(0, n_rows, (n_bags * length,), generator=g), torch.arange(n_bags + 1) * length)
             for i in range(n_tables)}

    def loop():
        return torch.cat([bag(feats[f"t{i}"][0], feats[f"t{i}"][1][:-1]) for i, bag in enumerate(bags)], 1)

    w, (idx, off) = bags[0].weight, feats["t0"]
    with torch.no_grad():
        torch.testing.assert_close(coll(feats), loop(), rtol=1e-5, atol=1e-5)
        paired_ratio(f"FusedEmbeddingBagCollection 8 tables B={n_bags} L={length} vs nn.EmbeddingBag loop", loop,
                     {"ours": lambda: coll(feats)}, rounds=200)
        paired_ratio(f"embedding_bag 100000x64 B={n_bags} L={length} vs F.embedding_bag",
                     lambda: F.embedding_bag(idx, w, off, mode="sum", include_last_offset=True),
                     {"ours": lambda: rk.embedding_bag(w, idx, off, backend="cpu")}, rounds=200)
        # the drop-in module, called as nn.EmbeddingBag is (bag starts)
        fused = FusedEmbeddingBag.from_embedding_bag(bags[0])
        torch.testing.assert_close(fused(idx, off[:-1]), bags[0](idx, off[:-1]), rtol=1e-5, atol=1e-5)
        paired_ratio(f"FusedEmbeddingBag 100000x64 B={n_bags} L={length} vs nn.EmbeddingBag",
                     lambda: bags[0](idx, off[:-1]), {"ours": lambda: fused(idx, off[:-1])}, rounds=200)


@pytest.mark.parametrize("n_bags", [1, 64])
def test_paired_trainable_table(paired_ratio, n_bags):
    """The per-call cost with a gradient to record (a training step's lookup, or serving without
    no_grad): n_bags bags of 20 from a trainable 100,000 x 64 fp32 table, forward only, against
    F.embedding_bag. Here the op's autograd layer (Python) is the difference, not the kernel."""
    _skip_unless_ours("ours")
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(100_000, 64, generator=g).requires_grad_()
    idx = torch.randint(0, 100_000, (n_bags * 20,), generator=g)
    off = torch.arange(n_bags + 1) * 20
    torch.testing.assert_close(rk.embedding_bag(weight, idx, off, backend="cpu"),
                               F.embedding_bag(idx, weight, off, mode="sum", include_last_offset=True))
    paired_ratio(f"embedding_bag trainable 100000x64 B={n_bags} L=20 vs F.embedding_bag",
                 lambda: F.embedding_bag(idx, weight, off, mode="sum", include_last_offset=True),
                 {"ours": lambda: rk.embedding_bag(weight, idx, off, backend="cpu")}, rounds=400)


@functools.cache
def _grad_output(d):
    return torch.randn(B, d, generator=torch.Generator().manual_seed(2))


@pytest.mark.benchmark(group="embedding_bag backward sum fp32 B=4096 L=32", min_rounds=3, max_time=1.0)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("shape", ["A_uniform", "B_zipf"])
def test_fp32_backward(run_bench, shape, impl, sparse):
    """The weight gradient alone (autograd.grad on a kept graph): torch's embedding_bag backward
    against ours, dense ([N, D]) and sparse (torch's: one row per index; ours: one row per row read,
    coalesced, so each repeated row is summed here and not in the optimizer)."""
    _skip_unless_ours(impl)
    (n, d), dist = (SHAPE_A, "uniform") if shape == "A_uniform" else (SHAPE_B, "zipf")
    w = _table(n, d).clone().requires_grad_()
    idx, off = _bags(n, dist)
    if impl == "torch":
        out = F.embedding_bag(idx, w, off, mode="sum", include_last_offset=True, sparse=sparse)
    else:
        out = rk.embedding_bag(w, idx, off, sparse=sparse, backend="cpu")
    go = _grad_output(d)

    def fn(out, go):
        return torch.autograd.grad(out, w, go, retain_graph=True)[0]

    got = fn(out, go)
    want = torch.zeros_like(w).index_add_(0, idx, go.repeat_interleave(L, dim=0))
    torch.testing.assert_close(got.to_dense() if sparse else got, want, rtol=1e-4, atol=1e-4)
    grad_bytes = got._nnz() * (d * 4 + 8) if sparse else n * d * 4
    run_bench(fn, out, go, bytes_moved=go.numel() * 4 + idx.numel() * 8 + grad_bytes,
              ops=idx.numel() * d, shape=(n, d, B, L), impl=impl, sparse=sparse,
              peer=impl == "torch", case=f"{shape} {'sparse' if sparse else 'dense'}")


@pytest.mark.parametrize("case", ["A_dense_fp32", "A_dense_fp16", "A_dense_bf16", "A_sparse_fp32", "B_dense_fp32",
                                  "B_sparse_fp32"])
def test_paired_backward(paired_ratio, case):
    """The weight gradient alone (autograd.grad on a kept graph), torch's embedding_bag backward
    and ours in turn: dense in the table's dtype, or sparse (torch's one row per index, ours
    coalesced: fewer rows, each summed)."""
    _skip_unless_ours("ours")
    shape, kind, dtype = case.split("_")
    (n, d), dist = (SHAPE_A, "uniform") if shape == "A" else (SHAPE_B, "zipf")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    sparse = kind == "sparse"
    w = _table(n, d).to(dtype).requires_grad_()
    idx, off = _bags(n, dist)
    go = _grad_output(d).to(dtype)
    theirs = F.embedding_bag(idx, w, off, mode="sum", include_last_offset=True, sparse=sparse)
    ours = rk.embedding_bag(w, idx, off, sparse=sparse, backend="cpu")

    def grad(out):
        return lambda: torch.autograd.grad(out, w, go, retain_graph=True)[0]

    want, got = grad(theirs)(), grad(ours)()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.to_dense() if sparse else got, want.to_dense() if sparse else want,
                               rtol=tol, atol=tol)
    impls = {"ours": grad(ours)}
    if shape == "A" and dtype == torch.float32:  # gradients of 32 MiB or more: the huge-page policy both ways
        impls.update(ours_huge_pages=_with_env("RECSYS_KERNELS_HUGE_PAGES", "1", grad(ours)),
                     ours_4k_pages=_with_env("RECSYS_KERNELS_HUGE_PAGES", "0", grad(ours)))
    paired_ratio(f"embedding_bag backward {case}", grad(theirs), impls, rounds=7 if shape == "A" else 20)


def _with_env(name, value, fn):
    """fn called with the environment variable `name` set to `value` (the C++ ops read it per call)."""
    def call():
        with mock.patch.dict(os.environ, {name: value}):
            return fn()
    return call


@pytest.mark.parametrize("optimizer", ["SGD", "SparseAdam", "Adagrad"])
@pytest.mark.parametrize("shape", ["A_uniform", "B_zipf"])
def test_paired_sparse_training_step(paired_ratio, shape, optimizer):
    """A training step of a sparse-gradient table, the usual PyTorch recipe: nn.EmbeddingBag(
    sparse=True) + a sparse optimizer against FusedEmbeddingBag(sparse=True) + the same optimizer
    (forward, backward, step). Ours hands the optimizer a coalesced gradient (each touched row
    once); torch's has a row per index, which SparseAdam and Adagrad coalesce and SGD scatters."""
    _skip_unless_ours("ours")
    from recsys_kernels.nn import FusedEmbeddingBag
    (n, d), dist = (SHAPE_A, "uniform") if shape == "A_uniform" else (SHAPE_B, "zipf")
    idx, off = _bags(n, dist)
    starts = off[:-1]
    go = _grad_output(d)
    theirs = torch.nn.EmbeddingBag(n, d, mode="sum", sparse=True, _weight=_table(n, d).clone())
    ours = FusedEmbeddingBag.from_embedding_bag(torch.nn.EmbeddingBag(n, d, mode="sum", sparse=True,
                                                                      _weight=_table(n, d).clone()))
    make = {"SGD": lambda p: torch.optim.SGD(p, lr=0.01), "SparseAdam": lambda p: torch.optim.SparseAdam(p, lr=0.01),
            "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01)}[optimizer]

    def stepper(module):
        opt = make(list(module.parameters()))

        def step():
            opt.zero_grad()
            module(idx, starts).backward(go)
            opt.step()
        return step

    step_theirs, step_ours = stepper(theirs), stepper(ours)
    step_theirs(), step_ours()  # one step each: the same update, up to the rounding of a hot row's long sum
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-4, atol=1e-4)
    paired_ratio(f"sparse training step {shape} {optimizer} vs nn.EmbeddingBag", step_theirs, {"ours": step_ours},
                 rounds=7 if shape == "A_uniform" else 20)
