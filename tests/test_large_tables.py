"""Tables past 2^31 elements / bytes (DESIGN §5: 64-bit offset arithmetic): rows beyond the 2^31st
element are read where they are. The tables are allocated, not filled: only the rows a test
writes and reads are touched, so the machine needs the address space, not the memory. Each op's
result must equal, bit for bit, the same backend's on a compact table of just those rows."""
import pytest
import torch

import recsys_kernels as rk
from helpers import backend_params

ROWS = (1 << 24) + 8  # x 128 columns: the last rows start past element 2^31
DIM = 128


def _big(dtype, cols, device, alloc=torch.empty):
    """A [ROWS, cols] table of `dtype` made by `alloc` (by default uninitialised: the tests write
    the rows they read)."""
    try:
        return alloc(ROWS, cols, dtype=dtype, device=device)
    except RuntimeError as e:  # no address space for it
        pytest.skip(f"cannot allocate a {ROWS} x {cols} table: {e}")


def _lookups(device):
    """(rows, indices into the big table, the same indices into a compact table of `rows`)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, (1 << 24) - 1, 1 << 24, ROWS - 2, ROWS - 1])  # both sides of element 2^31
    compact_idx = torch.randint(0, len(rows), (40,), generator=g)
    return rows.to(device), rows[compact_idx].to(device), compact_idx.to(device)


def _skip_full_scan_under_interpreter(device, backend):
    if device == "cpu" and backend == "triton":
        pytest.skip("16M rows through the Triton interpreter take too long; on a GPU this runs")


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag", include_reference=False))
@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_embedding_bag_rows_past_2_31(device, backend, fmt):
    rows, indices, compact_idx = _lookups(device)
    offsets = torch.tensor([0, 7, 7, 20, 40], device=device)
    values = torch.randn(len(rows), DIM)
    compact = (values.half() if fmt == "fp16" else rk.quantize_rowwise(values, 8)).to(device)
    table = _big(compact.dtype, compact.shape[1], device)
    table[rows] = compact
    assert table.numel() > 2 ** 31
    got = rk.embedding_bag(table, indices, offsets, mode="sum", backend=backend)
    expected = rk.embedding_bag(compact, compact_idx, offsets, mode="sum", backend=backend)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device,backend", backend_params("pair_scores", include_reference=False))
def test_scoring_rows_past_2_31(device, backend):
    rows, indices, compact_idx = _lookups(device)
    compact = rk.quantize_rowwise(torch.randn(len(rows), DIM), 8).to(device)
    table = _big(torch.uint8, compact.shape[1], device)
    table[rows] = compact
    users = torch.randn(3, DIM, device=device)
    user_idx = torch.arange(len(indices), device=device) % 3
    got = rk.pair_scores(users, table, user_idx, indices, backend=backend)
    assert torch.equal(got, rk.pair_scores(users, compact, user_idx, compact_idx, backend=backend))
    offsets = torch.tensor([0, 13, 13, 40], device=device)  # the candidate lists of 3 users
    got = rk.candidate_scores(users, table, offsets, indices, backend=backend)
    assert torch.equal(got, rk.candidate_scores(users, compact, offsets, compact_idx, backend=backend))


@pytest.mark.parametrize("device,backend", backend_params("topk_scores", include_reference=False))
def test_topk_scores_over_rows_past_2_31(device, backend):
    """The whole-catalog scan reads every row: a zero table (all scores 0) but for three rows,
    two of them past element 2^31, which must come first, scored as on a compact table."""
    _skip_full_scan_under_interpreter(device, backend)
    table = _big(torch.uint8, DIM + 8, device, torch.zeros)  # scale 0, bias 0: zero rows
    rows = torch.tensor([ROWS - 1, 1 << 24, 5])
    queries = torch.rand(2, DIM, device=device) + 0.5
    compact = rk.quantize_rowwise(torch.rand(3, DIM) + 0.5, 8).to(device)  # positive scores
    table[rows.to(device)] = compact
    values, ids = rk.topk_scores(queries, table, 4, backend=backend)
    c_values, c_ids = rk.topk_scores(queries, compact, 3, backend=backend)
    assert torch.equal(values[:, :3], c_values) and torch.equal(ids[:, :3].cpu(), rows[c_ids.cpu()])
    assert (values[:, 3] == 0).all() and (ids[:, 3] == 0).all()  # then the lowest id among the zeros


@pytest.mark.parametrize("device,backend", backend_params("int8_matmul", include_reference=False))
def test_int8_matmul_rows_past_2_31(device, backend):
    """a [2^24 + 8, 128] int8: its last rows start past element 2^31 (and so do their outputs'
    rows in bytes): exact int32 results there."""
    _skip_full_scan_under_interpreter(device, backend)
    a = _big(torch.int8, DIM, device, torch.zeros)
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([0, (1 << 24) - 1, 1 << 24, ROWS - 1])
    a_rows = torch.randint(-127, 128, (len(rows), DIM), dtype=torch.int8, generator=g)
    a[rows.to(device)] = a_rows.to(device)
    b = torch.randint(-127, 128, (8, DIM), dtype=torch.int8, generator=g)
    out = rk.int8_matmul(a, b.to(device), backend=backend)
    assert out.dtype == torch.int32 and out.shape == (ROWS, 8)
    assert torch.equal(out[rows.to(device)].cpu(), a_rows.int() @ b.int().t())
    assert not out[1 << 23].any()
