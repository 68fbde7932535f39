"""`optimize(model, ...)`: compress a trained Recommender step by step, measuring every step.

Each step works on a deep copy (the model passed in is never modified) and is followed by a
measurement of the model as it stands: stored weights (and how many are non-zero), bytes (of
the state a checkpoint holds; run-time caches such as packed weights are listed in the notes),
CPU latency of scoring a batch of (user, item) pairs and of top-k retrieval over the whole
catalog (median of `repeats` timed runs after a warm-up, on `threads` intra-op threads), and
NDCG@k / recall@k / DCG@k on the held-out split. Nothing in the report is a constant: every
number is read off the model or a clock.

Step order: structured pruning -> magnitude pruning -> embedding-row pruning -> short retrain
(pruned weights kept at zero) -> content bias folded (int8 only) -> table quantization -> int8
MLP + int8 catalog -> SparseLinear for layers past the CSR break-even (float MLPs only).
`CompressionReport.ratios()` takes the latency ratio from a final paired run in which the input
and the optimized model are timed in turns (on a shared machine load shifts between steps).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import data as _data
from .. import metrics as _metrics
from .pruning import keep_zeros, magnitude_prune_, structured_prune_
from .recommender import (freeze_int8_, model_bytes, prune_rows_, quantize_mlp_, quantize_tables_,
                          serving_params)
from .sparse import BREAK_EVEN_SPARSITY, sparsify_


@dataclass
class StepResult:
    step: str
    params: int
    nonzero: int
    bytes: int
    score_ms: Optional[float] = None
    topk_ms: Optional[float] = None
    ndcg: Optional[float] = None
    recall: Optional[float] = None
    dcg: Optional[float] = None
    notes: list[str] = field(default_factory=list)


@dataclass
class CompressionReport:
    """One StepResult per step, the first being the untouched input model. `k` is the metric
    cut-off; `setup` says how latency was measured."""
    steps: list[StepResult] = field(default_factory=list)
    k: int = 10
    setup: str = ""
    name: str = ""
    # (input score, input top-k, final score, final top-k) ms, timed interleaved: the two models
    # take turns run by run, so load changes on a shared machine hit both alike
    paired_ms: Optional[tuple[float, float, float, float]] = None

    @property
    def baseline(self) -> StepResult:
        return self.steps[0]

    @property
    def final(self) -> StepResult:
        return self.steps[-1]

    def ratios(self) -> dict[str, Optional[float]]:
        """final vs baseline: bytes_x (smaller by), latency_x (scoring + top-k, faster by),
        ndcg_rel (relative NDCG change, e.g. -0.01 = 1% worse)."""
        b, f = self.baseline, self.final
        out = {"bytes_x": b.bytes / f.bytes if f.bytes else None, "latency_x": None, "ndcg_rel": None}
        if self.paired_ms is not None:
            bs, bt, fs, ft = self.paired_ms
            out["latency_x"] = (bs + bt) / (fs + ft)
        elif None not in (b.score_ms, b.topk_ms, f.score_ms, f.topk_ms):
            out["latency_x"] = (b.score_ms + b.topk_ms) / (f.score_ms + f.topk_ms)
        if b.ndcg and f.ndcg is not None:
            out["ndcg_rel"] = f.ndcg / b.ndcg - 1.0
        return out

    def table(self) -> str:
        k = self.k
        head = (f"{'step':<34}{'params':>10}{'nonzero':>10}{'bytes':>11}{'x':>6}{'score ms':>10}{'top-k ms':>10}"
                f"{'ndcg@' + str(k):>10}{'recall@' + str(k):>11}{'dcg@' + str(k):>9}")
        lines = [head, "-" * len(head)]
        base = self.baseline.bytes

        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"

        for s in self.steps:
            lines.append(f"{s.step[:33]:<34}{s.params:>10}{s.nonzero:>10}{s.bytes:>11}{base / s.bytes:>6.2f}"
                         f"{num(s.score_ms, '10.2f'):>10}{num(s.topk_ms, '10.2f'):>10}{num(s.ndcg, '10.4f'):>10}"
                         f"{num(s.recall, '11.4f'):>11}{num(s.dcg, '9.4f'):>9}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "k": self.k, "setup": self.setup, "steps": [asdict(s) for s in self.steps],
                "ratios": self.ratios(), "paired_ms": self.paired_ms}

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------- measurement
_clock = time.perf_counter  # a module attribute, so tests can drive it


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = _clock()
        fn()
        times.append(_clock() - t0)
    return 1e3 * statistics.median(times)


def interleaved_medians_ms(fns: list[Callable[[], object]], repeats: int, warmup: int = 2) -> list[float]:
    """Median ms of each fn, timed in turns (fn0, fn1, ..., fn0, fn1, ...)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = _clock()
            fn()
            t.append(_clock() - t0)
    return [1e3 * statistics.median(t) for t in times]


