"""The custom ops called directly, without the Python front door (`torch.ops.recsys_kernels.X`
and `X_triton`): malformed metadata raises TypeError / ValueError / IndexError on every backend
that runs here. The cases are those a fuzzing run of the raw ops found to crash the Triton ops
(segfaults under the interpreter: their kernels trust the shapes) before they ran the front
door's checks themselves. The reference ops are the definition and have no checks of their own."""
import pytest
import torch

import recsys_kernels as rk
from helpers import backend_params

OPS = torch.ops.recsys_kernels
N, D, B, L = 20, 16, 4, 3
U, I, P = 5, 30, 12


def _w():
    return torch.randn(N, D)


def _bags():
    return torch.randint(0, N, (B * L,)), torch.arange(B + 1) * L


def _embedding_bag(**change):
    idx, off = _bags()
    args = dict(weight=_w(), indices=idx, offsets=off, per_sample_weights=None, mode="sum", padding_idx=None,
                bounds="raise", bits=8, output_dtype=None, sparse=False)
    args.update(change)
    return list(args.values())


def _embedding_bag_backward(**change):
    idx, off = _bags()
    args = dict(grad_output=torch.randn(B, D), weight=_w(), indices=idx, offsets=off, per_sample_weights=None,
                mode="sum", padding_idx=None, bounds="raise", sparse=False)
    args.update(change)
    return list(args.values())


def _grouped(**change):
    idx, off = _bags()
    args = dict(weights=[_w(), _w()], indices=[idx, idx], offsets=[off, off], per_sample_weights=[None, None],
                modes=["sum", "sum"], padding_idx=[-1, -1], bits=[8, 8], sparse=[False, False], bounds="raise",
                output_dtype=torch.float32)
    args.update(change)
    return list(args.values())


def _pair(**change):
    args = dict(user_emb=torch.randn(U, D), item_emb=torch.randn(I, D), user_idx=torch.randint(0, U, (P,)),
                item_idx=torch.randint(0, I, (P,)), item_bias=torch.randn(I))
    args.update(change)
    return list(args.values())


def _candidates(k=None, **change):
    args = dict(queries=torch.randn(U, D), items=torch.randn(I, D), cand_offsets=torch.tensor([0, 3, 3, 7, 9, 12]),
                cand_items=torch.randint(0, I, (12,)))
    if k is not None:
        args["k"] = k
    args["item_bias"] = torch.randn(I)
    args.update(change)
    return list(args.values())


def _topk(**change):
    args = dict(queries=torch.randn(U, D), items=torch.randn(I, D), k=4, exclude_offsets=None, exclude_items=None,
                item_bias=torch.randn(I))
    args.update(change)
    return list(args.values())


def _matmul(**change):
    args = dict(a=torch.randint(-127, 128, (7, 32), dtype=torch.int8),
                b=torch.randint(-127, 128, (9, 32), dtype=torch.int8),
                a_scale=torch.rand(7) + 0.1, b_scale=torch.rand(9) + 0.1, bias=torch.randn(9), activation="relu",
                out_dtype=torch.float32)
    args.update(change)
    return list(args.values())


def _linear(**change):
    args = dict(x=torch.randn(7, 32), weight_q=torch.randint(-127, 128, (9, 32), dtype=torch.int8),
                weight_scale=torch.rand(9) + 0.1, bias=torch.randn(9), activation="none", act_quant="dynamic",
                out_dtype=None)
    args.update(change)
    return list(args.values())


