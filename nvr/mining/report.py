"""Mining statistics: what each rule removed, how positives and negatives score, where positives rank.

The paper's Fig. 4 argument (positive-aware mining separates positive and negative scores) is checked by the
histograms; ``first_positive_rank`` flags label noise (a positive that its own teacher does not retrieve).
Everything returned is plain JSON (ints, floats, lists, dicts), so ``json.dumps`` works without a custom encoder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from nvr.mining.filters import REASON_NAMES, FilterResult, Reason
from nvr.mining.selection import Selection
from nvr.search.table import CandidateTable


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


def jaccard_values(a: Selection, b: Selection) -> np.ndarray:
    """Per query (with a negative in either), the Jaccard overlap of two teachers' negative sets."""
    values = []
    for row_a, row_b in zip(a.neg_idx, b.neg_idx):
        sa, sb = set(row_a[row_a >= 0].tolist()), set(row_b[row_b >= 0].tolist())
        if sa or sb:
            values.append(len(sa & sb) / len(sa | sb))
    return np.asarray(values, dtype=np.float64)


def jaccard_overlap(per_teacher: Sequence[Selection], names: Sequence[str]) -> dict[str, float]:
    """Mean per-query Jaccard overlap of the negative sets each teacher alone would give (paper Table 6)."""
    out: dict[str, float] = {}
    for i, j in combinations(range(len(per_teacher)), 2):
        values = jaccard_values(per_teacher[i], per_teacher[j])
        out[f"{names[i]}|{names[j]}"] = round(float(np.mean(values)), 6) if values.size else 0.0
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
    parts = report_parts(tables, results, selection, per_teacher)
    return report_from_parts(parts, names, filter_settings(tables, results), extra)


# Report parts: what the report needs from some rows, as flat arrays, so a streaming run keeps one small record
# per query chunk and builds the same report from all of them: ``<name>.sum`` parts add up over chunks, ``.cat``
# parts (per-query values, in row order) are concatenated, ``.same`` parts are equal in every chunk.
def report_parts(
    tables: Sequence[CandidateTable],
    results: Sequence[FilterResult],
    selection: Selection,
    per_teacher: Sequence[Selection],
) -> dict[str, np.ndarray]:
    """The report's inputs over these rows (see above); ``report_from_parts`` turns them into the report."""
    parts: dict[str, np.ndarray] = {}
    for i, (t, r, own) in enumerate(zip(tables, results, per_teacher)):
        p = f"teacher{i}."
        parts[p + "queries.sum"] = np.int64(t.num_queries)
        parts[p + "depth.same"] = np.int64(t.depth)
        parts[p + "candidates.sum"] = np.int64(t.valid.sum())
        parts[p + "reasons.sum"] = np.bincount(r.reason.ravel(), minlength=len(Reason)).astype(np.int64)
        parts[p + "survivors.cat"] = np.asarray(r.num_kept, dtype=np.int64)
        parts[p + "anchor.cat"] = np.asarray(r.anchor, dtype=np.float32)
        parts[p + "first_survivor.cat"] = np.asarray(first_survivor_scores(t, r), dtype=np.float32)
        parts[p + "selected.cat"] = np.asarray(own.neg_scores, dtype=np.float32)
        parts[p + "first_positive_rank.cat"] = first_positive_rank(t, r)
    pos, neg = positive_negative_scores(selection, tables, results)
    for key, value in selection.shortfall_counts().items():
        parts[f"selection.{key}.sum"] = np.int64(value)
    parts["selection.k.same"] = np.int64(selection.k)
    parts["selection.per_teacher.sum"] = np.bincount(selection.neg_teacher[selection.neg_teacher >= 0],
                                                     minlength=len(tables)).astype(np.int64)
    parts["selection.duplicates.sum"] = np.int64(
        sum(int((row >= 0).sum() - len(set(row[row >= 0].tolist()))) for row in selection.neg_idx))
    parts["selection.positive.cat"] = pos
    parts["selection.negative.cat"] = neg
    for i, j in combinations(range(len(per_teacher)), 2):
        parts[f"jaccard{i}-{j}.cat"] = jaccard_values(per_teacher[i], per_teacher[j])
    return parts


