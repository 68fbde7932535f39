"""`recsys-kernels compress`: train the demo's Recommender, compress it several ways, print the
measured report of every configuration, the targets met or missed, the fx pass report of the
scoring path, and write a PNG chart (quality vs bytes and vs latency).

Configurations (--configs, comma separated):
  int8            int8 everywhere: int8 tables, int8 MLP (ReLU fused), int8 catalog, bias folded
  int4-struct50   int4 user/history tables, 50% of the MLP's hidden neurons removed, a short
                  retrain, int8 MLP, int8 item table = catalog
  rows50-int8     50% of user and history rows pruned by frequency (shared mean row), a short
                  retrain, then int8 everywhere
  prune90         90% magnitude pruning of the MLP, short retrain, SparseLinear (CSR) where the
                  sparsity passes the measured break-even (float model)
  nm24-int8       2:4 pruning of the MLP, short retrain, int8 everywhere
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

import torch

from ..demo import bad_count_arg

CONFIGS = {
    "int8": dict(quantize="int8", embeddings=8),
    "int4-struct50": dict(quantize="int8", embeddings=4, structured=0.5, retrain=True),
    "rows50-int8": dict(quantize="int8", embeddings=8, rows=0.5, retrain=True),
    "prune90": dict(prune=0.9, retrain=True),
    "nm24-int8": dict(quantize="int8", embeddings=8, nm=True, retrain=True),
}
DEFAULT_CONFIGS = "int8,int4-struct50,rows50-int8,prune90"

# the targets: (config, NDCG@10 relative loss at most, bytes smaller by at least,
# scoring + top-k faster by at least)
TARGETS = {"int8": (0.01, 3.5, 2.0), "int4-struct50": (0.03, 6.0, None)}


def build_parser() -> argparse.ArgumentParser:
    from .. import demo

    p = demo.build_parser()
    p.prog = "recsys-kernels compress"
    p.description = __doc__
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated configurations of {sorted(CONFIGS)} (default {DEFAULT_CONFIGS})")
    p.add_argument("--retrain-epochs", type=int, default=2, help="short retrain after pruning (default 2)")
    p.add_argument("--retrain-lr", type=float, default=5e-3, help="learning rate of the retrain (default 5e-3)")
    p.add_argument("--plot", default="compress_report.png", help="PNG chart path ('' for none)")
    p.add_argument("--json", default=None, help="also write the reports as JSON here")
    return p


def _met(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def _targets(name: str, rep, retrained_ndcg: Optional[float]) -> list[str]:
    if name not in TARGETS:
        return []
    ndcg_max, bytes_min, lat_min = TARGETS[name]
    r = rep.ratios()
    out = [f"  NDCG@{rep.k} within {ndcg_max:.0%} of the fp32 input: {_met(r['ndcg_rel'] >= -ndcg_max)} "
           f"(measured {100 * r['ndcg_rel']:+.2f}%)"]
    if retrained_ndcg and any("retrain" in s.step for s in rep.steps):
        rel = rep.final.ndcg / retrained_ndcg - 1
        out.append(f"  NDCG@{rep.k} within {ndcg_max:.0%} of the fp32 input trained as many more epochs "
                   f"(NDCG {retrained_ndcg:.4f}): {_met(rel >= -ndcg_max)} (measured {100 * rel:+.2f}%)")
    out += [
           f"  bytes >= {bytes_min}x smaller: {'MET' if r['bytes_x'] >= bytes_min else 'MISSED'} (measured {r['bytes_x']:.2f}x)"]
    if lat_min is not None and r["latency_x"] is not None:
        out.append(f"  scoring + top-k >= {lat_min}x faster: {'MET' if r['latency_x'] >= lat_min else 'MISSED'} "
                   f"(measured {r['latency_x']:.2f}x)")
    return out


def _graph_section(model, ev, repeats: int) -> list[str]:
    """The fx passes on the fp32 scoring path: what they replaced, the largest score change
    and the measured scoring time of each variant."""
    from .. import graph as G
    from .pipeline import interleaved_medians_ms

    lines = []
    args = (ev.pair_users, ev.pair_items, *ev.pair_hist)
    with torch.no_grad():
        ref = model.score(*args)
        variants = [("traced fp32", *G.optimize_graph(model, embedding_bags=False, int8=False)),
                    ("fused bag + int8 Linear", *G.optimize_graph(model)),
                    ("Linear -> 1x1 conv", *G.optimize_graph(model, int8=False, conv1x1=True))]
        times = interleaved_medians_ms([lambda gm=gm: gm(*args) for _, gm, _ in variants], repeats)
        for (name, gm, rep), ms in zip(variants, times):
            out = gm(*args)
            lines.append(f"{name:<26} max |score diff| {float((out - ref).abs().max()):.2e}   scoring {ms:7.2f} ms")
            lines += ["    " + s for s in str(rep).splitlines()]
    return lines


def run(args: argparse.Namespace) -> dict:
    from ..demo import _defaults, _load, _split
    from ..models.recommender import Recommender, train_model
    from .pipeline import EvalData, optimize
    from .plot import plot_reports

    args = _defaults(args)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        raise ValueError(f"--configs: unknown {bad}; choose from {sorted(CONFIGS)}")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    full = _load(args)
    train, test = _split(args, full)
    print(f"data: {args.movielens or 'synthetic'}: {full.num_users} users, {full.num_items} items, "
          f"{len(full)} interactions ({len(train)} train / {len(test)} held out)")
    model = Recommender.for_data(train, dim=args.dim)
    losses = train_model(model, train, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                         seed=args.seed, progress=not args.no_progress)
    print(f"trained fp32 model: {args.epochs} epochs, loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    retrained_ndcg = None
    if any(CONFIGS[n].get("retrain") for n in names):
        # the fair reference for a pruned-and-retrained model: the fp32 model given the same
        # extra epochs (else part of any gain or loss is the extra training, not the pruning)
        import copy

        from .pipeline import EvalData as _Ev, ranked_lists
        from .. import metrics as _metrics

        ref = copy.deepcopy(model)
        train_model(ref, train, epochs=args.retrain_epochs, lr=args.retrain_lr, seed=args.seed + 1, progress=False)
        ev0 = _Ev.build(train, test, args.batch_users, seed=args.seed)
        retrained_ndcg = float(_metrics.ndcg_at_k(ranked_lists(ref, ev0, args.k), ev0.relevant, args.k))
        print(f"reference: the fp32 model trained {args.retrain_epochs} more epoch(s) (lr {args.retrain_lr}) "
              f"has NDCG@{args.k} {retrained_ndcg:.4f}")

    reports = {}
    for name in names:
        cfg = dict(CONFIGS[name])
        retrain = cfg.pop("retrain", False)
        nm = cfg.pop("nm", False)
        t0 = time.perf_counter()
        if nm:  # N:M has no optimize() flag of its own: prune a copy, then compress that
            import copy

            from .pruning import keep_zeros, nm_prune_

            base = copy.deepcopy(model)
            nm_prune_(base.mlp, 2, 4)
            if retrain:
                with keep_zeros(base.mlp):
                    train_model(base, train, epochs=args.retrain_epochs, lr=args.retrain_lr, seed=args.seed + 1,
                                progress=False)
            _, rep = optimize(base, data=(train, test), k=args.k, batch_users=args.batch_users,
                              repeats=args.repeats, threads=args.threads, seed=args.seed, name=name, **cfg)
            rep.steps[0].step = "fp32 2:4-pruned + retrained"
            # measured against the unpruned model, so that the ratios say what 2:4 costs
            _, base_rep = optimize(model, data=(train, test), k=args.k, batch_users=args.batch_users,
                                   repeats=args.repeats, threads=args.threads, seed=args.seed)
            rep.steps.insert(0, base_rep.steps[0])
        else:
            _, rep = optimize(model, data=(train, test), k=args.k, batch_users=args.batch_users,
                              repeats=args.repeats, threads=args.threads, seed=args.seed, name=name,
                              retrain_epochs=args.retrain_epochs if retrain else 0, retrain_lr=args.retrain_lr,
                              **cfg)
        reports[name] = rep
        print(f"\n== {name} ({time.perf_counter() - t0:.1f}s; latency: {rep.setup})")
        print(rep.table())
        r = rep.ratios()
        print(f"final vs fp32: bytes {r['bytes_x']:.2f}x smaller, scoring + top-k "
              f"{r['latency_x']:.2f}x faster, NDCG@{args.k} {100 * r['ndcg_rel']:+.2f}%")
        for line in _targets(name, rep, retrained_ndcg):
            print(line)

    ev = EvalData.build(train, test, args.batch_users, seed=args.seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        print("\n== fx passes on the fp32 scoring path (Recommender.score, "
              f"{ev.pair_users.numel()} pairs, median of {args.repeats})")
        for line in _graph_section(model, ev, args.repeats):
            print(line)
    finally:
        torch.set_num_threads(previous)
    from ..demo import _backends_used

    print("\nops ran on: " + ", ".join(f"{op}={b}" for op, b in _backends_used("cpu").items()))
    if args.plot:
        plot_reports(list(reports.values()), args.plot)
        print(f"plot: {args.plot} (built-in PNG writer; matplotlib is not used)")
    out = {name: rep.to_dict() for name, rep in reports.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"total {time.perf_counter() - t_start:.1f}s")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if bad_count_arg(args, "compress", extra=("retrain_epochs",)):
        return 2
    if args.device != "cpu":
        print("recsys-kernels compress: CPU only (--device cpu)", file=sys.stderr)
        return 2
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"recsys-kernels compress: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
