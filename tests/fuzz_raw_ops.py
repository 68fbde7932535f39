"""Differential fuzzing of the raw custom ops with malformed arguments (not a pytest file: run it
by hand after changing an op's checks or a kernel's addressing).

    python tests/fuzz_raw_ops.py [case ...]                                   # the C++ ops
    SUFFIX=_triton TRITON_INTERPRET=1 python tests/fuzz_raw_ops.py [case ...]  # the Triton ops

Each case (BASES) is a valid call of `torch.ops.recsys_kernels.X`; every mutation changes one
argument (dtype, rank, size, stride, a value at the ends or in the middle, None, another string
or int) and runs the op and `X_reference` in a forked child, every input tensor ending right
before a PROT_NONE page (a read past its end faults). Printed: crashes (the child killed by a
signal), results that differ from the reference's (fp32 to 1e-3: a bf16 rounding shows), errors
that are not TypeError / ValueError / IndexError / NotImplementedError, and calls where the
reference raised and ours did not. The reference ops do not check their arguments (they are the
definition): where only ours raised, the call counts as raised. `tests/test_raw_ops_bad_input.py`
keeps the cases this found."""
import ctypes
import itertools
import mmap
import os
import sys

import torch

import recsys_kernels as rk
from recsys_kernels.ops.int8_matmul import pack_weight_int8

ops = torch.ops.recsys_kernels
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_keep = []  # the mappings stay alive as long as the tensors viewing them


def guarded(t):
    """A copy of t whose last byte is the last before an unreadable page."""
    if not isinstance(t, torch.Tensor) or not t.is_contiguous():
        return t
    nb = t.numel() * t.element_size()
    data = (nb + 4095) // 4096 * 4096
    mm = mmap.mmap(-1, data + 4096)
    buf = (ctypes.c_char * (data + 4096)).from_buffer(mm)
    base = ctypes.addressof(buf)
    assert libc.mprotect(base + data, 4096, 0) == 0
    _keep.append((mm, buf))
    if nb == 0:
        return t
    g = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=data - nb).view(t.shape)
    g.copy_(t)
    return g

g = torch.Generator().manual_seed(0)
def randn(*s): return torch.randn(*s, generator=g)
def randint(lo, hi, *s, dtype=torch.int64): return torch.randint(lo, hi, s, generator=g, dtype=dtype)

N, D, B, L = 50, 16, 6, 3
W = randn(N, D)
IDX = randint(0, N, B * L)
OFF = torch.arange(B + 1) * L
U, I, d, P = 5, 40, 16, 30
Q = randn(U, d); IT = randn(I, d); BIAS = randn(I)
CO = torch.tensor([0, 3, 3, 10, 12, 20]); CI = randint(0, I, 20)
XO = torch.tensor([0, 2, 2, 5, 5, 7]); XI = randint(0, I, 7)
A8 = randint(-127, 128, 7, 32, dtype=torch.int8); B8 = randint(-127, 128, 9, 32, dtype=torch.int8)
AS = torch.rand(7, generator=g) + 0.1; BS = torch.rand(9, generator=g) + 0.1
X = randn(7, 32)
PACKED = pack_weight_int8(B8)