def combine_parts(chunks: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The parts of all rows from the parts of disjoint row chunks (in row order)."""
    out: dict[str, np.ndarray] = {}
    for key in chunks[0]:
        values = [c[key] for c in chunks]
        if key.endswith(".sum"):
            out[key] = np.sum(values, axis=0)
        elif key.endswith(".cat"):
            out[key] = np.concatenate(values)
        else:
            if any(not np.array_equal(v, values[0]) for v in values):
                raise ValueError(f"report part {key} differs between chunks")
            out[key] = values[0]
    return out


def report_from_parts(
    parts: dict[str, np.ndarray], names: Sequence[str], filters: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON report from ``report_parts`` (of all rows, or ``combine_parts`` of their chunks)."""
    teachers = {}
    for i, name in enumerate(names):
        p = f"teacher{i}."
        depth = int(parts[p + "depth.same"])
        reasons = dict(zip(REASON_NAMES, (int(c) for c in parts[p + "reasons.sum"])))
        reasons.pop("padding")
        teachers[name] = {
            "queries": int(parts[p + "queries.sum"]),
            "depth": depth,
            "candidates": int(parts[p + "candidates.sum"]),
            "rule_counts": reasons,
            "survivors_per_query": score_stats(parts[p + "survivors.cat"]),
            "positive_anchor": score_stats(parts[p + "anchor.cat"]),
            "first_survivor_score": score_stats(parts[p + "first_survivor.cat"]),
            "selected_negative_score": score_stats(parts[p + "selected.cat"]),
            "first_positive_rank": rank_summary(parts[p + "first_positive_rank.cat"], depth),
        }
    pos, neg = parts["selection.positive.cat"], parts["selection.negative.cat"]
    counts = {key: int(parts[f"selection.{key}.sum"])
              for key in ("queries", "full", "short", "empty", "widened", "negatives")}
    overlap = {}
    for i, j in combinations(range(len(names)), 2):
        values = parts[f"jaccard{i}-{j}.cat"]
        overlap[f"{names[i]}|{names[j]}"] = round(float(np.mean(values)), 6) if values.size else 0.0
    report: dict[str, Any] = {
        "reasons": list(REASON_NAMES),
        "teachers": teachers,
        "selection": {
            **counts,
            "k": int(parts["selection.k.same"]),
            "negatives_per_teacher": {n: int(c) for n, c in zip(names, parts["selection.per_teacher.sum"])},
            "duplicate_negatives_within_rows": int(parts["selection.duplicates.sum"]),
            "positive_score": score_stats(pos),
            "first_negative_score": score_stats(neg),
            "positive_minus_first_negative": score_stats(pos - neg),
        },
        "teacher_overlap_jaccard": overlap,
        "filters": filters,
    }
    if extra:
        report.update(extra)
    return report


def describe_filter(cfg: Any) -> str:
    """One line naming a filter rule and its threshold (paper names), e.g. ``TopK-PercPos: n < 0.95 x positive``."""
    if cfg is None:
        return "filter not recorded"
    rule = {
        "naive_topk": "naive top-k (no threshold)",
        "topk_shifted": f"top-k shifted by {cfg.shift} (rank rule, no score threshold)",
        "topk_abs": f"TopK-Abs: n < {cfg.max_score:g}",
        "topk_marginpos": f"TopK-MarginPos: n < positive - {cfg.margin:g}",
        "topk_percpos": f"TopK-PercPos: n < {cfg.perc:g} x positive",
    }.get(cfg.method, str(cfg.method))
    if cfg.method in ("topk_marginpos", "topk_percpos"):
        rule += f" (anchor: {cfg.anchor} of positives)"
    if cfg.min_score is not None:
        rule += f", n >= {cfg.min_score:g}"
    return rule


def _threshold_axis(configs: Sequence[Any]) -> str:
    """What the right panel shows: the quantity the configured relative rule thresholds (one for all teachers)."""
    methods = {getattr(c, "method", None) for c in configs}
    if methods == {"topk_percpos"}:
        return "ratio"
    return "margin"


def _robust_limits(values: np.ndarray, marks: Sequence[float], q: float = 0.005) -> tuple[float, float] | None:
    """x-limits spanning the [q, 1-q] quantiles of ``values`` and every threshold mark, padded by 5%: a few
    extreme values (a ratio over a near-zero positive score) must not squash the distribution into one bar."""
    finite = values[np.isfinite(values)]
    points = [float(m) for m in marks if np.isfinite(m)]
    if finite.size:
        lo, hi = np.quantile(finite, [q, 1 - q])
        points += [float(lo), float(hi)]
    if not points:
        return None
    lo, hi = min(points), max(points)
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 0.05)
    return lo - pad, hi + pad


