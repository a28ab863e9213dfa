from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from nvr.config.mining import FilterConfig
from nvr.mining.audit import write_audit
from nvr.mining.ensembles import intra_sample, per_teacher_selections
from nvr.mining.filters import apply_filter
from nvr.mining.report import build_report, first_positive_rank, jaccard_overlap, plot_report, summary_lines
from nvr.mining.samplers import ranked_survivors
from nvr.search.table import CandidateTable

NAN = np.nan
DOC_IDS = [f"d{i}" for i in range(10)]


def table(name, cand, scores, is_pos, pos_scores) -> CandidateTable:
    return CandidateTable(
        teacher=name, query_ids=["q0", "q1"], doc_ids=DOC_IDS,
        cand_idx=np.asarray(cand, np.int64), cand_scores=np.asarray(scores, np.float32),
        cand_is_positive=np.asarray(is_pos, bool), pos_idx=np.zeros((2, 1), np.int64),
        pos_scores=np.asarray(pos_scores, np.float32),
    )


def fixture():
    a = table(
        "A", [[0, 1, 2, 3], [4, 5, 6, -1]], [[0.9, 0.8, 0.5, 0.4], [0.7, 0.3, 0.2, NAN]],
        [[True, False, False, False], [False, False, False, False]], [[0.9], [0.6]],
    )
    b = table(
        "B", [[2, 0, 7, 8], [9, 4, 6, 5]], [[0.6, 0.55, 0.3, 0.1], [0.5, 0.45, 0.4, 0.2]],
        [[False, True, False, False], [False, False, False, False]], [[0.55], [0.3]],
    )
    cfg = FilterConfig(method="topk_percpos", perc=0.95)
    tables = [a, b]
    results = [apply_filter(t, cfg) for t in tables]
    per = per_teacher_selections(tables, [ranked_survivors(r.keep, 2) for r in results])
    return tables, results, per, intra_sample(tables, results, 2, dedup=False)


def test_report_counts_ranks_and_overlap():
    tables, results, per, sel = fixture()
    # A: q0 anchor 0.9 -> thr 0.855: d1(0.8), d2(0.5), d3(0.4) kept; q1 anchor 0.6 -> 0.57: d5, d6 kept
    # B: q0 anchor 0.55 -> 0.5225: d7, d8 kept (d2 0.6 above); q1 anchor 0.3 -> 0.285: d5(0.2) kept
    assert per[0].neg_idx.tolist() == [[1, 2], [5, 6]]
    assert per[1].neg_idx.tolist() == [[7, 8], [5, -1]]
    assert sel.neg_idx.tolist() == [[1, 7], [5, 5]]
    rep = build_report(tables, results, sel, per, extra={"dropped_queries": 0})
    json.dumps(rep)  # JSON-able
    assert rep["teachers"]["A"]["rule_counts"] == {
        "kept": 5, "positive": 1, "shifted": 0, "above_max": 0, "above_margin": 0, "above_perc": 1, "below_min": 0,
        "query_text": 0, "judged_relevant": 0,
    }
    assert rep["teachers"]["B"]["rule_counts"]["above_perc"] == 4
    assert rep["teachers"]["A"]["first_positive_rank"]["rank1"] == 1
    assert rep["teachers"]["B"]["first_positive_rank"]["rank2_10"] == 1
    assert rep["teachers"]["B"]["first_positive_rank"]["not_in_top_depth"] == 1
    # Jaccard: q0 {1,2} vs {7,8} = 0; q1 {5,6} vs {5} = 1/2
    assert rep["teacher_overlap_jaccard"] == {"A|B": 0.25}
    s = rep["selection"]
    assert (s["full"], s["short"], s["empty"], s["negatives"]) == (2, 0, 0, 4)
    assert s["duplicate_negatives_within_rows"] == 1
    assert s["negatives_per_teacher"] == {"A": 2, "B": 2}
    # first negatives both from A: anchors 0.9 / 0.6, scores 0.8 / 0.3 -> diff mean 0.2
    assert abs(s["positive_minus_first_negative"]["mean"] - 0.2) < 1e-6
    assert rep["dropped_queries"] == 0
    assert any("above_perc" in line for line in summary_lines(rep))


def test_first_positive_rank_zero_when_absent():
    tables, *_ = fixture()
    assert first_positive_rank(tables[1]).tolist() == [2, 0]


def test_jaccard_of_empty_rows_is_skipped():
    _, _, per, _ = fixture()
    assert jaccard_overlap([per[0], per[0]], ["x", "y"]) == {"x|y": 1.0}