BASES = {
    "embedding_bag": (ops.embedding_bag, [W, IDX, OFF, None, "sum", None, "raise", 8, None, False]),
    "embedding_bag_psw": (ops.embedding_bag, [W, IDX, OFF, randn(B * L), "sum", None, "raise", 8, None, False]),
    "embedding_bag_q8": (ops.embedding_bag, [rk.quantize_rowwise(W, 8), IDX, OFF, None, "mean", 3, "raise", 8, None, False]),
    "embedding_bag_q4": (ops.embedding_bag, [rk.quantize_rowwise(W, 4), IDX, OFF, None, "max", None, "clamp", 4, torch.float16, False]),
    "embedding_bag_i32": (ops.embedding_bag, [W.half(), IDX.int(), OFF.int(), None, "sum", None, "raise", 8, None, False]),
    "embedding_bag_backward": (ops.embedding_bag_backward, [randn(B, D), W, IDX, OFF, None, "sum", None, "raise", False]),
    "embedding_bag_backward_psw": (ops.embedding_bag_backward, [randn(B, D), W, IDX, OFF, randn(B * L), "sum", 2, "raise", True]),
    "embedding_bag_backward_max": (ops.embedding_bag_backward, [randn(B, D), W, IDX, OFF, None, "max", None, "raise", False]),
    "embedding_bag_grouped": (ops.embedding_bag_grouped, [[W, rk.quantize_rowwise(randn(30, 8), 8)], [IDX, randint(0, 30, 9)],
                               [OFF, torch.tensor([0, 4, 9, 9, 9, 9, 9])], [None, None], ["sum", "mean"], [-1, -1], [8, 8], [False, False],
                               "raise", torch.float32]),
    "pair_scores": (ops.pair_scores, [Q, IT, randint(0, U, P), randint(0, I, P), BIAS]),
    "pair_scores_q8": (ops.pair_scores, [Q, rk.quantize_rowwise(IT, 8), randint(0, U, P), randint(0, I, P), None]),
    "pair_scores_backward": (ops.pair_scores_backward, [randn(P), Q, IT, randint(0, U, P), randint(0, I, P), BIAS]),
    "candidate_scores": (ops.candidate_scores, [Q, IT, CO, CI, BIAS]),
    "candidate_topk": (ops.candidate_topk, [Q, IT, CO, CI, 4, BIAS]),
    "topk_scores": (ops.topk_scores, [Q, IT, 7, XO, XI, BIAS]),
    "topk_scores_q8": (ops.topk_scores, [randn(20, d), rk.quantize_rowwise(IT, 8), 7, None, None, None]),
    "int8_matmul": (ops.int8_matmul, [A8, B8, AS, BS, randn(9), "relu", torch.float32]),
    "int8_matmul_raw": (ops.int8_matmul, [A8, B8, None, None, None, "none", torch.int32]),
    "int8_linear": (ops.int8_linear, [X, B8, BS, randn(9), "none", "dynamic", None]),
    "int8_linear_packed": (ops.int8_linear_packed, [X, PACKED, BS, randn(9), "gelu", "dynamic", None]),
    "quantize_rowwise": (ops.quantize_rowwise, [W, 4]),
    "dequantize_rowwise": (ops.dequantize_rowwise, [rk.quantize_rowwise(W, 8), 8, torch.float32]),
    "quantize_rows_int8": (ops.quantize_rows_int8, [X]),
}

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool]