def _clipped_hist(ax, values: np.ndarray, limits: tuple[float, float] | None, what: str, **kwargs) -> int:
    """Histogram of the values inside ``limits``; the count outside is noted in the axis label (set the label
    first). Returns that count."""
    values = values[np.isfinite(values)]
    outside = 0
    if limits is not None:
        inside = (values >= limits[0]) & (values <= limits[1])
        outside = int((~inside).sum())
        values = values[inside]
        ax.set_xlim(*limits)
    bins = np.linspace(limits[0], limits[1], 41) if limits is not None else 40
    ax.hist(values, bins=bins, **kwargs)
    if outside:
        ax.set_xlabel(f"{ax.get_xlabel()} ({outside} {what} outside the axis)")
    return outside


def report_figure(selection: Selection, tables: Sequence[CandidateTable], results: Sequence[FilterResult]):
    """The paper's Fig. 4 view: positive vs first-negative scores (left) and the quantity the filter thresholds
    (right: negative / positive for TopK-PercPos, positive - negative otherwise), with the threshold drawn where the
    rule has one, and a title naming the method, its threshold and the teacher(s)."""
    pos, neg = positive_negative_scores(selection, tables, results)
    return score_figure(pos, neg, [t.teacher for t in tables], [r.config for r in results])


def score_figure(pos: np.ndarray, neg: np.ndarray, names: Sequence[str], configs: Sequence[Any]):
    """``report_figure`` from the (anchor, first-negative) scores per query, the teacher names and their filters
    (all a streaming run keeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
    finite = np.concatenate([pos[np.isfinite(pos)], neg[np.isfinite(neg)]])
    bins = np.linspace(finite.min(), finite.max(), 41) if finite.size and np.ptp(finite) > 0 else 40
    ax1.hist(pos[np.isfinite(pos)], bins=bins, alpha=0.6, label="positive (anchor)")
    ax1.hist(neg[np.isfinite(neg)], bins=bins, alpha=0.6, label="first negative")
    absolute: dict[tuple[float, str], list[str]] = {}  # absolute rules: one line per value on the score axis
    for name, cfg in zip(names, configs):
        for mark in _absolute_marks(cfg):
            absolute.setdefault(mark, []).append(name)
    for (value, label), owners in absolute.items():
        some = len(owners) < len(names)
        ax1.axvline(value, color="tab:red", linestyle="--", label=f"{label} ({', '.join(owners)})" if some else label)
    ax1.set_xlabel("teacher score")
    ax1.set_ylabel("queries")
    ax1.legend(fontsize=8)
    ax1.set_title("positive vs first negative")

    kind = _threshold_axis(configs)
    if kind == "ratio":
        ok = np.isfinite(pos) & np.isfinite(neg) & (pos > 0)
        values = neg[ok] / pos[ok]
        ax2.set_xlabel("first negative / positive")
        marks = [(c.perc, f"threshold {c.perc:g}") for c in configs]
    else:
        values = (pos - neg)[np.isfinite(pos - neg)]
        ax2.set_xlabel("positive - first negative")
        marks = [(c.margin, f"threshold {c.margin:g}") for c in configs
                 if getattr(c, "method", None) == "topk_marginpos"]
    distinct = list(dict.fromkeys(marks))
    _clipped_hist(ax2, values, _robust_limits(values, [m for m, _ in distinct]), "queries", color="tab:green")
    for value, label in distinct:
        ax2.axvline(value, color="tab:red", linestyle="--", label=label)
    if distinct:
        ax2.legend(fontsize=8)
    ax2.set_title("first negative relative to positive" if kind == "ratio" else "score margin")
    fig.suptitle(report_title(names, configs), fontsize=10)
    fig.tight_layout()
    return fig


def _absolute_marks(cfg: Any) -> list[tuple[float, str]]:
    marks = []
    if getattr(cfg, "method", None) == "topk_abs":
        marks.append((float(cfg.max_score), f"max_score {cfg.max_score:g}"))
    if getattr(cfg, "min_score", None) is not None:
        marks.append((float(cfg.min_score), f"min_score {cfg.min_score:g}"))
    return marks


def report_title(names: Sequence[str], configs: Sequence[Any]) -> str:
    """``<rule> | teacher <name>``; teachers with different filters get one rule each."""
    rules = [describe_filter(c) for c in configs]
    if len(set(rules)) <= 1:
        label = "teacher" if len(names) == 1 else "teachers"
        return f"{rules[0] if rules else 'no filter'} | {label} {', '.join(names)}"
    return " | ".join(f"{n}: {r}" for n, r in zip(names, rules))


def plot_report(
    path: str | Path, selection: Selection, tables: Sequence[CandidateTable], results: Sequence[FilterResult]
) -> None:
    """Write :func:`report_figure` as a PNG (atomically)."""


    save_figure(path, report_figure(selection, tables, results))


def save_figure(path: str | Path, fig) -> None:
    """Write a figure as a PNG (atomically; no software tag, so equal data gives equal bytes)."""
    import matplotlib.pyplot as plt

    from nvr.utils.atomic import atomic_file

    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short console table: per teacher, candidates removed per rule; then the selection counts."""
    lines = []
    reasons = [r for r in report["reasons"] if r != "padding"]
    width = max([13, *(len(r) + 1 for r in reasons)])  # a column never runs into its neighbour's name
    header = f"{'teacher':<20}" + "".join(f"{r:>{width}}" for r in reasons)
    lines.append(header)
    for name, t in report["teachers"].items():
        lines.append(f"{name[:20]:<20}" + "".join(f"{t['rule_counts'][r]:>{width}}" for r in reasons))
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


