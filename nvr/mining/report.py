"""Mining statistics: what each rule removed, how positives and negatives score, where positives rank.

The paper's Fig. 4 argument (positive-aware mining separates positive and negative scores) is checked by the
histograms; ``first_positive_rank`` flags label noise (a positive that its own teacher does not retrieve).
Everything returned is plain JSON (ints, floats, lists, dicts), so ``json.dumps`` works without a custom encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from nvr.mining.filters import REASON_NAMES, FilterResult, Reason
from nvr.mining.selection import Selection
from nvr.mining.table import CandidateTable


def score_stats(values: np.ndarray) -> dict[str, float | int | None]:
    """count / mean / std / min / quartiles / max of the finite values (``None`` when there are none)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "p25": None, "p50": None, "p75": None, "max": None}
    q = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "count": int(v.size), "mean": round(float(v.mean()), 6), "std": round(float(v.std()), 6),
        "min": round(float(v.min()), 6), "p25": round(float(q[0]), 6), "p50": round(float(q[1]), 6),
        "p75": round(float(q[2]), 6), "max": round(float(v.max()), 6),
    }


def first_positive_rank(table: CandidateTable, result: FilterResult | None = None) -> np.ndarray:
    """(Q,) 1-based rank of the best-ranked positive among the candidates, 0 when none is in the list.

    With ``result``, candidates excluded for another cause (query text, judged relevant) do not count as positives.
    """
    is_pos = np.asarray(table.cand_is_positive, dtype=bool) & table.valid
    if result is not None:
        is_pos &= result.reason == Reason.POSITIVE
    found = is_pos.any(axis=1)
    return np.where(found, is_pos.argmax(axis=1) + 1, 0).astype(np.int64)


def first_survivor_scores(table: CandidateTable, result: FilterResult) -> np.ndarray:
    """Score of the best-ranked kept candidate, for queries with at least one survivor."""
    has = result.keep.any(axis=1)
    first = np.argmax(result.keep, axis=1)
    return np.asarray(table.cand_scores, dtype=np.float32)[np.arange(table.num_queries), first][has]


def rank_summary(ranks: np.ndarray, depth: int) -> dict[str, Any]:
    found = ranks > 0
    return {
        "found": int(found.sum()), "not_in_top_depth": int((~found).sum()), "depth": int(depth),
        "rank1": int((ranks == 1).sum()), "rank2_10": int(((ranks >= 2) & (ranks <= 10)).sum()),
        "rank_gt10": int((ranks > 10).sum()),
        "mean_rank_when_found": round(float(ranks[found].mean()), 4) if found.any() else None,
    }


def rule_counts(result: FilterResult) -> dict[str, int]:
    """Cells per reason (padding left out: it is not a candidate)."""
    counts = result.counts()
    counts.pop("padding")
    return counts


def jaccard_overlap(per_teacher: Sequence[Selection], names: Sequence[str]) -> dict[str, float]:
    """Mean per-query Jaccard overlap of the negative sets each teacher alone would give (paper Table 6)."""
    out: dict[str, float] = {}
    for i, j in combinations(range(len(per_teacher)), 2):
        a, b = per_teacher[i].neg_idx, per_teacher[j].neg_idx
        values = []
        for row_a, row_b in zip(a, b):
            sa, sb = set(row_a[row_a >= 0].tolist()), set(row_b[row_b >= 0].tolist())
            if sa or sb:
                values.append(len(sa & sb) / len(sa | sb))
        out[f"{names[i]}|{names[j]}"] = round(float(np.mean(values)), 6) if values else 0.0
    return out


def positive_negative_scores(
    selection: Selection, tables: Sequence[CandidateTable], results: Sequence[FilterResult]
) -> tuple[np.ndarray, np.ndarray]:
    """(anchor, first-negative score) per query with a negative, both from the teacher that gave that negative."""
    rows = np.flatnonzero(selection.neg_idx[:, 0] >= 0)
    teacher = selection.neg_teacher[rows, 0].astype(np.int64)
    index = [{q: i for i, q in enumerate(t.query_ids)} for t in tables]
    anchors = np.array(
        [results[t].anchor[index[t][selection.query_ids[r]]] for r, t in zip(rows, teacher)], dtype=np.float32
    )
    return anchors, selection.neg_scores[rows, 0].astype(np.float32)


