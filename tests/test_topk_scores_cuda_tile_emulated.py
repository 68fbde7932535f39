"""The score tile of topk_scores' CUDA kernel (csrc/scoring/topk_scores_cuda_tile.cuh) on a machine
without a GPU: compiled as plain C++ with tests/emulation/cuda_emulation.h (one OS thread per CUDA
thread, __syncthreads() a barrier) and driven through tests/emulation/topk_tile_harness.cpp. It
checks the tile's indexing (the 8 x 8 register blocking, the transposed staging, partial tiles,
d not a multiple of the staged columns, user and item offsets), the floor test, the exclusions and
the append: per user, exactly the keys above the user's floor of the items not excluded, each key
the reference's key of the fma chain over d (+ bias). On a GPU, test_scoring_cuda.py runs the real
kernel through the op."""
import ctypes

import pytest
import torch

import recsys_kernels as rk
from helpers import build_cuda_emulated_library
from recsys_kernels.ops.scoring import _KEY_INVALID, _rank_key

SENTINEL = 0x5EED  # written over the key buffer first: the kernel must only write the appended slots


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = build_cuda_emulated_library(tmp_path_factory.mktemp("cuda_tile"), ["tests/emulation/topk_tile_harness.cpp"])
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    so.rk_topk_tile.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, i64, ptr]
    so.rk_topk_tile.restype = None
    so.rk_fma_chain_scores.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr]
    so.rk_fma_chain_scores.restype = None
    return so


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def run_tile(lib, q, items, q8, bias, exclusions, u0, n_u, c0, n_c, k, floors):
    """The keys the tile appends per user (sorted), after checking that it wrote nothing else."""
    ld = k + n_c + 5
    buf = torch.full((n_u, ld), SENTINEL, dtype=torch.int64)
    buf[:, k - 1] = floors
    count = torch.zeros(n_u, dtype=torch.int32)
    ex_off, ex_sorted = exclusions if exclusions is not None else (None, None)
    lib.rk_topk_tile(int(q8), _p(q), _p(items), _p(bias), _p(ex_off), _p(ex_sorted), u0, n_u, c0, n_c, q.shape[1], k,
                     _p(buf), ld, _p(count))
    appended = []
    for u in range(n_u):
        n = int(count[u])
        assert 0 <= n <= n_c
        row = buf[u]
        assert row[k - 1] == floors[u] and (row[:k - 1] == SENTINEL).all() and (row[k + n:] == SENTINEL).all()
        appended.append(sorted(row[k:k + n].tolist()))
    return appended


def expected_keys(lib, q, values, bias, exclusions, u0, n_u, c0, n_c, floors):
    """Per user, the sorted keys above its floor of the items not excluded (values: the fp32 table)."""
    d = q.shape[1]
    qs = q[u0:u0 + n_u].contiguous()
    vs = values[c0:c0 + n_c].contiguous()
    bs = None if bias is None else bias[c0:c0 + n_c].contiguous()
    scores = torch.empty(n_u, n_c)
    lib.rk_fma_chain_scores(_p(qs), _p(vs), _p(bs), n_u, n_c, d, _p(scores))
    keys = _rank_key(scores, torch.arange(c0, c0 + n_c), None)
    passing = keys > floors[:, None]
    if exclusions is not None:
        off, ids = exclusions
        for u in range(n_u):
            for item in ids[off[u0 + u]:off[u0 + u + 1]].tolist():
                if c0 <= item < c0 + n_c:
                    passing[u, item - c0] = False
    return [sorted(keys[u][passing[u]].tolist()) for u in range(n_u)]


def floors_for(lib, q, values, bias, u0, n_u, c0, n_c, g):
    """Per user a floor: no floor (every key passes), a key from the middle of its own scores
    (about half pass), or the key of its best item (none pass)."""
    all_keys = expected_keys(lib, q, values, bias, None, u0, n_u, c0, n_c, torch.full((n_u,), _KEY_INVALID))
    floors = torch.empty(n_u, dtype=torch.int64)
    for u, keys in enumerate(all_keys):
        choice = int(torch.randint(0, 3, (), generator=g))
        floors[u] = _KEY_INVALID if choice == 0 else keys[len(keys) // 2] if choice == 1 else keys[-1]
    return floors


def sorted_exclusions(n_users, n_items, g):
    """CSR exclusions sorted per user (the kernel's contract), some users without any."""
    lengths = torch.randint(0, 6, (n_users,), generator=g)
    lengths[::3] = 0
    off = torch.zeros(n_users + 1, dtype=torch.int64)
    off[1:] = lengths.cumsum(0)
    ids = torch.cat([torch.randperm(n_items, generator=g)[:int(n)].sort().values for n in lengths] +
                    [torch.empty(0, dtype=torch.int64)])
    return off, ids.contiguous()


@pytest.mark.parametrize("d", [1, 16, 37, 64])
@pytest.mark.parametrize("n_u,n_c", [(1, 1), (130, 7), (9, 257), (129, 131)])
@pytest.mark.parametrize("q8", [False, True])
def test_tile_appends_exactly_the_keys_above_the_floors(lib, d, n_u, n_c, q8):
    g = torch.Generator().manual_seed(d * 1000 + n_u * 7 + n_c + q8)
    u0, c0, k = 3, 5, 4
    q = torch.randn(u0 + n_u + 2, d, generator=g)
    values = torch.randn(c0 + n_c + 3, d, generator=g)
    if q8:
        items = rk.quantize_rowwise(values, 8)
        values = rk.dequantize_rowwise(items, 8)
    else:
        items = values
    bias = torch.randn(values.shape[0], generator=g) if n_c % 2 else None
    exclusions = sorted_exclusions(q.shape[0], values.shape[0], g) if n_u % 2 else None
    floors = floors_for(lib, q, values, bias, u0, n_u, c0, n_c, g)
    got = run_tile(lib, q, items, q8, bias, exclusions, u0, n_u, c0, n_c, k, floors)
    assert got == expected_keys(lib, q, values, bias, exclusions, u0, n_u, c0, n_c, floors)


def test_tile_nan_and_tied_scores(lib):
    """NaN scores get the NaN key (below every number's, -inf's included; above no floor at all);
    tied scores differ by item id only, so a floor at one of them lets exactly the lower ids
    through."""
    n_u, n_c, d = 4, 140, 16
    q = torch.ones(n_u, d)
    q[1, 5] = q[3, 5] = float("nan")
    values = torch.zeros(n_c, d)
    values[:, 0] = torch.arange(n_c) % 4  # scores 0, 1, 2, 3: 35 items each
    floors = torch.tensor([_rank_key(torch.tensor(2.0), torch.tensor(62), None).item(),  # score 2 at item 62
                           _rank_key(torch.tensor(float("-inf")), torch.tensor(0), None).item(),
                           _KEY_INVALID, _KEY_INVALID])
    got = run_tile(lib, q, values, False, None, None, 0, n_u, 0, n_c, 1, floors)
    assert got == expected_keys(lib, q, values, None, None, 0, n_u, 0, n_c, floors)
    ids_of_user0 = sorted(0xFFFFFFFF - (key & 0xFFFFFFFF) for key in got[0])
    assert ids_of_user0 == sorted([i for i in range(n_c) if i % 4 == 3] + [i for i in range(62) if i % 4 == 2])
    assert got[1] == [] and len(got[2]) == n_c and len(got[3]) == n_c