def filter_settings(tables: Sequence[CandidateTable], results: Sequence[FilterResult]) -> dict[str, Any]:
    """Per teacher, the filter that ran (a per-teacher ``filter`` or the run's, with the parameter
    ``filter.calibrate`` chose filled in) and the calibration record (empty when not calibrated)."""
    return filter_settings_of([t.teacher for t in tables], [(r.config, r.calibration) for r in results])


def filter_settings_of(names: Sequence[str], resolved: Sequence[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """``filter_settings`` from the teacher names and each one's (resolved filter, calibration record)."""
    import dataclasses

    out: dict[str, Any] = {}
    for name, (cfg, calibration) in zip(names, resolved):
        config = None if cfg is None else {k: v for k, v in dataclasses.asdict(cfg).items() if k != "calibrate"}
        out[name] = {"config": config, "calibration": dict(calibration)}
    return out


def print_mining_summary(out: str | Path, stream: TextIO | None = None) -> None:
    """The per-teacher rule counts, selection counts and score statistics of a mined folder's ``report.json``,
    then ``mined -> <folder>``: printed by ``nvr mine`` and by ``nvr fit`` when its datamodule mines (same lines)."""
    out = Path(out)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    print("\n".join(summary_lines(report)), file=stream or sys.stdout)
    print(f"mined -> {out}", file=stream or sys.stdout, flush=True)