CASES = {
    "embedding_bag": {
        "per_sample_weights one short": lambda: _embedding_bag(per_sample_weights=torch.randn(B * L - 1)),
        "per_sample_weights 0-d": lambda: _embedding_bag(per_sample_weights=torch.tensor(1.0)),
        "indices 2-D": lambda: _embedding_bag(indices=_bags()[0].reshape(1, -1)),
        "offsets 2-D": lambda: _embedding_bag(offsets=_bags()[1].reshape(1, -1)),
        "mode": lambda: _embedding_bag(mode="median"),
        "bounds": lambda: _embedding_bag(bounds="wrap"),
        "bits of a packed table": lambda: _embedding_bag(weight=rk.quantize_rowwise(_w(), 8), bits=5),
        "output_dtype": lambda: _embedding_bag(output_dtype=torch.int32),
        "integer table": lambda: _embedding_bag(weight=_w().long()),
        "padding_idx = N": lambda: _embedding_bag(padding_idx=N),
    },
    "embedding_bag_backward": {
        "grad_output rows": lambda: _embedding_bag_backward(grad_output=torch.randn(B - 1, D)),
        "grad_output cols": lambda: _embedding_bag_backward(grad_output=torch.randn(B, D - 1)),
        "grad_output 0-d": lambda: _embedding_bag_backward(grad_output=torch.tensor(1.0)),
        "one bag more than grad_output": lambda: _embedding_bag_backward(offsets=torch.tensor([0, 3, 6, 9, 12, 12])),
        "per_sample_weights one short": lambda: _embedding_bag_backward(per_sample_weights=torch.randn(B * L - 1)),
        "wider table": lambda: _embedding_bag_backward(weight=torch.randn(N, D + 1)),
        "padding_idx = N": lambda: _embedding_bag_backward(padding_idx=N),
    },
    "embedding_bag_grouped": {
        "per_sample_weights[1] short": lambda: _grouped(per_sample_weights=[torch.randn(B * L),
                                                                            torch.randn(3)]),
        "per_sample_weights[0] 0-d": lambda: _grouped(per_sample_weights=[torch.tensor(1.0), torch.randn(B * L)]),
        "modes[1]": lambda: _grouped(modes=["sum", "median"]),
        "padding_idx[1] = N": lambda: _grouped(padding_idx=[-1, N]),
        "output_dtype": lambda: _grouped(output_dtype=torch.int64),
    },
    "pair_scores": {
        "user_emb dim": lambda: _pair(user_emb=torch.randn(U, D - 1)),
        "item_emb dim": lambda: _pair(item_emb=torch.randn(I, D + 1)),
        "index lengths": lambda: _pair(item_idx=torch.randint(0, I, (P - 1,))),
        "user_idx 0-d": lambda: _pair(user_idx=torch.tensor(0)),
        "item_bias empty": lambda: _pair(item_bias=torch.randn(0)),
        "float items as uint8": lambda: _pair(item_emb=torch.randn(I, D).to(torch.uint8)),
    },
    "pair_scores_backward": {
        "grad_output short": lambda: [torch.randn(P - 1)] + _pair(),
        "grad_output 0-d": lambda: [torch.tensor(1.0)] + _pair(),
        "item_emb dim": lambda: [torch.randn(P)] + _pair(item_emb=torch.randn(I, D + 1)),
    },
    "candidate_scores": {
        "one query short of cand_offsets": lambda: _candidates(queries=torch.randn(U - 1, D)),
        "queries dim": lambda: _candidates(queries=torch.randn(U, D - 1)),
        "item_bias empty": lambda: _candidates(item_bias=torch.randn(0)),
    },
    "candidate_topk": {
        "one query short of cand_offsets": lambda: _candidates(k=3, queries=torch.randn(U - 1, D)),
        "items dim": lambda: _candidates(k=3, items=torch.randn(I, D + 1)),
        "item_bias empty": lambda: _candidates(k=3, item_bias=torch.randn(0)),
        "negative k": lambda: _candidates(k=-1),
    },
    "topk_scores": {
        "queries 1-D": lambda: _topk(queries=torch.randn(U * D)),
        "queries transposed": lambda: _topk(queries=torch.randn(D, U)),
        "items dim": lambda: _topk(items=torch.randn(I, D + 1)),
        "item_bias short": lambda: _topk(item_bias=torch.randn(I - 1)),
        "k > I": lambda: _topk(k=I + 1),
        "exclude_offsets alone": lambda: _topk(exclude_offsets=torch.zeros(U + 1, dtype=torch.long)),
    },
    "int8_matmul": {
        "a_scale short": lambda: _matmul(a_scale=torch.rand(6)),
        "b_scale 0-d": lambda: _matmul(b_scale=torch.tensor(1.0)),
        "K": lambda: _matmul(b=torch.randint(-127, 128, (9, 31), dtype=torch.int8)),
        "float a": lambda: _matmul(a=torch.randn(7, 32)),
        "bias short": lambda: _matmul(bias=torch.randn(8)),
    },
    "int8_linear": {
        "weight_scale short": lambda: _linear(weight_scale=torch.rand(8)),
        "x 1-D": lambda: _linear(x=torch.randn(32)),
        "K": lambda: _linear(x=torch.randn(7, 31)),
        "act_quant": lambda: _linear(act_quant="static"),
    },
    "quantize_rowwise": {
        "D = 0": lambda: [torch.randn(N, 0), 8],
        "D = 0, 4-bit": lambda: [torch.randn(N, 0), 4],
    },
    "dequantize_rowwise": {
        "8-byte rows": lambda: [torch.zeros(N, 8, dtype=torch.uint8), 8, None],
        "4-byte rows, 4-bit": lambda: [torch.zeros(N, 4, dtype=torch.uint8), 4, None],
    },
    "quantize_rows_int8": {
        "x 1-D": lambda: [torch.randn(32)],
        "x 3-D": lambda: [torch.randn(2, 3, 4)],
    },
}


def _params():
    params = []
    for op, cases in CASES.items():
        for pair in backend_params(op, include_reference=False):  # (device, backend), skipped where it cannot run
            device, backend = pair.values
            params += [pytest.param(op, case, device, backend, id=f"{op}-{backend}-{device}-{case}", marks=pair.marks)
                       for case in cases]
    return params


@pytest.mark.parametrize("op,case,device,backend", _params())
def test_raw_op_rejects_bad_metadata(op, case, device, backend):
    args = CASES[op][case]()
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    args = [[move(t) for t in a] if isinstance(a, list) else move(a) for a in args]
    fn = getattr(OPS, op + ("_triton" if backend == "triton" else ""))
    with pytest.raises((TypeError, ValueError, IndexError)):
        fn(*args)


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
def test_raw_op_negative_padding_idx_names_no_row(device, backend):
    """The ops' own padding_idx (the front door passes None or [0, N)): a negative one names no
    row on every backend, as in the reference (the CUDA op once read -1 as row N - 1)."""
    args = _embedding_bag(mode="mean")
    args[1][0] = N - 1  # row N - 1 is looked up: it must count
    fn = getattr(OPS, "embedding_bag" + ({"triton": "_triton", "reference": "_reference"}.get(backend, "")))
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    expected = OPS.embedding_bag_reference(*args)
    for pad in (-1, -N):
        moved[5] = pad
        torch.testing.assert_close(fn(*moved).cpu(), expected)