@torch.no_grad()
def paired_latency(base: nn.Module, other: nn.Module, ev: "EvalData", k: int, repeats: int
                   ) -> tuple[float, float, float, float]:
    """(base score, base top-k, other score, other top-k) ms, timed interleaved."""
    pairs = (ev.pair_users, ev.pair_items, *ev.pair_hist)
    batch = (ev.batch_users, k, *ev.batch_hist)
    bs, fs = interleaved_medians_ms([lambda: base.score(*pairs), lambda: other.score(*pairs)], repeats)
    bt, ft = interleaved_medians_ms([lambda: base.recommend(*batch), lambda: other.recommend(*batch)], repeats)
    return bs, bt, fs, ft


@dataclass
class EvalData:
    """Held-out evaluation and latency inputs, built once per (train, test) split."""
    train: "_data.InteractionData"
    test: "_data.InteractionData"
    users: Tensor
    history: tuple[Tensor, Tensor]
    relevant: tuple[Tensor, Tensor]
    batch_users: Tensor
    batch_hist: tuple[Tensor, Tensor]
    pair_users: Tensor
    pair_items: Tensor
    pair_hist: tuple[Tensor, Tensor]

    @classmethod
    def build(cls, train, test, batch_users: int = 256, items_per_user: int = 4, seed: int = 0) -> "EvalData":
        from ..models.recommender import held_out_users

        users, history, relevant = held_out_users(train, test)
        rows = torch.arange(min(batch_users, users.numel()))
        b_hist = _data.csr_rows(*history, rows)
        # scoring batch: each batch user against `items_per_user` random items, one history row per pair
        g = torch.Generator().manual_seed(seed)
        pair_rows = rows.repeat_interleave(items_per_user)
        pair_items = torch.randint(0, train.num_items, (pair_rows.numel(),), generator=g)
        return cls(train, test, users, history, relevant, users[rows], b_hist, users[pair_rows], pair_items,
                   _data.csr_rows(*history, pair_rows))


@torch.no_grad()
def ranked_lists(model: nn.Module, ev: EvalData, k: int, chunk: int = 1024) -> Tensor:
    """Each held-out user's top-k (training items excluded), via model.recommend."""
    out = []
    for start in range(0, ev.users.numel(), chunk):
        rows = torch.arange(start, min(start + chunk, ev.users.numel()))
        off, items = _data.csr_rows(*ev.history, rows)
        out.append(model.recommend(ev.users[rows], k, off, items)[1])
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.int64)


@torch.no_grad()
def measure(model: nn.Module, ev: Optional[EvalData], name: str, *, k: int = 10, repeats: int = 10,
            notes: Optional[list[str]] = None) -> StepResult:
    """One StepResult for `model` as it stands (see the module doc)."""
    model.eval()
    params, nonzero = serving_params(model)
    res = StepResult(name, params, nonzero, model_bytes(model), notes=list(notes or []))
    cache = model_bytes(model, caches=True) - res.bytes
    if cache:
        res.notes.append(f"bytes count the state (state_dict); run-time caches rebuilt from it add {cache} "
                         "(Int8Linear's packed weights)")
    if ev is None:
        return res
    ranked = ranked_lists(model, ev, k)
    res.ndcg = float(_metrics.ndcg_at_k(ranked, ev.relevant, k))
    res.recall = float(_metrics.recall_at_k(ranked, ev.relevant, k))
    res.dcg = float(_metrics.dcg_at_k(ranked, ev.relevant, k))
    res.score_ms = _median_ms(lambda: model.score(ev.pair_users, ev.pair_items, *ev.pair_hist), repeats)
    res.topk_ms = _median_ms(lambda: model.recommend(ev.batch_users, k, *ev.batch_hist), repeats)
    return res


