"""The scoring ops on the CUDA C++ backend (csrc/scoring/*_cuda.cu), beyond the generic matrix of
test_scoring.py (which runs its "cuda-cuda" params when a GPU is present): against the reference
run on the same GPU, with ties, NaN and -inf, exclusion, int8 tables, k = 1 and k = I, topk_scores
across many item chunks and user blocks (the kernel's test hooks shrink them), candidate lists
longer than the shared-memory sort, both gather-dot paths (vectorised and scalar), the backward,
the device error flags (the CPU kernel's exception and message), opcheck and torch.compile.
Every test here needs a GPU and is skipped without one."""
import math
import re

import pytest
import torch

from recsys_kernels import _backend
from recsys_kernels.ops import scoring
from recsys_kernels.ops.rowwise import dequantize_rowwise, quantize_rowwise

OPS_NAMES = ("pair_scores", "pair_scores_backward", "candidate_scores", "candidate_topk", "topk_scores")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(any("cuda" not in _backend.available_backends(op, "cuda") for op in OPS_NAMES),
                       reason="the cuda backend of the scoring ops is not available"),
]

DEV = "cuda"
OPS = torch.ops.recsys_kernels
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
CHUNK_VAR, USERS_VAR = "RECSYS_KERNELS_CUDA_TOPK_CHUNK", "RECSYS_KERNELS_CUDA_TOPK_USERS"


def exact(*shape, lo=-3, hi=3, gen=None):
    """Quarter-integers: every score of the small dims here is exact in fp32, whatever the
    summation order, so the CUDA kernels must match the reference bit for bit (ties included)."""
    return (torch.randint(lo, hi + 1, shape, generator=gen).float() / 4).to(DEV)


def csr(lists, dtype=torch.int64):
    offsets = [0]
    for lst in lists:
        offsets.append(offsets[-1] + len(lst))
    return (torch.tensor(offsets, dtype=dtype, device=DEV),
            torch.tensor([i for lst in lists for i in lst], dtype=dtype, device=DEV))


