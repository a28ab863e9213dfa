from __future__ import annotations

import numpy as np
import pytest

from nvr.config.mining import FilterConfig
from nvr.mining.ensembles import align_rows, cross_sample, intra_sample, per_teacher_selections
from nvr.mining.filters import apply_filter
from nvr.mining.samplers import ranked_survivors
from nvr.search.table import CandidateTable
from nvr.utils.seeding import rng_for

DOC_IDS = [f"d{i}" for i in range(12)]
NAIVE = FilterConfig(method="naive_topk")


def table(name: str, qids: list[str], cand: list[list[int]], is_pos=None) -> CandidateTable:
    cand_idx = np.asarray(cand, dtype=np.int64)
    n = cand_idx.shape[1]
    scores = np.where(cand_idx >= 0, np.linspace(0.9, 0.1, n, dtype=np.float32), np.nan).astype(np.float32)
    return CandidateTable(
        teacher=name, query_ids=qids, doc_ids=DOC_IDS, cand_idx=cand_idx, cand_scores=scores,
        cand_is_positive=np.zeros(cand_idx.shape, bool) if is_pos is None else np.asarray(is_pos, bool),
        pos_idx=np.zeros((len(qids), 1), np.int64), pos_scores=np.ones((len(qids), 1), np.float32),
    )


def two_teachers():
    a = table("A", ["q0"], [[5, 3, 7, 2, 11]])
    b = table("B", ["q0"], [[3, 9, 5, 1, 8]])
    return [a, b], [apply_filter(a, NAIVE), apply_filter(b, NAIVE)]


def test_intra_sample_no_dedup_keeps_agreed_repeats():
    tables, results = two_teachers()
    sel = intra_sample(tables, results, 4, dedup=False)
    assert sel.neg_idx.tolist() == [[5, 3, 3, 9]]
    assert sel.neg_teacher.tolist() == [[0, 1, 0, 1]]
    assert sel.neg_rank.tolist() == [[0, 0, 1, 1]]
    np.testing.assert_allclose(sel.neg_scores[0], [0.9, 0.9, 0.7, 0.7])


def test_intra_sample_dedup_replaces_by_next_unique_of_same_teacher():
    tables, results = two_teachers()
    sel = intra_sample(tables, results, 6, dedup=True)
    # round 0: A5, B3; round 1: A3 taken -> A7, B9; round 2: A2, B5 taken -> B1
    assert sel.neg_idx.tolist() == [[5, 3, 7, 9, 2, 1]]
    assert sel.neg_teacher.tolist() == [[0, 1, 0, 1, 0, 1]]
    assert sel.neg_rank.tolist() == [[0, 0, 2, 1, 3, 3]]


def test_intra_sample_respects_filters_and_exhausted_teachers():
    a = table("A", ["q0"], [[5, 3, 7, -1, -1]], is_pos=[[True, False, False, False, False]])
    b = table("B", ["q0"], [[3, -1, -1, -1, -1]])
    sel = intra_sample([a, b], [apply_filter(a, NAIVE), apply_filter(b, NAIVE)], 4, dedup=True)
    # A's survivors: 3, 7 (5 is a positive); B's: 3. Round 0: A3, B3 taken -> B exhausted; round 1: A7
    assert sel.neg_idx.tolist() == [[3, 7, -1, -1]]
    assert sel.n_selected.tolist() == [2]
    assert np.isnan(sel.neg_scores[0, 2:]).all() and sel.neg_teacher[0, 2:].tolist() == [-1, -1]


def test_intra_sample_aligns_rows_by_query_id():
    a = table("A", ["q0", "q1"], [[1, 2], [3, 4]])
    b = table("B", ["q1", "q0"], [[6, 7], [8, 9]])
    sel = intra_sample([a, b], [apply_filter(a, NAIVE), apply_filter(b, NAIVE)], 2)
    assert sel.query_ids == ["q0", "q1"]
    assert sel.neg_idx.tolist() == [[1, 8], [3, 6]]


def test_align_rejects_mismatched_doc_ids_and_queries():
    a = table("A", ["q0"], [[1, 2]])
    other = CandidateTable(**{**a.__dict__, "doc_ids": DOC_IDS[::-1], "teacher": "B"})
    with pytest.raises(ValueError, match="different doc_ids"):
        align_rows([a, other])
    with pytest.raises(ValueError, match="different query ids"):
        align_rows([a, table("C", ["qX"], [[1, 2]])])


def test_cross_sample_takes_all_k_from_one_seeded_teacher():
    qids = [f"q{i}" for i in range(200)]
    rng = np.random.default_rng(0)
    cand_a = np.stack([rng.permutation(12)[:6] for _ in qids])
    cand_b = np.stack([rng.permutation(12)[:6] for _ in qids])
    a, b = table("A", qids, cand_a.tolist()), table("B", qids, cand_b.tolist())
    per = per_teacher_selections([a, b], [ranked_survivors(np.ones((200, 6), bool), 3)] * 2)
    sel = cross_sample(per, seed=11)
    chosen = np.array([rng_for(11, "teacher", q).integers(2) for q in qids])
    assert 70 < chosen.sum() < 130
    for row in range(200):
        src = per[chosen[row]]
        assert sel.neg_idx[row].tolist() == src.neg_idx[row].tolist()
        assert set(sel.neg_teacher[row].tolist()) == {chosen[row]}
    # order independence: the same query gets the same teacher in a reversed run
    rev = cross_sample([s.subset(np.arange(199, -1, -1)) for s in per], seed=11)
    assert np.array_equal(rev.neg_idx[::-1], sel.neg_idx)


def test_per_teacher_selections_align_to_first_table():
    a = table("A", ["q0", "q1"], [[1, 2], [3, 4]])
    b = table("B", ["q1", "q0"], [[6, 7], [8, 9]])
    per = per_teacher_selections([a, b], [np.array([[0, 1], [1, -1]]), np.array([[1, -1], [0, 1]])])
    assert per[1].query_ids == ["q0", "q1"]
    assert per[1].neg_idx.tolist() == [[8, 9], [7, -1]]
    assert per[1].neg_teacher.tolist() == [[1, 1], [1, -1]]