def build_report(
    tables: Sequence[CandidateTable],
    results: Sequence[FilterResult],
    selection: Selection,
    per_teacher: Sequence[Selection],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report of a mining run (``extra`` carries pipeline counts such as dropped queries)."""
    names = [t.teacher for t in tables]
    teachers = {}
    for t, r, own in zip(tables, results, per_teacher):
        survivors = r.num_kept
        teachers[t.teacher] = {
            "queries": t.num_queries,
            "depth": t.depth,
            "candidates": int(t.valid.sum()),
            "rule_counts": rule_counts(r),
            "survivors_per_query": score_stats(survivors),
            "positive_anchor": score_stats(r.anchor),
            "first_survivor_score": score_stats(first_survivor_scores(t, r)),
            "selected_negative_score": score_stats(own.neg_scores),
            "first_positive_rank": rank_summary(first_positive_rank(t, r), t.depth),
        }
    pos, neg = positive_negative_scores(selection, tables, results)
    teacher_counts = np.bincount(selection.neg_teacher[selection.neg_teacher >= 0], minlength=len(names))
    dup_in_row = sum(int((row >= 0).sum() - len(set(row[row >= 0].tolist()))) for row in selection.neg_idx)
    report: dict[str, Any] = {
        "reasons": list(REASON_NAMES),
        "teachers": teachers,
        "selection": {
            **selection.shortfall_counts(),
            "k": selection.k,
            "negatives_per_teacher": {n: int(c) for n, c in zip(names, teacher_counts)},
            "duplicate_negatives_within_rows": dup_in_row,
            "positive_score": score_stats(pos),
            "first_negative_score": score_stats(neg),
            "positive_minus_first_negative": score_stats(pos - neg),
        },
        "teacher_overlap_jaccard": jaccard_overlap(per_teacher, names),
    }
    if extra:
        report.update(extra)
    return report


def plot_report(
    path: str | Path, selection: Selection, tables: Sequence[CandidateTable], results: Sequence[FilterResult]
) -> None:
    """PNG with the paper's Fig. 4 view: positive vs first-negative scores, and their difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nvr.utils.atomic import atomic_file

    pos, neg = positive_negative_scores(selection, tables, results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    finite = np.concatenate([pos[np.isfinite(pos)], neg[np.isfinite(neg)]])
    bins = np.linspace(finite.min(), finite.max(), 41) if finite.size and np.ptp(finite) > 0 else 40
    ax1.hist(pos[np.isfinite(pos)], bins=bins, alpha=0.6, label="positive (anchor)")
    ax1.hist(neg[np.isfinite(neg)], bins=bins, alpha=0.6, label="first negative")
    ax1.set_xlabel("teacher score")
    ax1.set_ylabel("queries")
    ax1.legend()
    ax1.set_title("positive vs first negative")
    diff = (pos - neg)[np.isfinite(pos - neg)]
    ax2.hist(diff, bins=40, color="tab:green")
    ax2.set_xlabel("positive - first negative")
    ax2.set_title("score margin")
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short console table: per teacher, candidates removed per rule; then the selection counts."""
    lines = []
    reasons = [r for r in report["reasons"] if r != "padding"]
    header = f"{'teacher':<20}" + "".join(f"{r:>13}" for r in reasons)
    lines.append(header)
    for name, t in report["teachers"].items():
        lines.append(f"{name[:20]:<20}" + "".join(f"{t['rule_counts'][r]:>13}" for r in reasons))
    s = report["selection"]
    lines.append(
        f"queries {s['queries']}: full {s['full']}, short {s['short']}, empty {s['empty']}, widened "
        f"{s['widened']}; negatives {s['negatives']} (k={s['k']})"
    )
    if "num_queries" in report:  # pipeline counts of the written rows (absent from a bare build_report)
        lines.append(
            f"written {report['num_queries']}: {report.get('short_rows', 0)} with fewer than k negatives, "
            f"{report.get('rows_without_negatives', 0)} of them with 0 (in-batch negatives only); "
            f"dropped {report.get('dropped_queries', 0)}"
        )
    for key in ("positive_score", "first_negative_score", "positive_minus_first_negative"):
        st = s[key]
        if st["count"]:
            lines.append(f"{key:<32} mean {st['mean']:.4f}  p50 {st['p50']:.4f}  min {st['min']:.4f}")
    return lines