def random_lists(n_users, n_items, max_len, gen=None):
    return [torch.randint(0, n_items, (int(torch.randint(0, max_len + 1, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(n_users)]


def assert_topk_equal(got, expected):
    for g, e in zip(got, expected):
        assert g.device.type == "cuda" and g.is_contiguous() and g.dtype == e.dtype and g.shape == e.shape
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[1], expected[1]), f"ids {got[1]} != {expected[1]}"


def both(fn, *args, **kw):
    """(cuda result, reference result) of one public function."""
    return fn(*args, backend="cuda", **kw), fn(*args, backend="reference", **kw)


@pytest.fixture
def blocks(monkeypatch):
    """Set topk_scores' item chunk and user block (the kernel reads them on every call)."""
    def set_blocks(chunk=None, users=None):
        for var, value in ((CHUNK_VAR, chunk), (USERS_VAR, users)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, str(value))
    return set_blocks


# ----------------------------------------------------------------------------- topk_scores
@pytest.mark.parametrize("n_users,n_items,dim,k,chunk,users", [
    (1, 1, 1, 1, None, None),
    (6, 23, 5, 23, 7, 4),         # k = I, several chunks and user blocks
    (6, 23, 5, 1, 7, 4),          # k = 1
    (70, 300, 8, 17, 64, 33),     # tiles that end inside a chunk / a user block
    (130, 1000, 129, 40, None, None),  # D past the staged width, users past one tile
    (3, 40000, 16, 50, None, None),    # more items than the default chunk
])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_exclude,with_bias", [(False, False), (True, True)])
def test_topk_matches_reference(blocks, n_users, n_items, dim, k, chunk, users, dtype, with_exclude, with_bias):
    blocks(chunk, users)
    g = torch.Generator().manual_seed(n_users + n_items + dim)
    q, items = exact(n_users, dim, gen=g).to(dtype), exact(n_items, dim, gen=g).to(dtype)
    kw = {"item_bias": exact(n_items, gen=g).to(dtype) if with_bias else None}
    if with_exclude:
        kw["exclude_offsets"], kw["exclude_items"] = csr(random_lists(n_users, n_items, 9, g))
    assert_topk_equal(*both(scoring.topk_scores, q, items, k, **kw))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_topk_exclusions(blocks, index_dtype):
    blocks(5, 2)
    q, items = exact(4, 3), exact(17, 3)
    lists = [list(range(17)), [3, 3, 3, 16, 0], [], list(range(0, 17, 2))]  # all, duplicates, none, > I - k
    off, ex = csr(lists, index_dtype)
    got = scoring.topk_scores(q, items, 10, exclude_offsets=off, exclude_items=ex, backend="cuda")
    assert (got[1][0] == -1).all() and (got[0][0] == float("-inf")).all()
    assert (got[1][3, 8:] == -1).all()  # 8 odd items remain
    assert_topk_equal(got, scoring.topk_scores(q, items, 10, exclude_offsets=off, exclude_items=ex,
                                               backend="reference"))


def test_topk_ties_nan_inf(blocks):
    blocks(3, 1)
    q = torch.ones(3, 4, device=DEV)
    values, ids = scoring.topk_scores(q, torch.ones(30, 4, device=DEV), 12, backend="cuda")
    assert torch.equal(ids.cpu(), torch.arange(12).expand(3, 12))  # equal scores: lower ids first
    items = exact(8, 2)
    items[1] = float("nan")
    bias = torch.zeros(8, device=DEV)
    bias[6] = float("-inf")
    off, ex = csr([[0, 2, 3, 4, 5, 7], [], []])
    kw = dict(exclude_offsets=off, exclude_items=ex, item_bias=bias)
    got = scoring.topk_scores(exact(3, 2), items, 4, backend="cuda", **kw)
    assert got[1][0].tolist() == [6, 1, -1, -1]
    assert got[0][0, 0] == float("-inf") and math.isnan(got[0][0, 1].item())
    values, ids = scoring.topk_scores(torch.full((1, 2), float("nan"), device=DEV), items, 3, backend="cuda")
    assert ids.tolist() == [[0, 1, 2]] and torch.isnan(values).all()
    # -0.0 ties +0.0
    values, ids = scoring.topk_scores(torch.tensor([[1.0]], device=DEV), torch.tensor([[-0.0], [0.0]], device=DEV),
                                      2, backend="cuda")
    assert ids.tolist() == [[0, 1]]


def test_topk_large_k(blocks):
    blocks(1500, None)
    q, items = exact(2, 3), exact(5000, 3)
    assert_topk_equal(*both(scoring.topk_scores, q, items, 4096))


def test_topk_random_floats():
    g = torch.Generator().manual_seed(1)
    q, items = torch.randn(300, 64, generator=g).to(DEV), torch.randn(50000, 64, generator=g).to(DEV)
    bias = torch.randn(50000, generator=g).to(DEV)
    values, ids = scoring.topk_scores(q, items, 100, item_bias=bias, backend="cuda")
    s = q.double() @ items.double().t() + bias.double()
    torch.testing.assert_close(values.double(), s.topk(100, dim=1).values, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s.gather(1, ids), values.double(), rtol=1e-5, atol=1e-4)
    assert all(len(set(r.tolist())) == 100 for r in ids.cpu())


@pytest.mark.parametrize("dim", [12, 64])
def test_topk_int8_equals_dequantized(blocks, dim):
    blocks(7, 3)
    q, w, bias = torch.randn(5, dim, device=DEV), torch.randn(31, dim, device=DEV), torch.randn(31, device=DEV)
    packed = quantize_rowwise(w, 8)
    deq = dequantize_rowwise(packed, 8)
    off, ex = csr(random_lists(5, 31, 6))
    kw = dict(exclude_offsets=off, exclude_items=ex, item_bias=bias, backend="cuda")
    assert_topk_equal(scoring.topk_scores(q, packed, 9, **kw), scoring.topk_scores(q, deq, 9, **kw))


def test_topk_no_users_and_k0():
    items = torch.randn(5, 3, device=DEV)
    v, i = scoring.topk_scores(torch.randn(0, 3, device=DEV), items, 2, backend="cuda")
    assert v.shape == (0, 2) and i.shape == (0, 2)
    v, i = scoring.topk_scores(torch.randn(4, 3, device=DEV), items, 0, backend="cuda")
    assert v.shape == (4, 0) and i.shape == (4, 0)


# ----------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("dim", [5, 64, 129])
@pytest.mark.parametrize("items_dtype", FLOATS + [torch.uint8])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_candidate_ops_match_reference(dim, items_dtype, index_dtype):
    g = torch.Generator().manual_seed(dim)
    n_users, n_items = 40, 300
    q = exact(n_users, dim, gen=g)
    if items_dtype == torch.uint8:
        items = quantize_rowwise(torch.randn(n_items, dim, generator=g).to(DEV), 8)
    else:
        items = exact(n_items, dim, gen=g).to(items_dtype)
    bias = exact(n_items, gen=g)
    lists = random_lists(n_users - 2, n_items, 30, g) + [[], [7, 7, 7, 3, 299, 0]]
    off, cand = csr(lists, index_dtype)
    got, ref = both(scoring.candidate_scores, q, items, off, cand, bias)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for k in (0, 1, 5, 40):
        got, ref = both(scoring.candidate_topk, q, items, off, cand, k, bias)
        if items_dtype == torch.uint8:  # not exact scores: compare values, and ids through scores
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[1] == -1, ref[1] == -1)
        else:
            assert_topk_equal(got, ref)


def test_candidate_topk_long_lists():
    """Lists longer than the shared-memory sort (4096) take the global sort path."""
    g = torch.Generator().manual_seed(3)
    q, items = exact(5, 8, gen=g), exact(2000, 8, gen=g)
    lists = [torch.randint(0, 2000, (6000,), generator=g).tolist(), [], [5, 5, 1],
             torch.randint(0, 2000, (4097,), generator=g).tolist(), list(range(10))]
    off, cand = csr(lists)
    for k in (1, 7, 5000, 7000):
        assert_topk_equal(*both(scoring.candidate_topk, q, items, off, cand, k))


def test_candidate_topk_list_at_shared_limit():
    q, items = exact(2, 4), exact(100, 4)
    lists = [torch.randint(0, 100, (4096,)).tolist(), torch.randint(0, 100, (1,)).tolist()]
    off, cand = csr(lists)
    assert_topk_equal(*both(scoring.candidate_topk, q, items, off, cand, 4096))


def test_candidate_int8_equals_dequantized():
    q, w = torch.randn(6, 16, device=DEV), torch.randn(50, 16, device=DEV)
    packed = quantize_rowwise(w, 8)
    deq = dequantize_rowwise(packed, 8)
    off, cand = csr(random_lists(6, 50, 20))
    assert torch.equal(scoring.candidate_scores(q, packed, off, cand, backend="cuda"),
                       scoring.candidate_scores(q, deq, off, cand, backend="cuda"))
    assert_topk_equal(scoring.candidate_topk(q, packed, off, cand, 5, backend="cuda"),
                      scoring.candidate_topk(q, deq, off, cand, 5, backend="cuda"))


# ----------------------------------------------------------------------------- pair_scores
def misaligned(t):
    """A contiguous copy of t one element off 16-byte alignment: the kernels' scalar path."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("user_dtype", FLOATS)
@pytest.mark.parametrize("item_dtype", FLOATS + [torch.uint8])
@pytest.mark.parametrize("dim", [1, 5, 64, 256])
@pytest.mark.parametrize("aligned", [True, False])
def test_pair_scores_match_reference(user_dtype, item_dtype, dim, aligned):
    g = torch.Generator().manual_seed(dim)
    u = torch.randn(300, dim, generator=g).to(DEV, user_dtype)
    if item_dtype == torch.uint8:
        v = quantize_rowwise(torch.randn(500, dim, generator=g).to(DEV), 8)
    else:
        v = torch.randn(500, dim, generator=g).to(DEV, item_dtype)
    if not aligned:
        u, v = misaligned(u), misaligned(v)
    bias = torch.randn(500, generator=g).to(DEV)
    ui, ii = torch.randint(0, 300, (5000,), device=DEV), torch.randint(0, 500, (5000,), device=DEV).int()
    got, ref = both(scoring.pair_scores, u, v, ui, ii, bias)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("dim", [3, 64])
def test_pair_scores_backward_matches_reference(dtype, dim):
    g = torch.Generator().manual_seed(7)
    u0, v0 = torch.randn(20, dim, generator=g).to(DEV, dtype), torch.randn(30, dim, generator=g).to(DEV, dtype)
    b0 = torch.randn(30, generator=g).to(DEV, dtype)
    ui, ii = torch.randint(0, 20, (400,), device=DEV), torch.randint(0, 30, (400,), device=DEV)  # duplicates
    w = torch.randn(400, device=DEV)
    grads = {}
    for backend in ("cuda", "reference"):
        u, v, b = (t.clone().requires_grad_() for t in (u0, v0, b0))
        (scoring.pair_scores(u, v, ui, ii, b, backend=backend) * w).sum().backward()
        grads[backend] = (u.grad, v.grad, b.grad)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, ref in zip(grads["cuda"], grads["reference"]):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    # the op directly, an int8 table: grad_user only, empty grad_item
    packed = quantize_rowwise(v0.float(), 8)
    got = OPS.pair_scores_backward(w, u0, packed, ui, ii, None)
    ref = OPS.pair_scores_backward_reference(w, u0, packed, ui, ii, None)
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=tol, atol=tol)
    assert got[1].shape == (0,) and got[2].shape == (0,)


def test_pair_scores_backward_alerts_under_deterministic_mode():
    # float atomics: torch's deterministic mode refuses the CUDA backward, the Triton one runs
    u = torch.randn(4, 8, device=DEV, requires_grad=True)
    v = torch.randn(5, 8, device=DEV)
    ui, ii = torch.tensor([0, 0, 1], device=DEV), torch.tensor([1, 2, 1], device=DEV)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="pair_scores_backward"):
            scoring.pair_scores(u, v, ui, ii, backend="cuda").sum().backward()
        if "triton" in _backend.available_backends("pair_scores", "cuda"):
            scoring.pair_scores(u, v, ui, ii, backend="triton").sum().backward()
            torch.testing.assert_close(u.grad[0], v[1] + v[2])
    finally:
        torch.use_deterministic_algorithms(before)


def test_pair_scores_empty():
    u, v = torch.randn(3, 8, device=DEV), torch.randn(4, 8, device=DEV)
    e = torch.zeros(0, dtype=torch.long, device=DEV)
    assert scoring.pair_scores(u, v, e, e, backend="cuda").shape == (0,)


# ----------------------------------------------------------------------------- error flags
Q, IT = torch.randn(3, 4), torch.randn(6, 4)
OFF, CAND = torch.tensor([0, 1, 1, 3]), torch.tensor([2, 0, 5])
BAD_SCALE = quantize_rowwise(IT, 8)
BAD_SCALE[2, 4:8] = torch.tensor([float("nan")]).view(torch.uint8)


@pytest.mark.parametrize("call", [
    lambda d, b: scoring.pair_scores(Q.to(d), IT.to(d), torch.tensor([0, 3]).to(d), torch.tensor([1, 5]).to(d), backend=b),
    lambda d, b: scoring.pair_scores(Q.to(d), IT.to(d), torch.tensor([0, -2, -1]).to(d), torch.tensor([1, 5, 9]).to(d),
                                     backend=b),
    lambda d, b: scoring.pair_scores(Q.to(d), IT.to(d), torch.tensor([0, 1]).to(d), torch.tensor([1, 6]).to(d), backend=b),
    lambda d, b: scoring.pair_scores(Q.to(d), BAD_SCALE.to(d), torch.tensor([0]).to(d), torch.tensor([2]).to(d),
                                     backend=b),
    lambda d, b: OPS.pair_scores_backward(torch.ones(2).to(d), Q.to(d), IT.to(d), torch.tensor([0, 1]).to(d),
                                          torch.tensor([7, 1]).to(d), None),
    lambda d, b: scoring.candidate_scores(Q.to(d), IT.to(d), torch.tensor([1, 1, 1, 3]).to(d), CAND.to(d), backend=b),
    lambda d, b: scoring.candidate_scores(Q.to(d), IT.to(d), torch.tensor([0, 2, 1, 3]).to(d), CAND.to(d), backend=b),
    lambda d, b: scoring.candidate_scores(Q.to(d), IT.to(d), torch.tensor([0, 1, 1, 2]).to(d), CAND.to(d), backend=b),
    lambda d, b: scoring.candidate_scores(Q.to(d), IT.to(d), OFF.to(d), torch.tensor([2, 6, -4]).to(d), backend=b),
    lambda d, b: scoring.candidate_topk(Q.to(d), IT.to(d), OFF.to(d), torch.tensor([2, 9, 0]).to(d), 2, backend=b),
    lambda d, b: scoring.candidate_topk(Q.to(d), BAD_SCALE.to(d), OFF.to(d), CAND.to(d), 2, backend=b),
    lambda d, b: scoring.topk_scores(Q.to(d), IT.to(d), 2, exclude_offsets=torch.tensor([0, 1, 1, 9]).to(d),
                                     exclude_items=CAND.to(d), backend=b),
    lambda d, b: scoring.topk_scores(Q.to(d), IT.to(d), 2, exclude_offsets=torch.tensor([0, 2, 1, 3]).to(d),
                                     exclude_items=CAND.to(d), backend=b),
    lambda d, b: scoring.topk_scores(Q.to(d), IT.to(d), 2, exclude_offsets=OFF.to(d),
                                     exclude_items=torch.tensor([0, 6, 1]).to(d), backend=b),
    lambda d, b: scoring.topk_scores(Q.to(d), BAD_SCALE.to(d), 2, backend=b),
    lambda d, b: scoring.topk_scores(Q.to(d), BAD_SCALE.to(d), 0, backend=b),
])
def test_error_flags_match_cpu_kernel(call):
    """The CUDA kernels raise what the CPU kernels raise: same type, same message."""
    with pytest.raises((ValueError, IndexError)) as cpu_error:
        call("cpu", "cpu")
    message = str(cpu_error.value).splitlines()[0]
    with pytest.raises(cpu_error.type, match=re.escape(message)):
        call(DEV, "cuda")
    torch.cuda.synchronize()  # the device is still usable


def test_cpu_tensor_passed_to_cuda_kernel_raises():
    with pytest.raises(ValueError, match="device"):
        OPS.pair_scores(Q.to(DEV), IT.to(DEV), torch.tensor([0]), torch.tensor([1]).to(DEV), None)


# ----------------------------------------------------------------------------- opcheck, compile
def _opcheck_cases():
    q, items, bias = torch.randn(4, 8, device=DEV), torch.randn(9, 8, device=DEV), torch.randn(9, device=DEV)
    packed = quantize_rowwise(items, 8)
    off, cand = csr([[1, 2], [], [8, 0, 0], [5]])
    ui, ii = torch.tensor([0, 3, 3, 1], device=DEV), torch.tensor([2, 8, 8, 0], dtype=torch.int32, device=DEV)
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    return [
        (OPS.pair_scores, (grad(q), grad(items), ui, ii, grad(bias))),
        (OPS.pair_scores, (grad(q), packed, ui, ii, None)),
        (OPS.pair_scores_backward, (torch.randn(4, device=DEV), q, items, ui, ii, bias)),
        (OPS.pair_scores_backward, (torch.randn(4, device=DEV), q, packed, ui, ii, None)),
        (OPS.candidate_scores, (q, items, off, cand, bias)),
        (OPS.candidate_scores, (q, packed, off, cand, None)),
        (OPS.candidate_topk, (q, items, off, cand, 2, bias)),
        (OPS.topk_scores, (q, items, 3, off, cand, None)),
        (OPS.topk_scores, (q, packed, 0, None, None, bias)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    q, items, bias = exact(4, 6), exact(9, 6), exact(9)
    off, cand = csr([[1, 2], [], [8, 0, 0], [5]])
    ui, ii = torch.tensor([0, 3, 3, 1], device=DEV), torch.tensor([2, 8, 8, 0], device=DEV)

    def fn(q, items, bias):
        return (scoring.pair_scores(q, items, ui, ii, bias, backend="cuda"),
                scoring.candidate_scores(q, items, off, cand, bias, backend="cuda"),
                *scoring.candidate_topk(q, items, off, cand, 2, bias, backend="cuda"),
                *scoring.topk_scores(q, items, 3, exclude_offsets=off, exclude_items=cand, item_bias=bias,
                                     backend="cuda"))

    expected = fn(q, items, bias)
    got = torch.compile(fn, fullgraph=True)(q, items, bias)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_compile_fullgraph_backward():
    u = torch.randn(4, 3, device=DEV, requires_grad=True)
    v = torch.randn(6, 3, device=DEV, requires_grad=True)
    ui, ii = torch.tensor([0, 1, 1], device=DEV), torch.tensor([5, 5, 2], device=DEV)
    torch.compile(lambda a, b: scoring.pair_scores(a, b, ui, ii, backend="cuda").sum(),
                  fullgraph=True, backend="aot_eager")(u, v).backward()
    torch.testing.assert_close(u.grad, torch.zeros(4, 3, device=DEV).index_add_(0, ui, v.detach()[ii]))
