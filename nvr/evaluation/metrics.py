"""Retrieval metrics with trec_eval semantics (checked against pytrec_eval to 1e-6 in tests/test_metrics.py).

Semantics, as measured on pytrec_eval (pytrec-eval-terrier 0.5):
- Ranking: documents sorted by score descending, ties broken by doc id descending (byte-wise string order, which is
  Python's ``str`` order for UTF-8), exactly as trec_eval does. Scores are compared as float64.
- Relevant means ``relevance >= relevance_level`` (1). NDCG uses linear gains equal to the graded relevance
  (negative grades count as 0) and a ``1/log2(rank + 1)`` discount; the ideal ranking is built from all judged
  documents of the query and cut at k too (trec_eval ``ndcg_cut``).
- ``recall@k`` = relevant in top k / all relevant; ``mrr@k`` = 1/rank of the first relevant in the top k (0 if none;
  trec_eval ``recip_rank`` on the run cut at k); ``map@k`` = sum of precision at each relevant rank <= k, divided by
  all relevant (trec_eval ``map_cut``); ``precision@k`` = relevant in top k / k (trec_eval ``P``).
- A query in the qrels with no relevant document scores 0 on every metric (it is not dropped).
- Queries in the run but not in the qrels are ignored. Queries in the qrels but not in the run are ignored too, like
  pytrec_eval (a query present in the run with an empty ranking scores 0); ``complete=True`` instead counts every
  qrels query absent from the run as 0 (trec_eval ``-c``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

METRICS = ("ndcg", "recall", "mrr", "map", "precision")
DEFAULT_METRICS = ("ndcg", "recall", "mrr", "map")

Run = Mapping[str, Mapping[str, float]]
QrelsLike = Mapping[str, Mapping[str, int]]


def evaluate_run(
    run: Run,
    qrels: QrelsLike,
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Sequence[str] = DEFAULT_METRICS,
    relevance_level: int = 1,
    complete: bool = False,
) -> dict[str, float]:
    """Mean over evaluated queries of each ``<metric>@<k>`` (e.g. ``ndcg@10``); 0.0 for all when none is evaluated.

    Which queries are evaluated is described in the module docstring (``complete`` adds qrels queries missing from
    the run, scored 0).
    """
    per_query = evaluate_run_per_query(run, qrels, k_values, metrics, relevance_level)
    names = metric_names(k_values, metrics)
    rows = list(per_query.values())
    n = len(rows) + (sum(1 for q in qrels if q not in run) if complete else 0)
    if n == 0:
        return dict.fromkeys(names, 0.0)
    return {name: math.fsum(r[name] for r in rows) / n for name in names}


def evaluate_run_per_query(
    run: Run,
    qrels: QrelsLike,
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Sequence[str] = DEFAULT_METRICS,
    relevance_level: int = 1,
) -> dict[str, dict[str, float]]:
    """``{qid: {"ndcg@10": ..., ...}}`` for every query present in both the run and the qrels (run order)."""
    ks = _check_args(k_values, metrics)
    out: dict[str, dict[str, float]] = {}
    for qid, scores in run.items():
        judged = qrels.get(qid)
        if judged is None:
            continue
        ranked = rank_documents(scores, max(ks), qid)
        out[qid] = _query_metrics(ranked, judged, ks, metrics, relevance_level)
    return out


def metric_names(k_values: Sequence[int], metrics: Sequence[str] = DEFAULT_METRICS) -> list[str]:
    return [f"{m}@{k}" for m in metrics for k in k_values]


def rank_documents(scores: Mapping[str, float], k: int, qid: str = "?") -> list[str]:
    """The top ``k`` doc ids in trec_eval order: score descending, then doc id descending."""
    items = [(float(s), d) for d, s in scores.items()]
    for s, d in items:
        if not math.isfinite(s):
            raise ValueError(f"query {qid!r}: score of doc {d!r} is not finite ({s})")
    return [d for _, d in heapq.nlargest(k, items)]


def _check_args(k_values: Sequence[int], metrics: Sequence[str]) -> list[int]:
    ks = [int(k) for k in k_values]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"k_values must be positive integers, got {list(k_values)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    return ks


def _query_metrics(
    ranked: list[str], judged: Mapping[str, int], ks: Iterable[int], metrics: Sequence[str], relevance_level: int
) -> dict[str, float]:
    """All metrics of one query from its ranked doc ids (at least max(k) long when available)."""
    grades = np.array([judged.get(d, 0) for d in ranked], dtype=np.float64)
    is_rel = grades >= relevance_level
    num_rel = sum(1 for g in judged.values() if g >= relevance_level)
    ideal = np.sort(np.maximum(np.fromiter(judged.values(), dtype=np.float64, count=len(judged)), 0.0))[::-1]
    gains = np.maximum(grades, 0.0)
    n = len(ranked)
    discount = 1.0 / np.log2(np.arange(2, max(n, len(ideal)) + 2, dtype=np.float64))
    dcg = np.cumsum(gains * discount[:n])
    idcg = np.cumsum(ideal * discount[: len(ideal)])
    hits = np.cumsum(is_rel)
    prec_sum = np.cumsum(np.where(is_rel, hits / np.arange(1, n + 1), 0.0))
    first_rel = int(np.argmax(is_rel)) + 1 if is_rel.any() else 0
    out: dict[str, float] = {}
    for k in ks:
        at = min(k, n)
        values = {
            "ndcg": _ratio(dcg[at - 1] if at else 0.0, idcg[min(k, len(ideal)) - 1] if len(ideal) else 0.0),
            "recall": _ratio(hits[at - 1] if at else 0, num_rel),
            "mrr": 1.0 / first_rel if 0 < first_rel <= k else 0.0,
            "map": _ratio(prec_sum[at - 1] if at else 0.0, num_rel),
            "precision": (hits[at - 1] if at else 0) / k,
        }
        for m in metrics:
            out[f"{m}@{k}"] = float(values[m])
    return out


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0
