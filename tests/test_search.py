from __future__ import annotations

import numpy as np
import pytest

from nvr.search import exact as search
from nvr.search.exact import exact_topk, score_pairs


def brute_force(queries: np.ndarray, docs: np.ndarray, k: int, doc_order: np.ndarray | None = None):
    """Reference: full fp64 score matrix rounded to fp32, sorted by score desc then doc order asc."""
    order = np.arange(len(docs)) if doc_order is None else doc_order
    full = (queries.astype(np.float64) @ docs.astype(np.float64).T).astype(np.float32)
    ranked = np.lexsort((np.broadcast_to(order, full.shape), -full), axis=1)[:, :k]
    return np.take_along_axis(full, ranked, axis=1), ranked.astype(np.int64)


def tied_corpus(seed: int = 0, n_docs: int = 300, dim: int = 8):
    """Small-integer vectors (many exact score ties) plus exact duplicate docs scattered over the corpus."""
    rng = np.random.default_rng(seed)
    docs = rng.integers(-2, 3, size=(n_docs, dim)).astype(np.float32)
    dupes = [i for i in (7, 150, 151, 299, n_docs - 1) if 3 < i < n_docs]
    docs[dupes] = docs[min(3, n_docs - 1)]  # one tie group spread over block boundaries
    queries = rng.integers(-2, 3, size=(40, dim)).astype(np.float32)
    return queries, docs


@pytest.mark.parametrize("k", [1, 5, 17])
def test_matches_brute_force_with_ties(k: int) -> None:
    queries, docs = tied_corpus()
    order = np.random.default_rng(1).permutation(len(docs))
    scores, idx = exact_topk(queries, docs, k, doc_order=order)
    ref_s, ref_i = brute_force(queries, docs, k, order)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(scores, ref_s)
    assert scores.dtype == np.float32 and idx.dtype == np.int64


def test_tie_group_crossing_k_boundary_is_resolved_by_doc_order() -> None:
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(200, 16)).astype(np.float32)
    docs[50:120] = docs[0]  # 71 identical docs: far more than k + slack
    query = docs[:1] * 3.0
    order = np.arange(200)[::-1].copy()  # reverse id order: the largest indices must win the tie
    scores, idx = exact_topk(query, docs, 10, doc_order=order)
    assert list(idx[0]) == list(range(119, 109, -1))
    assert np.all(scores[0] == scores[0, 0])


def test_tiny_memory_budget_blocks_queries_and_docs_identically(monkeypatch) -> None:
    queries, docs = tied_corpus(seed=3, n_docs=500)
    full = exact_topk(queries, docs, 12)
    seen: list[tuple[int, int]] = []
    real = search._coarse_backend(False)

    def spy(xq, xb, k):
        seen.append((xq.shape[0], xb.shape[0]))
        return real(xq, xb, k)

    monkeypatch.setattr(search, "_coarse_backend", lambda use_gpu: spy)
    blocked = exact_topk(queries, docs, 12, memory_mb=0.001)
    assert max(q for q, _ in seen) < len(queries), "queries should have been split into blocks"
    assert max(d for _, d in seen) < len(docs), "the corpus should have been split into blocks"
    np.testing.assert_array_equal(blocked[1], full[1])
    np.testing.assert_array_equal(blocked[0], full[0])


def test_fewer_docs_than_k_pads() -> None:
    queries, docs = tied_corpus(n_docs=4)
    scores, idx = exact_topk(queries, docs, 7)
    ref_s, ref_i = brute_force(queries, docs, 4)
    np.testing.assert_array_equal(idx[:, :4], ref_i)
    np.testing.assert_array_equal(scores[:, :4], ref_s)
    assert (idx[:, 4:] == -1).all() and np.isnan(scores[:, 4:]).all()


def test_numpy_fallback_and_adversarial_coarse_order(monkeypatch) -> None:
    """The refine step must not trust the coarse backend's order or last-bit scores."""
    queries, docs = tied_corpus(seed=5)
    ref = brute_force(queries, docs, 9)
    monkeypatch.setattr(search, "_coarse_backend", lambda use_gpu: search._numpy_knn)
    np.testing.assert_array_equal(exact_topk(queries, docs, 9)[1], ref[1])

    rng = np.random.default_rng(0)

    def shuffled_noisy(xq, xb, k):
        s, i = search._numpy_knn(xq, xb, k)
        perm = rng.permuted(np.tile(np.arange(k), (len(xq), 1)), axis=1)
        noise = rng.uniform(-1e-6, 1e-6, size=s.shape).astype(np.float32)
        return np.take_along_axis(s, perm, axis=1) + noise, np.take_along_axis(i, perm, axis=1)

    monkeypatch.setattr(search, "_coarse_backend", lambda use_gpu: shuffled_noisy)
    np.testing.assert_array_equal(exact_topk(queries, docs, 9)[1], ref[1])


