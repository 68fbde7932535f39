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


def _big(dtype, cols, device):
    """An uninitialised [ROWS, cols] table of `dtype` (the test writes the rows it reads)."""
    try:
        table = torch.empty(ROWS, cols, dtype=dtype, device=device)
    except RuntimeError as e:  # no address space for it
        pytest.skip(f"cannot allocate a {ROWS} x {cols} table: {e}")
    return table


def _lookups():
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, (1 << 24) - 1, 1 << 24, ROWS - 2, ROWS - 1])  # both sides of element 2^31
    indices = rows[torch.randint(0, len(rows), (40,), generator=g)]
    return rows, indices, torch.tensor([0, 7, 7, 20, 40])


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag", include_reference=False))
@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_embedding_bag_rows_past_2_31(device, backend, fmt):
    rows, indices, offsets = _lookups()
    values = torch.randn(len(rows), DIM)
    compact = (values.half() if fmt == "fp16" else rk.quantize_rowwise(values, 8)).to(device)
    table = _big(compact.dtype, compact.shape[1], device)
    table[rows.to(device)] = compact
    assert table.numel() > 2 ** 31
    remap = {int(r): i for i, r in enumerate(rows)}
    compact_idx = torch.tensor([remap[int(i)] for i in indices])
    indices, offsets, compact_idx = indices.to(device), offsets.to(device), compact_idx.to(device)
    got = rk.embedding_bag(table, indices, offsets, mode="sum", backend=backend)
    expected = rk.embedding_bag(compact, compact_idx, offsets, mode="sum", backend=backend)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device,backend", backend_params("pair_scores", include_reference=False))
def test_scoring_rows_past_2_31(device, backend):
    rows, indices, _ = _lookups()
    values = torch.randn(len(rows), DIM)
    compact = rk.quantize_rowwise(values, 8).to(device)
    table = _big(torch.uint8, compact.shape[1], device)
    table[rows.to(device)] = compact
    users = torch.randn(3, DIM, device=device)
    user_idx = torch.arange(len(indices), device=device) % 3
    remap = {int(r): i for i, r in enumerate(rows)}
    compact_idx = torch.tensor([remap[int(i)] for i in indices], device=device)
    indices = indices.to(device)
    got = rk.pair_scores(users, table, user_idx, indices, backend=backend)
    assert torch.equal(got, rk.pair_scores(users, compact, user_idx, compact_idx, backend=backend))
    offsets = torch.tensor([0, 13, 13, 40], device=device)  # the candidate lists of 3 users
    got = rk.candidate_scores(users, table, offsets, indices, backend=backend)
    assert torch.equal(got, rk.candidate_scores(users, compact, offsets, compact_idx, backend=backend))
