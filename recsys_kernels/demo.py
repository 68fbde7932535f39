"""End-to-end demo: train the Recommender in fp32, build its optimized int8 twin, and compare
ranking quality (NDCG@k, recall@k, hit rate@k on a held-out split) and the latency of serving a
batch of users (user tower + top-k retrieval over the whole catalog).

  fp32       nn.EmbeddingBag + nn.Linear MLP, retrieval with plain PyTorch (mm + bias, mask the
             user's training items, torch.topk): what a PyTorch user writes without this package
  optimized  a deep copy with the history bag as an int8 FusedEmbeddingBag, the MLP swapped to
             Int8Linear by quantize_ (ReLU fused into fc1's epilogue) and the item catalog stored
             int8 row-wise, retrieval with the fused topk_scores (no [B, I] score matrix)

The ranking metrics of both models come from `Recommender.recommend` (for the fp32 model: the
fp32 catalog through topk_scores, which returns the same lists as mm + topk); the plain PyTorch
path above is what the fp32 latency measures. The data is the seeded synthetic power-law set by
default (`--movielens DIR` reads a MovieLens-100K directory instead). Popularity and random
rankings are reported as baselines.

    python -m recsys_kernels.demo [--quick] [--epochs N] [--users U] [--items I] [--seed S]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from . import data as _data
from .models.recommender import (Recommender, baseline_rankings, evaluate, held_out_users, ranking_metrics,
                                 train_model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys-kernels demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (400 users, 300 items, dim 32, 8 epochs): a smoke test of a few seconds")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 4; 8 with --quick)")
    p.add_argument("--users", type=int, default=None, help="synthetic users (default 3000; 400 with --quick)")
    p.add_argument("--items", type=int, default=None, help="synthetic items (default 1500; 300 with --quick)")
    p.add_argument("--interactions", type=int, default=None,
                   help="mean interactions per synthetic user (default 30; 20 with --quick)")
    p.add_argument("--dim", type=int, default=None, help="embedding dim (default 64; 32 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and training (default 0)")
    p.add_argument("--movielens", metavar="PATH", default=None,
                   help="a MovieLens-100K directory (u.data, u.item) to use instead of synthetic data")
    p.add_argument("--k", type=int, default=10, help="cut-off of the ranking metrics (default 10)")
    p.add_argument("--num-test", type=int, default=2, help="held-out interactions per user (default 2)")
    p.add_argument("--batch-users", type=int, default=256, help="users per latency batch (default 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per latency (median; default 20)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="Adam L2 weight decay (default 1e-6)")
    p.add_argument("--device", default="cpu", help="torch device for the models, e.g. cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the model is small, and on a shared machine "
                        "extra threads mostly wait on each other)")
    p.add_argument("--no-progress", action="store_true", help="no training progress bar")
    return p


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    fill = {"epochs": (4, 8), "users": (3000, 400), "items": (1500, 300), "interactions": (30, 20),
            "dim": (64, 32), "repeats": (20, 5)}
    args = copy.copy(args)
    for name, (full, small) in fill.items():
        if getattr(args, name, None) is None:
            setattr(args, name, small if quick else full)
    return args


def build_optimized(model: Recommender) -> Recommender:
    """The int8 twin of a trained model (a deep copy; `model` is untouched)."""
    from .nn.embedding import FusedEmbeddingBag
    from .quant import quantize_

    opt = copy.deepcopy(model).eval()
    quantize_(opt.mlp)  # fc1+ReLU -> one Int8Linear with a fused epilogue, fc2 -> Int8Linear
    opt.history = FusedEmbeddingBag.from_embedding_bag(opt.history).quantize(8)
    opt.freeze_catalog(bits=8)  # item vectors as an int8 row-wise table for topk_scores
    return opt


@torch.no_grad()
def plain_torch_recommend(model: Recommender, users, k, hist_off, hist_items):
    """The fp32 serving path in plain PyTorch: user tower, scores = U V^T + b, mask seen items,
    torch.topk. The latency baseline."""
    q = model.user_vectors(users, hist_off, hist_items)
    scores = torch.addmm(model.item_bias(), q, model.item_vectors().T)
    rows = torch.repeat_interleave(torch.arange(users.numel(), device=users.device), hist_off.diff(),
                                   output_size=hist_items.numel())
    scores[rows, hist_items] = float("-inf")
    return torch.topk(scores, k, dim=1)


def _median_ms(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the kernels, not their launch

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _load(args) -> _data.InteractionData:
    if args.movielens is not None:  # (an empty path is a path: load_movielens says it has no u.data)
        return _data.load_movielens(args.movielens)
    return _data.synthetic_interactions(args.users, args.items, seed=args.seed,
                                        interactions_per_user=args.interactions,
                                        min_per_user=min(5, args.interactions))


def _split(args, full: _data.InteractionData) -> tuple[_data.InteractionData, _data.InteractionData]:
    """(train, test) with args.num_test held out per user; ValueError when nothing is held out
    (no user has more interactions than that): the metrics would be NaN."""
    train, test = _data.train_test_split(full, args.num_test)
    if len(test) == 0:
        raise ValueError(f"no user has more than --num-test={args.num_test} interactions, so nothing is held out "
                         "to evaluate on: lower --num-test, or use more interactions per user")
    return train, test


def _table(rows: list[tuple[str, dict, Optional[float]]], k: int) -> str:
    cols = (f"ndcg@{k}", f"recall@{k}", f"hit_rate@{k}", "mrr")
    head = f"{'model':<26}" + "".join(f"{c:>12}" for c in cols) + f"{'latency ms':>12}"
    lines = [head, "-" * len(head)]
    for name, m, ms in rows:
        lat = f"{ms:12.2f}" if ms is not None else f"{'-':>12}"
        lines.append(f"{name:<26}" + "".join(f"{m[c]:12.4f}" for c in cols) + lat)
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo described in the module docstring; prints a report and returns the numbers:
    {"data": {...}, "train_loss": [per epoch], "train_seconds", "metrics": {"random" | "popularity"
    | "fp32" | "optimized": {"ndcg@k", "recall@k", "hit_rate@k", "mrr", ...}}, "latency_ms":
    {"fp32", "optimized"}, "speedup": fp32 / optimized latency or None, "backends": {op: backend},
    "seconds", "optimized_error": None or why the optimized model could not be built}."""
    args = _defaults(args)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    k = args.k

    full = _load(args)
    train, test = _split(args, full)
    counts = full.item_counts().sort(descending=True).values
    top1pct = max(1, full.num_items // 100)
    info = {"source": args.movielens or "synthetic", "users": full.num_users, "items": full.num_items,
            "interactions": len(full), "train": len(train), "test": len(test),
            "top1pct_item_share": float(counts[:top1pct].sum()) / max(1, len(full))}
    print(f"data: {info['source']}: {info['users']} users, {info['items']} items, {info['interactions']} "
          f"interactions ({info['train']} train / {info['test']} held out); the top 1% of items get "
          f"{100 * info['top1pct_item_share']:.1f}% of the interactions")

    users, history, relevant = held_out_users(train, test)
    results = {name: ranking_metrics(ranked, relevant, k)
               for name, ranked in baseline_rankings(train, users, history, k, seed=args.seed).items()}

    device = torch.device(args.device)
    model = Recommender.for_data(train, dim=args.dim).to(device)
    t0 = time.perf_counter()
    losses = train_model(model, train, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                         seed=args.seed, progress=not args.no_progress)
    train_seconds = time.perf_counter() - t0
    print(f"trained {args.epochs} epochs in {train_seconds:.1f}s, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    results["fp32"] = evaluate(model, train, test, k)

    # latency: one batch of held-out users, their histories, top-k over the whole catalog
    batch = torch.arange(min(args.batch_users, users.numel()))
    b_users = users[batch].to(device)
    b_off, b_items = (t.to(device) for t in _data.csr_rows(*history, batch))
    latency = {"fp32": _median_ms(lambda: plain_torch_recommend(model, b_users, k, b_off, b_items),
                                  args.repeats, device)}

    optimized_error = None
    try:
        opt = build_optimized(model)
    except ImportError as e:  # the optimized modules are not there (a partial install)
        optimized_error = f"optimized model unavailable: {e}"
        print(optimized_error, file=sys.stderr)
    else:
        results["optimized"] = evaluate(opt, train, test, k)
        latency["optimized"] = _median_ms(lambda: opt.recommend(b_users, k, b_off, b_items), args.repeats, device)

    names = [("random", "random"), ("popularity", "popularity"), ("fp32", "fp32 (PyTorch)"),
             ("optimized", "int8 optimized")]
    print()
    print(_table([(label, results[n], latency.get(n)) for n, label in names if n in results], k))
    speedup = latency["fp32"] / latency["optimized"] if "optimized" in latency else None
    print(f"\nlatency: median of {args.repeats} runs, a batch of {b_users.numel()} users -> top-{k} of "
          f"{full.num_items} items, on {device} ({torch.get_num_threads()} CPU thread(s))"
          + (f"; speedup {speedup:.2f}x" if speedup else ""))
    seconds = time.perf_counter() - t_start
    backends = _backends_used(device.type) if "optimized" in latency else {}
    if backends:
        print("optimized ops ran on: " + ", ".join(f"{op}={b}" for op, b in backends.items()))
    print(f"total {seconds:.1f}s")
    return {"data": info, "train_loss": losses, "train_seconds": train_seconds, "metrics": results,
            "latency_ms": latency, "speedup": speedup, "backends": backends, "seconds": seconds,
            "optimized_error": optimized_error}


def _backends_used(device_type: str) -> dict[str, str]:
    """The backend that auto-selection picks for each op the optimized model runs."""
    from . import _backend

    used = {}
    for op in ("embedding_bag", "int8_linear", "topk_scores", "quantize_rowwise"):
        try:
            used[op] = _backend.resolve(op, device_type)[0]
        except Exception as e:  # an op family that is not registered: say so, do not fail the demo
            used[op] = f"unavailable ({type(e).__name__})"
    return used


POSITIVE_ARGS = ("epochs", "users", "items", "interactions", "dim", "repeats", "batch_users", "k", "num_test", "threads")


def bad_count_arg(args, command: str, extra: tuple[str, ...] = ()) -> bool:
    """Print the first of the POSITIVE_ARGS (and `extra`, the command's own) of `args` that is
    < 1 (the usage error of `command`)."""
    for name in POSITIVE_ARGS + extra:
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"recsys-kernels {command}: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return True
    return False


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if bad_count_arg(args, "demo"):
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"recsys-kernels demo: --device: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("recsys-kernels demo: --device cuda: no CUDA GPU is available", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run_demo(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"recsys-kernels demo: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(previous_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
