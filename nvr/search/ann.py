"""Approximate nearest-neighbour search (faiss IVF-Flat / HNSW-Flat) for users who accept missed neighbours.

Exact search (``nvr.search.exact``) stays the default. Here a faiss index proposes ``k`` candidates per query;
they are re-scored exactly (fp64 accumulation, like every score the miner reports) and ordered by (score desc, doc
order asc), so the scores and the order among the retrieved documents are exact and reproducible, only the
candidate set is approximate. Reproducibility: the IVF k-means uses a seeded sample and seed; HNSW is built with one
thread (faiss' parallel insertion order is not deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from nvr.utils.errors import ConfigError

DEFAULTS: dict[str, dict[str, int | None]] = {
    "exact": {},
    "ivf": {"nlist": None, "nprobe": 32, "seed": 0},
    "hnsw": {"m": 32, "ef_search": 256, "ef_construction": 80},
}
"""Allowed ``search_params`` per method and their defaults (``nlist`` None: 4 sqrt(D))."""
_ADD_BLOCK = 65536


def check_search_params(method: str, params: Mapping[str, Any], prefix: str) -> None:
    """Reject unknown methods / keys and non-positive values, naming the config key."""
    if method not in DEFAULTS:
        raise ConfigError(f"{prefix}.search", f"must be one of {', '.join(DEFAULTS)}, got {method!r}")
    for key, value in params.items():
        if key not in DEFAULTS[method]:
            allowed = ", ".join(DEFAULTS[method]) or "none (exact search takes no parameters)"
            raise ConfigError(f"{prefix}.search_params.{key}", f"not a {method} parameter; allowed: {allowed}")
        low = 0 if key == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{prefix}.search_params.{key}", f"must be an integer >= {low}, got {value!r}")


def resolved_params(method: str, params: Mapping[str, Any], n_docs: int) -> dict[str, int]:
    """``params`` with the defaults filled in (what the index is built with)."""
    out = {**DEFAULTS[method], **params}
    if method == "ivf" and out["nlist"] is None:
        out["nlist"] = max(1, min(n_docs, int(4 * math.sqrt(max(n_docs, 1)))))
    return out  # type: ignore[return-value]


def ann_topk(
    queries: np.ndarray,
    docs: Any,
    k: int,
    method: str,
    params: Mapping[str, Any] | None = None,
    doc_order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores[Q, k] float32, idx[Q, k] int64)`` from a faiss ``ivf`` / ``hnsw`` index, padded with ``nan`` / -1
    where the index returned fewer than ``k`` documents; scores exact, ties by ``doc_order``."""
    import faiss

    from nvr.search.exact import as_row_source, rows_f32, score_pairs

    check_search_params(method, params or {}, "teacher")
    if method == "exact":
        raise ValueError("ann_topk: method 'exact' is nvr.search.exact.exact_topk")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    docs = as_row_source(docs)
    n_docs, dim = docs.shape
    p = resolved_params(method, params or {}, n_docs)
    scores = np.full((queries.shape[0], k), np.nan, dtype=np.float32)
    idx = np.full((queries.shape[0], k), -1, dtype=np.int64)
    if n_docs == 0 or queries.shape[0] == 0:
        return scores, idx
    threads = faiss.omp_get_max_threads()
    if method == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, p["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = p["seed"]
        sample = np.sort(np.random.default_rng(p["seed"]).choice(n_docs, min(n_docs, 256 * p["nlist"]),
                                                                 replace=False))
        index.train(np.ascontiguousarray(docs[sample], dtype=np.float32))
        index.nprobe = min(p["nprobe"], p["nlist"])
    else:
        index = faiss.IndexHNSWFlat(dim, p["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = max(p["ef_search"], k)
        faiss.omp_set_num_threads(1)  # deterministic graph
    try:
        for a in range(0, n_docs, _ADD_BLOCK):
            index.add(rows_f32(docs, a, a + _ADD_BLOCK))
    finally:
        faiss.omp_set_num_threads(threads)
    _, cand = index.search(queries, min(k, n_docs))
    cand = cand.astype(np.int64)
    rows = np.broadcast_to(np.arange(queries.shape[0])[:, None], cand.shape)
    exact = score_pairs(queries, docs, rows, cand)
    order = np.arange(n_docs) if doc_order is None else np.asarray(doc_order, dtype=np.int64)
    key = np.where(cand >= 0, order[np.maximum(cand, 0)], np.iinfo(np.int64).max)
    neg = np.where(cand >= 0, -exact.astype(np.float64), np.inf)
    perm = np.lexsort((key, neg), axis=1)
    width = cand.shape[1]
    scores[:, :width] = np.take_along_axis(exact, perm, axis=1)
    idx[:, :width] = np.take_along_axis(cand, perm, axis=1)
    return scores, idx
