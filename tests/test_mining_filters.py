from __future__ import annotations

import time

import numpy as np
import pytest

from nvr.config.mining import FilterConfig
from nvr.mining.filters import (
    Reason,
    anchor_scores,
    apply_filter,
    eligible,
    naive_topk,
    percpos_threshold,
    topk_abs,
    topk_marginpos,
    topk_percpos,
    topk_shifted,
)
from nvr.search.table import CandidateTable

NAN = np.nan


def make_table(cand_idx, cand_scores, is_pos, pos_scores, pos_idx=None) -> CandidateTable:
    cand_idx = np.asarray(cand_idx, dtype=np.int64)
    pos_scores = np.asarray(pos_scores, dtype=np.float32)
    if pos_idx is None:
        pos_idx = np.where(np.isnan(pos_scores), -1, 0)
    q = cand_idx.shape[0]
    return CandidateTable(
        teacher="t",
        query_ids=[f"q{i}" for i in range(q)],
        doc_ids=[f"d{i}" for i in range(max(10, int(cand_idx.max()) + 1))],
        cand_idx=cand_idx,
        cand_scores=np.asarray(cand_scores, dtype=np.float32),
        cand_is_positive=np.asarray(is_pos, dtype=bool),
        pos_idx=np.asarray(pos_idx, dtype=np.int64),
        pos_scores=pos_scores,
    )


def test_eligible_excludes_padding_and_positives():
    t = make_table([[1, 2, 3, -1]], [[0.9, 0.8, 0.7, NAN]], [[False, True, False, False]], [[0.8]])
    assert eligible(t).tolist() == [[True, False, True, False]]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("min", [0.6, -0.5, NAN]), ("mean", [0.7, -0.5, NAN]), ("max", [0.8, -0.5, NAN])],
)
def test_anchor_policies_ignore_nan_pads(policy, expected):
    pos = np.array([[0.8, 0.6, NAN], [-0.5, NAN, NAN], [NAN, NAN, NAN]], dtype=np.float32)
    np.testing.assert_allclose(anchor_scores(pos, policy), expected, rtol=1e-6)


def test_anchor_unknown_policy_errors():
    with pytest.raises(ValueError, match="anchor policy"):
        anchor_scores(np.zeros((1, 1)), "median")  # type: ignore[arg-type]


def test_naive_topk_is_eligible_copy():
    e = np.array([[True, False, True]])
    out = naive_topk(e)
    assert out.tolist() == e.tolist() and out is not e


def test_shift_counts_only_eligible_candidates():
    # positive at column 1 and padding at column 5 do not use up the shift of 2
    e = np.array([[True, False, True, True, True, False], [False, False, True, False, False, False]])
    assert topk_shifted(e, 2).tolist() == [
        [False, False, False, True, True, False],
        [False, False, False, False, False, False],
    ]
    assert topk_shifted(e, 0).tolist() == e.tolist()


def test_topk_abs_is_strict():
    s = np.array([[0.71, 0.7, 0.69, NAN]], dtype=np.float32)
    assert topk_abs(s, 0.7).tolist() == [[False, False, True, False]]


def test_marginpos_threshold_and_strictness():
    s = np.array([[0.76, 0.74, 0.5], [0.25, 0.2499, 0.3]], dtype=np.float32)
    anchor = np.array([0.8, 0.5], dtype=np.float32)
    assert topk_marginpos(s, anchor, 0.05).tolist()[0] == [False, True, True]
    # 0.5 - 0.25 = 0.25 exactly: equal score is rejected
    assert topk_marginpos(s, anchor, 0.25).tolist()[1] == [False, True, False]


def test_percpos_positive_anchor_equals_a_times_perc():
    anchor = np.array([0.8, 0.5], dtype=np.float32)
    np.testing.assert_allclose(percpos_threshold(anchor, 0.95), [0.76, 0.475], rtol=1e-6)
    s = np.array([[0.77, 0.75], [0.25, 0.2]], dtype=np.float32)
    assert topk_percpos(s, anchor, 0.95).tolist()[0] == [False, True]
    assert topk_percpos(s, anchor, 0.5).tolist()[1] == [False, True]  # 0.25 == threshold -> rejected


def test_percpos_negative_anchor_is_sign_safe():
    anchor = np.array([-0.5], dtype=np.float32)
    thr = percpos_threshold(anchor, 0.95)
    np.testing.assert_allclose(thr, [-0.525], rtol=1e-6)  # not -0.475 (= a * perc, which would sit above a)
    s = np.array([[-0.49, -0.51, -0.52, -0.53, -0.9]], dtype=np.float32)
    assert topk_percpos(s, anchor, 0.95).tolist() == [[False, False, False, True, True]]