def test_random_unit_vectors_match_and_score_pairs_agree() -> None:
    rng = np.random.default_rng(2)
    docs = rng.normal(size=(1000, 32)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.normal(size=(30, 32)).astype(np.float32)
    scores, idx = exact_topk(queries, docs, 20, memory_mb=0.05)
    np.testing.assert_array_equal(idx, brute_force(queries, docs, 20)[1])
    rows = np.repeat(np.arange(30)[:, None], 20, axis=1)
    np.testing.assert_array_equal(score_pairs(queries, docs, rows, idx), scores)


def test_score_pairs_padding_and_bad_input() -> None:
    queries, docs = tied_corpus(n_docs=10)
    out = score_pairs(queries, docs, np.array([[0], [1]]), np.array([[2, -1], [3, 4]]))
    assert out.shape == (2, 2) and np.isnan(out[0, 1])
    assert out[1, 1] == np.float32(queries[1].astype(np.float64) @ docs[4].astype(np.float64))
    with pytest.raises(ValueError, match="k must be > 0"):
        exact_topk(queries, docs, 0)
    bad = docs.copy()
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match="docs embeddings contain nan"):
        exact_topk(queries, bad, 3)
    with pytest.raises(ValueError, match="doc_order"):
        exact_topk(queries, docs, 3, doc_order=np.arange(3))


@pytest.mark.parametrize(
    ("n_queries", "n_docs", "dim", "k", "memory_mb"),
    [(256, 20000, 32, 10, 1.0), (4, 50000, 16, 20, 0.5), (300, 4000, 64, 50, 2.0), (40, 30000, 8, 300, 0.25)],
)
def test_numpy_fallback_peak_memory_stays_within_budget(monkeypatch, n_queries, n_docs, dim, k, memory_mb):
    """Without faiss the matmul block, its negation and argpartition's int64 positions all count against
    ``memory_mb`` (they peaked at ~4x before). Only per-query result buffers may come on top."""
    import tracemalloc

    from nvr.search import exact as search

    monkeypatch.setattr(search, "_coarse_backend", lambda use_gpu: search._numpy_knn)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    docs = rng.standard_normal((n_docs, dim)).astype(np.float32)
    order = np.arange(n_docs)
    tracemalloc.start()
    try:
        scores, idx = search.exact_topk(queries, docs, k, memory_mb=memory_mb, doc_order=order)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    fetch = k + max(16, k // 4)
    per_query = 12 * fetch + 3 * 12 * k + 64  # coarse candidates, refined top-k, final scores/idx, norms
    assert peak <= memory_mb * 2**20 * 1.05 + n_queries * per_query
    exact = queries.astype(np.float64) @ docs.astype(np.float64).T
    assert np.array_equal(idx, np.argsort(-exact, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize(
    ("n_queries", "n_docs", "dim", "k", "memory_mb"),
    [(200, 20000, 16, 30000, 1.0), (64, 5000, 8, 6000, 0.5), (3, 100000, 8, 20000, 0.5), (10, 100000, 4, 50, 0.25)],
)
def test_numpy_fallback_memory_with_k_beyond_a_block_or_the_corpus(monkeypatch, n_queries, n_docs, dim, k, memory_mb):
    """k larger than one block (a single query's candidates exceed the budget) and D < k (every doc is a candidate):
    beyond ``memory_mb`` only the (Q, k) results, the coarse candidates (none when D <= k) and one query block's
    O(fetch) sort scratch may come on top; no O(D) order array is built when ``doc_order`` is None."""
    import tracemalloc

    from nvr.search import exact as search

    monkeypatch.setattr(search, "_coarse_backend", lambda use_gpu: search._numpy_knn)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    docs = rng.standard_normal((n_docs, dim)).astype(np.float32)
    tracemalloc.start()
    try:
        scores, idx = search.exact_topk(queries, docs, k, memory_mb=memory_mb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    k_eff = min(k, n_docs)
    fetch = min(n_docs, k_eff + max(16, k_eff // 4))
    coarse = 12 * n_queries * fetch if fetch < n_docs else 0
    assert peak <= memory_mb * 2**20 * 1.05 + 12 * n_queries * k + coarse + 64 * fetch + 2**16
    exact = (queries.astype(np.float64) @ docs.astype(np.float64).T).astype(np.float32)  # fp32 ties by doc order
    assert np.array_equal(idx[:, :k_eff], np.argsort(-exact, axis=1, kind="stable")[:, :k_eff])
    assert (idx[:, k_eff:] == -1).all() and np.isnan(scores[:, k_eff:]).all()