def test_plot_and_audit_files(tmp_path):
    tables, results, _, sel = fixture()
    plot_report(tmp_path / "report.png", sel, tables, results)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n = write_audit(tmp_path / "audit.parquet", [(tables, results, sel)], written={"q1"})
    df = pq.read_table(tmp_path / "audit.parquet").to_pylist()
    assert n == len(df) == 15  # 7 real candidates in A + 8 in B
    row = next(r for r in df if r["teacher"] == "B" and r["query_id"] == "q1" and r["doc_id"] == "d5")
    assert row["selected"] and row["reason"] == "kept" and row["rank"] == 3
    assert abs(row["threshold"] - 0.285) < 1e-6 and abs(row["anchor"] - 0.3) < 1e-6
    pos = next(r for r in df if r["teacher"] == "A" and r["doc_id"] == "d0")
    assert pos["reason"] == "positive" and not pos["selected"]
    assert sum(r["selected"] for r in df) == 4
    assert {r["query_id"] for r in df if r["query_written"]} == {"q1"}


# ------------------------------------------------------------------------------------------ report figure
def vertical_lines(ax) -> list[float]:
    """x of every axvline (a Line2D whose two x values are equal)."""
    return [float(line.get_xdata()[0]) for line in ax.lines
            if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]]


def figure_for(cfg: FilterConfig, teachers=("A", "B")):
    import matplotlib.pyplot as plt

    from nvr.mining.report import report_figure

    tables, _, _, _ = fixture()
    tables = [t for t in tables if t.teacher in teachers]
    results = [apply_filter(t, cfg) for t in tables]
    fig = report_figure(intra_sample(tables, results, 2, dedup=False), tables, results)
    plt.close(fig)
    return fig


@pytest.mark.parametrize("cfg, rule, score_lines, threshold_lines", [
    (FilterConfig(method="topk_percpos", perc=0.95), "TopK-PercPos: n < 0.95 x positive", [], [0.95]),
    (FilterConfig(method="topk_marginpos", margin=0.05), "TopK-MarginPos: n < positive - 0.05", [], [0.05]),
    (FilterConfig(method="topk_abs", max_score=0.7), "TopK-Abs: n < 0.7", [0.7], []),
    (FilterConfig(method="topk_abs", max_score=0.7, min_score=0.1), "TopK-Abs: n < 0.7, n >= 0.1", [0.7, 0.1], []),
    (FilterConfig(method="naive_topk"), "naive top-k", [], []),
    (FilterConfig(method="topk_shifted", shift=1), "top-k shifted by 1", [], []),
])
def test_report_figure_names_method_threshold_teacher_and_draws_the_threshold(cfg, rule, score_lines,
                                                                              threshold_lines):
    fig = figure_for(cfg)
    title = fig._suptitle.get_text()
    assert rule in title and "teachers A, B" in title
    scores_ax, threshold_ax = fig.axes[:2]
    assert vertical_lines(scores_ax) == pytest.approx(score_lines)
    assert vertical_lines(threshold_ax) == pytest.approx(threshold_lines)
    lo, hi = threshold_ax.get_xlim()
    assert all(lo < x < hi for x in threshold_lines)
    expected = "first negative / positive" if cfg.method == "topk_percpos" else "positive - first negative"
    assert threshold_ax.get_xlabel() == expected


def test_report_title_of_one_teacher_and_of_teachers_with_their_own_filters():
    from nvr.mining.report import report_title

    assert report_title(["minilm"], [FilterConfig(perc=0.9)]) == \
        "TopK-PercPos: n < 0.9 x positive (anchor: min of positives) | teacher minilm"
    mixed = report_title(["dense", "bm25"], [FilterConfig(perc=0.9), FilterConfig(method="topk_abs", max_score=12)])
    assert mixed == "dense: TopK-PercPos: n < 0.9 x positive (anchor: min of positives) | bm25: TopK-Abs: n < 12"


def test_report_threshold_axis_is_clipped_to_robust_quantiles():
    import matplotlib.pyplot as plt

    from nvr.mining.report import _clipped_hist, _robust_limits

    values = np.concatenate([np.linspace(0.4, 0.9, 400), [35.0, 80.0]])  # two near-zero positive anchors
    limits = _robust_limits(values, [0.95])
    assert limits[0] < 0.4 and 0.95 < limits[1] < 2.0
    fig, ax = plt.subplots()
    ax.set_xlabel("first negative / positive")
    assert _clipped_hist(ax, values, limits, "queries") == 2
    assert ax.get_xlim() == pytest.approx(limits)
    assert ax.get_xlabel() == "first negative / positive (2 queries outside the axis)"
    plt.close(fig)