def test_percpos_zero_and_nan_anchor():
    anchor = np.array([0.0, NAN], dtype=np.float32)
    s = np.array([[-0.1, 0.0], [-5.0, 0.1]], dtype=np.float32)
    assert topk_percpos(s, anchor, 0.95).tolist() == [[True, False], [False, False]]


def _mixed_table() -> CandidateTable:
    # one query, two positives (0.9, 0.6) -> anchor min 0.6, mean 0.75, max 0.9
    return make_table(
        [[4, 1, 5, 6, 7, 8, -1]],
        [[0.95, 0.92, 0.7, 0.58, 0.5, 0.1, NAN]],
        [[False, True, False, False, False, False, False]],
        [[0.9, 0.6]],
    )


def test_apply_filter_reason_order_percpos_with_min_score():
    res = apply_filter(_mixed_table(), FilterConfig(method="topk_percpos", perc=0.95, min_score=0.2))
    np.testing.assert_allclose(res.anchor, [0.6])
    np.testing.assert_allclose(res.threshold, [0.57], rtol=1e-6)
    assert res.reason.tolist() == [[
        Reason.ABOVE_PERC, Reason.POSITIVE, Reason.ABOVE_PERC, Reason.ABOVE_PERC, Reason.KEPT, Reason.BELOW_MIN,
        Reason.PADDING,
    ]]
    assert res.keep.tolist() == [[False, False, False, False, True, False, False]]
    counts = res.counts()
    assert counts["above_perc"] == 3 and counts["kept"] == 1 and counts["positive"] == 1
    assert sum(counts.values()) == 7


@pytest.mark.parametrize(
    ("anchor", "kept_cols"), [("min", [4, 5]), ("mean", [2, 3, 4, 5]), ("max", [2, 3, 4, 5])]
)
def test_apply_filter_anchor_policy_changes_survivors(anchor, kept_cols):
    # thresholds: min 0.6*0.95=0.57, mean 0.75*0.95=0.7125, max 0.855; column 0 (0.95) is always above
    res = apply_filter(_mixed_table(), FilterConfig(method="topk_percpos", anchor=anchor))
    assert np.flatnonzero(res.keep[0]).tolist() == kept_cols


def test_apply_filter_each_method():
    t = _mixed_table()
    cases = {
        "naive_topk": [0, 2, 3, 4, 5],
        "topk_shifted": [3, 4, 5],  # shift 2 skips columns 0 and 2 (column 1 is a positive)
        "topk_abs": [3, 4, 5],  # < 0.7 strictly: column 2 (0.7) rejected
        "topk_marginpos": [4, 5],  # < 0.6 - 0.05
        "topk_percpos": [4, 5],
    }
    for method, cols in cases.items():
        res = apply_filter(t, FilterConfig(method=method, shift=2, max_score=0.7, margin=0.05))
        assert np.flatnonzero(res.keep[0]).tolist() == cols, method
    res = apply_filter(t, FilterConfig(method="topk_shifted", shift=2))
    assert res.reason[0, 0] == Reason.SHIFTED and res.reason[0, 2] == Reason.SHIFTED
    assert np.isinf(res.threshold).all()
    assert apply_filter(t, FilterConfig(method="topk_abs", max_score=0.7)).reason[0, 2] == Reason.ABOVE_MAX
    assert apply_filter(t, FilterConfig(method="topk_marginpos")).reason[0, 3] == Reason.ABOVE_MARGIN


def test_query_without_scored_positive_keeps_nothing_under_positive_aware_rules():
    t = make_table([[1, 2]], [[0.3, 0.2]], [[False, False]], [[NAN]])
    assert not apply_filter(t, FilterConfig(method="topk_percpos")).keep.any()
    assert not apply_filter(t, FilterConfig(method="topk_marginpos")).keep.any()
    assert apply_filter(t, FilterConfig(method="naive_topk")).keep.all()


def test_filter_speed_10k_by_100(capsys):
    """Not asserted: prints the time of 10 filter configs over a 10k x 100 table (reported to the lead)."""
    rng = np.random.default_rng(0)
    q, n = 10_000, 100
    scores = -np.sort(-rng.random((q, n), dtype=np.float32), axis=1)
    t = make_table(
        rng.integers(0, 50_000, (q, n)), scores, rng.random((q, n)) < 0.01, rng.random((q, 2), dtype=np.float32)
    )
    cfgs = [FilterConfig(method=m) for m in ("naive_topk", "topk_shifted", "topk_abs", "topk_marginpos")]
    cfgs += [FilterConfig(method="topk_percpos", perc=p, anchor=a) for p in (0.9, 0.95) for a in ("min", "mean", "max")]
    start = time.perf_counter()
    kept = [int(apply_filter(t, c).keep.sum()) for c in cfgs]
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[speed] {len(cfgs)} filter configs over {q}x{n}: {elapsed:.3f}s total")
    assert len(kept) == 10 and all(k > 0 for k in kept)
