"""ANN option (faiss IVF-Flat / HNSW): high recall against exact search, exact scores and deterministic order
among what it retrieves, reproducible, validated settings, part of the table key."""

from __future__ import annotations

import numpy as np
import pytest

from nvr.config.mining import TeacherConfig
from nvr.search.exact import exact_topk, score_pairs
from nvr.utils.errors import ConfigError

faiss = pytest.importorskip("faiss")
from nvr.search.ann import ann_topk  # noqa: E402


def clustered(seed: int, n_docs: int = 4000, n_queries: int = 30, dim: int = 16):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, dim)).astype(np.float32)
    docs = centers[rng.integers(0, 40, n_docs)] + 0.3 * rng.standard_normal((n_docs, dim)).astype(np.float32)
    queries = centers[rng.integers(0, 40, n_queries)] + 0.3 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    return queries, docs


@pytest.mark.parametrize(("method", "params"), [("ivf", {"nprobe": 16}), ("hnsw", {"ef_search": 128})])
def test_recall_exact_scores_and_reproducible(method: str, params: dict) -> None:
    queries, docs = clustered(0)
    order = np.random.default_rng(1).permutation(len(docs))
    _, exact = exact_topk(queries, docs, 20, doc_order=order)
    s, i = ann_topk(queries, docs, 20, method, params, order)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(i, exact)])
    assert recall > 0.9, recall
    rows = np.broadcast_to(np.arange(len(queries))[:, None], i.shape)
    np.testing.assert_array_equal(s, score_pairs(queries, docs, rows, i))  # exact scores
    assert (np.diff(s, axis=1) <= 0).all()  # sorted
    again = ann_topk(queries, docs, 20, method, params, order)
    assert again[0].tobytes() == s.tobytes() and again[1].tobytes() == i.tobytes()


def test_k_beyond_the_corpus_pads() -> None:
    queries, docs = clustered(2, n_docs=50)
    s, i = ann_topk(queries, docs, 80, "hnsw", {})
    assert (i[:, 50:] == -1).all() and np.isnan(s[:, 50:]).all()
    assert all(set(row[:50]) == set(range(50)) for row in i)  # HNSW with ef >= k finds the whole tiny corpus


def test_settings_are_validated_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"teachers\[t\]\.search_params\.nprobe.*not a hnsw parameter"):
        TeacherConfig(name="t", model_name_or_path="m", search="hnsw", search_params={"nprobe": 4})
    with pytest.raises(ConfigError, match=r"teachers\[t\]\.search_params\.nlist.*integer >= 1"):
        TeacherConfig(name="t", model_name_or_path="m", search="ivf", search_params={"nlist": 0})
    with pytest.raises(ConfigError, match=r"teachers\[t\]\.search_params\.m.*exact search takes no"):
        TeacherConfig(name="t", model_name_or_path="m", search_params={"m": 4})
    with pytest.raises(ConfigError, match=r"teachers\[t\]\.search\b"):
        TeacherConfig(name="t", model_name_or_path="m", search="lsh")  # type: ignore[arg-type]


def test_search_method_and_params_key_the_table(tiny_bert_dir, tmp_path) -> None:
    from nvr.teachers.dense import DenseTeacher

    prints = set()
    for search, params in (("exact", {}), ("ivf", {}), ("ivf", {"nprobe": 4}), ("hnsw", {})):
        t = DenseTeacher(TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir), device="cpu",
                                       dtype="float32", search=search, search_params=params), tmp_path)
        t._fingerprint = "fixed"
        prints.add(t.settings_fingerprint)
    assert len(prints) == 4
