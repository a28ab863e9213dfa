"""Full-corpus dense retrieval + trec_eval metrics from embeddings (shared by the callback and ``nvr eval``).

Memory stays at the embeddings plus one block of scores: the search is ``exact_topk`` with a memory bound, and
only the top ``max(k_values)`` documents per query become the run that ``evaluate_run`` scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nvr.data.beir import Qrels
from nvr.evaluation.metrics import evaluate_run
from nvr.search.exact import exact_topk

Run = dict[str, dict[str, float]]
DEFAULT_METRICS = ("ndcg", "recall", "mrr")


def trec_doc_order(doc_ids: Sequence[str]) -> np.ndarray:
    """Rank of each doc in trec_eval's tie order (doc id descending), so a tie group crossing the top-k cut
    keeps the same documents that ``evaluate_run`` would rank first."""
    order = sorted(range(len(doc_ids)), key=doc_ids.__getitem__, reverse=True)
    ranks = np.empty(len(doc_ids), dtype=np.int64)
    ranks[np.asarray(order, dtype=np.int64)] = np.arange(len(doc_ids), dtype=np.int64)
    return ranks


def search_run(
    query_emb: np.ndarray,
    doc_emb: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    k: int,
    memory_mb: int = 512,
) -> Run:
    """Top-``k`` documents per query by inner product, as a trec-style run ``{qid: {doc_id: score}}``."""
    if query_emb.shape[0] != len(query_ids) or doc_emb.shape[0] != len(doc_ids):
        raise ValueError(
            f"embeddings/ids mismatch: queries {query_emb.shape[0]} vs {len(query_ids)}, "
            f"docs {doc_emb.shape[0]} vs {len(doc_ids)}"
        )
    if query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(f"query dim {query_emb.shape[1]} != doc dim {doc_emb.shape[1]}")
    scores, idx = exact_topk(
        np.ascontiguousarray(query_emb, dtype=np.float32),
        np.ascontiguousarray(doc_emb, dtype=np.float32),
        k,
        memory_mb,
        doc_order=trec_doc_order(doc_ids),
    )
    scores = np.asarray(scores)
    idx = np.asarray(idx)
    run: Run = {}
    for row, qid in enumerate(query_ids):
        valid = idx[row] >= 0
        run[qid] = {doc_ids[int(j)]: float(s) for j, s in zip(idx[row][valid], scores[row][valid])}
    return run


def metric_names(k_values: Sequence[int], metrics: Sequence[str] = DEFAULT_METRICS) -> list[str]:
    """Names like ``ndcg@10`` for every metric at every cutoff (the keys of :func:`evaluate_embeddings`)."""
    return [f"{m}@{k}" for m in metrics for k in sorted(set(k_values))]


def evaluate_embeddings(
    query_emb: np.ndarray,
    doc_emb: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels: Qrels,
    k_values: Sequence[int] = (10, 100),
    memory_mb: int = 512,
) -> dict[str, float]:
    """Search the full corpus and score the run with trec_eval semantics; returns ``{"ndcg@10": ..., ...}``."""
    if not k_values or min(k_values) <= 0:
        raise ValueError(f"k_values must be positive cutoffs, got {tuple(k_values)}")
    run = search_run(query_emb, doc_emb, query_ids, doc_ids, max(k_values), memory_mb)
    scores = evaluate_run(run, qrels, k_values=tuple(sorted(set(k_values))), metrics=DEFAULT_METRICS)
    return {name: float(scores[name]) for name in metric_names(k_values) if name in scores}


def mean_over_datasets(per_dataset: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over datasets (BEIR convention: every dataset counts once)."""
    names = sorted({m for metrics in per_dataset.values() for m in metrics})
    return {m: float(np.mean([metrics[m] for metrics in per_dataset.values() if m in metrics])) for m in names}