# ----------------------------------------------------------------------------- the pipeline
def optimize(model: nn.Module, *, quantize: Optional[str] = None, embeddings: Optional[int] = None,
             prune: Optional[float] = None, structured: Optional[float] = None, rows: Optional[float] = None,
             rows_by: str = "frequency", rows_default: str = "mean", retrain_epochs: int = 0,
             retrain_lr: float = 5e-3, data=None, k: int = 10, batch_users: int = 256, repeats: int = 10,
             threads: Optional[int] = 1, seed: int = 0, measure_steps: bool = True, name: str = "",
             progress: bool = False) -> tuple[nn.Module, CompressionReport]:
    """Compress a trained Recommender; returns (optimized deep copy, CompressionReport).

    quantize: None | "int8": content bias folded, the MLP -> Int8Linear (quantize_), the item
      table -> int8, which then is the retrieval catalog (one copy).
    embeddings: None | 8 | 4: user and history tables to int8/int4 row-wise; the item table goes
      to `embeddings` bits too, except that with quantize="int8" it stays int8 (it doubles as
      the catalog, and topk_scores reads int8 catalogs only).
    prune: fraction of the MLP's weights zeroed by global magnitude pruning.
    structured: fraction of the MLP's hidden neurons removed (fc1 rows, fc2 columns).
    rows: fraction of user-table and history-bag rows pruned (by `rows_by` = "frequency" |
      "norm"; pruned ids map to one shared default row, `rows_default` = "mean" | "zero" |
      "drop", see compress.embedding).
    retrain_epochs: after pruning, train this many epochs (lr `retrain_lr`), magnitude-pruned
      weights held at zero. Needs data.
    data: (train, test) InteractionData for quality, latency and retraining; None measures
      parameters and bytes only.
    threads: intra-op threads while measuring (restored after); None leaves them.
    """
    from ..models.recommender import Recommender, train_model

    if not isinstance(model, Recommender):
        raise TypeError(f"model must be a Recommender, got {type(model).__name__}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if embeddings not in (None, 4, 8):
        raise ValueError(f"embeddings must be None, 8 or 4, got {embeddings!r}")
    if retrain_epochs and data is None:
        raise ValueError("retrain_epochs needs data=(train, test)")
    if model.catalog is not None:
        raise ValueError("model has a frozen catalog; optimize the trainable model")
    train, test = data if data is not None else (None, None)
    ev = EvalData.build(train, test, batch_users, seed=seed) if (data is not None and measure_steps) else None
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    report = CompressionReport(k=k, name=name, setup=(
        f"median of {repeats} runs, {torch.get_num_threads()} thread(s); scoring: "
        f"{ev.pair_users.numel()} pairs; top-k: {ev.batch_users.numel()} users x {model.num_items} items"
        if ev is not None else "no data: bytes and parameters only"))

    def step(name: str, notes: list[str]) -> None:
        if measure_steps or name == "final":
            report.steps.append(measure(opt, ev, name, k=k, repeats=repeats, notes=notes))
            if progress:
                print(f"  measured: {name}", flush=True)

    try:
        base = copy.deepcopy(model).eval()  # the input as it was, for the paired timing
        opt = copy.deepcopy(model).eval()
        step("fp32 (input)", [])
        pruned = False
        if structured:
            r = structured_prune_(opt.mlp, structured)
            step(f"structured {structured:.0%} MLP neurons", [str(r)])
            pruned = True
        if prune:
            r = magnitude_prune_(opt.mlp, prune, scope="global")
            step(f"magnitude {prune:.0%} MLP weights", [str(r)])
            pruned = True
        if rows:
            notes = prune_rows_(opt, rows, by=rows_by, train_data=train, default=rows_default)
            step(f"rows {rows:.0%} user/history ({rows_by})", notes)
            pruned = True
        if retrain_epochs:
            with keep_zeros(opt.mlp):
                losses = train_model(opt, train, epochs=retrain_epochs, lr=retrain_lr, seed=seed + 1,
                                     progress=progress)
            step(f"retrain {retrain_epochs} epoch(s)" + ("" if pruned else " (nothing pruned)"),
                 [f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"])
        if quantize == "int8":
            # graph trimming: the content bias depends on no input -> one constant per item
            before = model_bytes(opt)
            opt.fold_item_bias()
            step("fold content bias", [f"attr_emb, feat_proj, item_attr, item_feat -> folded_bias "
                                       f"({before - model_bytes(opt)} bytes less)"])
        if embeddings:
            names = ("user_emb", "history") if quantize == "int8" and embeddings == 4 else \
                ("user_emb", "item_emb", "history")
            notes = quantize_tables_(opt, embeddings, names)
            if quantize == "int8" and embeddings == 4:
                notes += quantize_tables_(opt, 8, ("item_emb",))
            step(f"int{embeddings} tables", notes)
        if quantize == "int8":
            notes = quantize_mlp_(opt)
            if not embeddings:
                notes += quantize_tables_(opt, 8, ("item_emb",))
            notes += freeze_int8_(opt)
            step("int8 MLP + int8 catalog", notes)
        elif prune:
            converted = sparsify_(opt.mlp, BREAK_EVEN_SPARSITY)
            step("SparseLinear (CSR)" if converted else "dense kept (below CSR break-even)",
                 [f"{n} -> SparseLinear" for n in converted])
        if not measure_steps:
            step("final", [])
        if ev is not None:
            report.paired_ms = paired_latency(base, opt, ev, k, repeats)
    finally:
        torch.set_num_threads(previous_threads)
    return opt, report