def tensor_mutations(t):
    yield "none", None
    for dt in DTYPES:
        if dt != t.dtype:
            yield f"dtype={dt}", t.to(dt)
    yield "0-d", t.reshape(-1)[:1].reshape(()) if t.numel() else torch.tensor(0, dtype=t.dtype)
    yield "unsqueeze", t.unsqueeze(0)
    if t.dim() >= 2:
        yield "flatten", t.reshape(-1)
        yield "transpose", t.t()
        yield "rows-1", t[:-1]
        yield "rows0", t[:0]
        yield "cols-1", t[:, :-1].contiguous()
        yield "cols+1", torch.cat([t, t[:, :1]], 1)
        yield "cols0", t[:, :0]
    if t.dim() == 1:
        yield "len-1", t[:-1]
        yield "len+1", torch.cat([t, t[-1:]])
        yield "len0", t[:0]
        yield "stride2", torch.cat([t, t])[::2]
        yield "2d", t.reshape(1, -1)
    if t.numel():
        if t.dtype.is_floating_point:
            for v in (float("nan"), float("inf"), -float("inf"), 1e38, 0.0):
                u = t.clone(); u.reshape(-1)[0] = v; yield f"first={v}", u
                u = t.clone(); u.reshape(-1)[-1] = v; yield f"last={v}", u
        elif t.dtype != torch.bool:
            info = torch.iinfo(t.dtype)
            for v in (-1, info.min, info.max, 2**31 - 1 if info.max >= 2**31 else info.max, N, I, U, 10**6):
                if info.min <= v <= info.max:
                    for pos in (0, -1, t.numel() // 2):
                        u = t.clone(); u.reshape(-1)[pos] = v; yield f"[{pos}]={v}", u
            if t.dim() == 1 and t.numel() > 2:
                yield "reversed", t.flip(0)
                yield "plus1", t + 1
                yield "minus1", t - 1

def mutations(args):
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            for name, m in tensor_mutations(a):
                yield f"arg{i} {name}", args[:i] + [m] + args[i + 1:]
        elif a is None:
            for name, m in [("W", W), ("idx", IDX), ("f32[3]", randn(3)), ("i64[3]", torch.arange(3)), ("scalar", torch.tensor(1.0))]:
                yield f"arg{i} None->{name}", args[:i] + [m] + args[i + 1:]
        elif isinstance(a, bool):
            yield f"arg{i} not", args[:i] + [not a] + args[i + 1:]
        elif isinstance(a, int):
            for v in (-1, 0, 1, 2, 3, 4, 5, 7, 9, 16, N - 1, N, I, I + 1, 2**31, 2**62):
                if v != a:
                    yield f"arg{i} ={v}", args[:i] + [v] + args[i + 1:]
            yield f"arg{i} None", args[:i] + [None] + args[i + 1:]
        elif isinstance(a, str):
            for v in ("", "sum", "mean", "max", "raise", "clamp", "zero", "none", "relu", "gelu", "dynamic", "static", "bogus"):
                if v != a:
                    yield f"arg{i} ={v!r}", args[:i] + [v] + args[i + 1:]
        elif isinstance(a, torch.dtype):
            for v in DTYPES + [None]:
                if v != a:
                    yield f"arg{i} ={v}", args[:i] + [v] + args[i + 1:]
        elif isinstance(a, list):
            for j, e in enumerate(a):
                sub = list(mutations([e]))
                for name, m in sub:
                    yield f"arg{i}[{j}] {name}", args[:i] + [a[:j] + m + a[j + 1:]] + args[i + 1:]
            yield f"arg{i} drop", args[:i] + [a[:-1]] + args[i + 1:]
            yield f"arg{i} empty", args[:i] + [[]] + args[i + 1:]

def run(op, args):
    args = [guarded(a) if isinstance(a, torch.Tensor) else ([guarded(e) for e in a] if isinstance(a, list) else a) for a in args]
    return op(*args)

def outcome(op, args):
    try:
        return "ok", run(op, args)
    except (ValueError, IndexError, TypeError, NotImplementedError) as e:
        return "raised", type(e).__name__ + ": " + str(e).splitlines()[0][:150]
    except RuntimeError as e:
        return "runtime", str(e).splitlines()[0][:200]
    except Exception as e:
        return "other", type(e).__name__ + ": " + str(e).splitlines()[0][:150]

def same(x, y):
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    if x is None or y is None:
        return x is None and y is None
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.is_sparse or y.is_sparse:
        x, y = x.to_dense(), y.to_dense()
    if x.dtype.is_floating_point:
        return torch.allclose(x.double(), y.double(), rtol=1e-3, atol=1e-3, equal_nan=True)
    return torch.equal(x, y)

def main(names, suffix):
    for name in names:
        op, base = BASES[name]
        opname = str(op._qualified_op_name).split("::")[1]
        ref = getattr(ops, opname + "_reference")
        if suffix:
            if not hasattr(ops, opname + suffix):
                continue
            op = getattr(ops, opname + suffix)
        counts = {"ok": 0, "raised": 0}
        weird = []
        for mname, margs in itertools.chain([("base", base)], mutations(base)):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                a, ra = outcome(op, margs), outcome(ref, margs)
                if a[0] == "ok" and ra[0] == "ok":
                    msg = "OK" if same(a[1], ra[1]) else "DIFFERENT results"
                elif a[0] == ra[0] == "raised":
                    msg = "RAISED " + a[1]
                else:
                    msg = f"MISMATCH ours {a[0]} {a[1] if a[0] != 'ok' else ''} | ref {ra[0]} {ra[1] if ra[0] != 'ok' else ''}"
                os.write(w, msg.encode()[:4000]); os._exit(0)
            os.close(w)
            out = os.read(r, 4096).decode(); os.close(r)
            _, st = os.waitpid(pid, 0)
            if os.WIFSIGNALED(st):
                weird.append(f"CRASH sig{os.WTERMSIG(st)}: {mname}")
            elif out.startswith(("RAISED", "MISMATCH ours raised")):  # (the reference checks nothing)
                counts["raised"] += 1
            elif out == "OK":
                counts["ok"] += 1
            else:
                weird.append(f"{out[:300]} <- {mname}")
        print(f"== {name}: {counts}")
        for x in weird:
            print("   ", x)
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:] or list(BASES), os.environ.get("SUFFIX", ""))
