"""The false-negative report: how many *known* positives each filter would mine as negatives, at what hardness.

Mined negatives are judged "false" only against labels, and the labels are what mining excludes; so the report
makes some positives unknown on purpose. Per query with >= 2 positives a seeded share is held back
(``rng_for(seed, "fn-holdout", query_id)`` over the sorted doc ids; or a second qrels file supplies them), the
candidate table is built with the remaining positives as the anchors, and every filter config runs over that same
table (cached: embeddings and searches are shared with mining, nothing is re-encoded). A held-back positive that a
filter selects as a negative is a false negative it failed to catch.

Held-back positives are removed from the query's excluded documents too: the pipeline never mines a document judged
relevant (``data.exclude_judged``), which would hide exactly what is measured. Documents judged relevant below
``min_relevance`` stay excluded, and candidates that are text duplicates of an anchor positive (or equal the
query's text) stay flagged as positives, as in mining: they are never negatives, so they are not counted.

Metrics per (teacher, config), over the queries with held-back positives, within ``depth`` (mining's widening of
short queries is not simulated: ``short_share`` shows where it would happen):

- ``fn_rate``: share of the selected negatives that are held-back positives; ``queries_with_fn``: share of queries
  with at least one; ``fn_per_query``: mean count.
- ``hardness``: mean teacher score of the selected negatives (an ensemble's teachers score on different scales:
  ``hardness_by_teacher`` only); ``mean_rank``: their mean 1-based rank in the providing teacher's list.
- ``survivors_mean`` / ``survivors_median`` per query, ``short_share``: share of queries with fewer than K.
- ``heldout_in_candidates`` and ``heldout_rejected``: how many held-back positives the teacher retrieved within
  ``depth``, and the share of those the filter rejected (a filter's recall of false negatives).

Configs: naive, shifted N, TopK-Abs, MarginPos and PercPos over their sweeps (``FnReportConfig``), each teacher
alone, plus the run's own configuration (its filters, calibrated as mining calibrated them on the full positives,
its sampler and ensemble) as row ``configured``. ``matched`` compares the families at equal hardness
(``matched_hardness``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvr.config.mining import FilterConfig, FnReportConfig, MineConfig, SamplerConfig
from nvr.mining.calibrate import effective_filters, holdout_split, resolve_filters
from nvr.mining.filters import FilterResult, apply_filter
from nvr.mining.samplers import select
from nvr.mining.selection import Selection, from_positions
from nvr.search.table import CandidateTable
from nvr.utils.atomic import atomic_dir, atomic_file, write_json_atomic
from nvr.utils.errors import InputError
from nvr.utils.seeding import rng_for

REPORT_FORMAT = "nvr-fn-report/1"
FILES = ("fn_report.json", "fn_report.md", "fn_report.csv", "fn_report.png")
COLUMNS = ("teacher", "config", "family", "x", "fn_rate", "queries_with_fn", "fn_per_query", "hardness", "mean_rank",
           "negatives", "survivors_mean", "survivors_median", "short_share", "heldout_in_candidates",
           "heldout_rejected")


@dataclass
class HeldOut:
    """Per evaluated query (those with at least one held-back positive), in input order: the positives mining
    keeps as anchors and the held-back ones the report measures."""

    anchors: dict[str, list[str]]
    held: dict[str, list[str]]
    source: str
    """``holdout`` or ``qrels``."""

    @property
    def query_ids(self) -> list[str]:
        return list(self.held)


def holdout_positives(positives: Mapping[str, Sequence[str]], fraction: float, seed: int) -> HeldOut:
    """Hold back ``calibrate.holdout_count`` positives of every query with >= 2 (seeded per query id)."""
    anchors, held = {}, {}
    for qid, docs in positives.items():
        kept, back = holdout_split(list(docs), fraction, rng_for(seed, "fn-holdout", qid))
        if back:
            anchors[qid], held[qid] = kept, back
    return HeldOut(anchors, held, "holdout")


def qrels_heldout(
    positives: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], min_relevance: int
) -> HeldOut:
    """The documents a second judgement file marks relevant (grade >= ``min_relevance``) that are not training
    positives of the query; every training positive stays an anchor."""
    anchors, held = {}, {}
    for qid, docs in positives.items():
        known = set(docs)
        extra = sorted(d for d, g in qrels.get(qid, {}).items() if g >= min_relevance and d not in known)
        if extra:
            anchors[qid], held[qid] = list(docs), extra
    return HeldOut(anchors, held, "qrels")


def held_rows(table: CandidateTable, held: Mapping[str, Sequence[str]]) -> list[set[int]]:
    """Per table row, the corpus indices of that query's held-back positives."""
    index = {d: i for i, d in enumerate(table.doc_ids)}
    return [{index[d] for d in held.get(q, ()) if d in index} for q in table.query_ids]


def heldout_mask(table: CandidateTable, rows: Sequence[set[int]]) -> np.ndarray:
    """(Q, N) True where the candidate is a held-back positive of its query."""
    cand = np.asarray(table.cand_idx)
    mask = np.zeros(cand.shape, dtype=bool)
    for r, docs in enumerate(rows):
        if docs:
            mask[r] = np.isin(cand[r], np.fromiter(docs, dtype=np.int64)) & (cand[r] >= 0)
    return mask


def _mean(values: np.ndarray) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return round(float(v.mean()), 6) if v.size else None


def evaluate_selection(
    tables: Sequence[CandidateTable], results: Sequence[FilterResult], selection: Selection,
    held: Mapping[str, Sequence[str]], k: int,
) -> dict[str, Any]:
    """The metrics of one selection (module doc) over the queries of ``selection``; several tables are one
    ensemble (survivors: distinct kept documents over all teachers; a held-back positive counts as rejected when no
    teacher that retrieved it keeps it)."""
    per_table = []
    for t, r in zip(tables, results):
        row_of = {q: i for i, q in enumerate(t.query_ids)}
        per_table.append((t, r, row_of, heldout_mask(t, held_rows(t, held))))
    index = {d: i for i, d in enumerate(tables[0].doc_ids)}
    survivors, fn_counts, retrieved, caught = [], [], 0, 0
    for r, qid in enumerate(selection.query_ids):
        kept_docs: set[int] = set()
        seen_held: set[int] = set()
        kept_held: set[int] = set()
        for t, res, row_of, hmask in per_table:
            row = row_of.get(qid)
            if row is None:
                continue
            cand = np.asarray(t.cand_idx[row])
            kept_docs.update(cand[res.keep[row]].tolist())
            seen_held.update(cand[hmask[row]].tolist())
            kept_held.update(cand[hmask[row] & res.keep[row]].tolist())
        survivors.append(len(kept_docs))
        retrieved += len(seen_held)
        caught += len(seen_held - kept_held)
        held_idx = {index[d] for d in held.get(qid, ()) if d in index}
        neg = selection.neg_idx[r]
        fn_counts.append(sum(1 for d in neg[neg >= 0].tolist() if d in held_idx))
    real = selection.neg_idx >= 0
    negatives = int(real.sum())
    fn = np.asarray(fn_counts, dtype=np.int64)
    surv = np.asarray(survivors, dtype=np.int64)
    by_teacher = {t.teacher: _mean(selection.neg_scores[real & (selection.neg_teacher == i)])
                  for i, t in enumerate(tables)}
    return {
        "queries": len(selection.query_ids),
        "negatives": negatives,
        "fn_rate": round(float(fn.sum() / negatives), 6) if negatives else None,
        "queries_with_fn": round(float((fn > 0).mean()), 6) if fn.size else None,
        "fn_per_query": round(float(fn.mean()), 6) if fn.size else None,
        "hardness": _mean(selection.neg_scores[real]) if len(tables) == 1 else None,
        "hardness_by_teacher": by_teacher,
        "mean_rank": _mean(selection.neg_rank[real].astype(np.float64) + 1),
        "survivors_mean": round(float(surv.mean()), 4) if surv.size else None,
        "survivors_median": float(np.median(surv)) if surv.size else None,
        "short_share": round(float((surv < k).mean()), 6) if surv.size else None,
        "heldout_in_candidates": int(retrieved),
        "heldout_rejected": round(caught / retrieved, 6) if retrieved else None,
    }


def _label(value: float) -> str:
    return f"{value:g}"


def sweep_filters(fn: FnReportConfig, anchors: np.ndarray, base: FilterConfig) -> list[tuple[str, str, float | None,
                                                                                           FilterConfig]]:
    """(label, family, swept value, filter) for every config of the sweep, for one teacher. TopK-Abs and MarginPos
    sweeps default to the teacher's own scale (``FnReportConfig.max_scores`` / ``margins``); every config uses the
    teacher's anchor policy and no ``min_score`` floor, so the methods differ only in their rule."""
    a = np.asarray(anchors, dtype=np.float64)
    a = a[np.isfinite(a)]
    if fn.max_scores is not None:
        max_scores = list(fn.max_scores)
    else:
        max_scores = [round(float(np.quantile(a, q)), 4) for q in fn.abs_quantiles] if a.size else []
    if fn.margins is not None:
        margins = list(fn.margins)
    else:
        scale = float(np.median(np.abs(a))) if a.size else 0.0
        margins = [round(s * scale, 4) for s in fn.margin_scales]
    out: list[tuple[str, str, float | None, FilterConfig]] = [
        ("naive", "naive", None, FilterConfig(method="naive_topk", anchor=base.anchor))]
    families = (("shifted", "topk_shifted", "shift", fn.shifts), ("abs", "topk_abs", "max_score", max_scores),
                ("marginpos", "topk_marginpos", "margin", margins), ("percpos", "topk_percpos", "perc", fn.percs))
    for family, method, key, values in families:
        for v in dict.fromkeys(values):  # distinct, in order
            out.append((f"{family}={_label(v)}", family, float(v),
                        FilterConfig(method=method, anchor=base.anchor, **{key: v})))
    return out


def teacher_rows(
    table: CandidateTable, fn: FnReportConfig, base: FilterConfig, sampler: SamplerConfig, k: int, seed: int,
    held: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """One row per sweep config over one teacher's table (selection: the run's sampler, K and seed)."""
    from nvr.mining.filters import anchor_scores

    rows = []
    for label, family, x, fcfg in sweep_filters(fn, anchor_scores(table.pos_scores, base.anchor), base):
        result = apply_filter(table, fcfg)
        positions = select(result.keep, table.cand_scores, sampler, k, seed, table.query_ids)
        selection = from_positions(table, positions, 0)
        rows.append({"teacher": table.teacher, "config": label, "family": family, "x": x,
                     **evaluate_selection([table], [result], selection, held, k)})
    return rows


def matched_hardness(rows: Sequence[Mapping[str, Any]], reference: str = "percpos") -> list[dict[str, Any]]:
    """The paper's claim at equal hardness: at each ``reference`` config's hardness, every other family's FN rate
    interpolated linearly between its two sweep points that bracket that hardness (None outside its range), so a
    filter that removes more false negatives *at the same hardness* shows a lower rate."""
    families: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["fn_rate"] is not None and r["hardness"] is not None:
            families.setdefault(r["family"], []).append((float(r["hardness"]), float(r["fn_rate"])))
    out = []
    for r in rows:
        if r["family"] != reference or r["hardness"] is None or r["fn_rate"] is None:
            continue
        h = float(r["hardness"])
        at: dict[str, float | None] = {}
        for family, pts in families.items():
            pts = sorted(pts)
            xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
            at[family] = round(float(np.interp(h, xs, ys)), 6) if xs[0] <= h <= xs[-1] else None
        out.append({"reference": r["config"], "hardness": r["hardness"], "short_share": r["short_share"],
                    "fn_rate": at})
    return out


def _file_record(path: str | Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    return {"name": Path(path).name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def held_out_set(cfg: MineConfig, fn: FnReportConfig, positives: Mapping[str, Sequence[str]], corpus) -> HeldOut:
    """The held-back positives of ``fn`` (holdout split or second qrels file) for the mining data."""
    if fn.qrels is not None:
        from nvr.data.beir import load_qrels

        held = qrels_heldout(positives, load_qrels(fn.qrels, corpus=corpus), cfg.data.min_relevance)
        if not held.held:
            raise InputError("no training query has a relevant document here that is not already a positive",
                             fn.qrels)
        return held
    seed = cfg.seed if fn.seed is None else fn.seed
    held = holdout_positives(positives, fn.holdout, seed)
    if not held.held:
        raise InputError("no query has >= 2 positives to hold one back (or give a second qrels file: fn.qrels)",
                         cfg.data.pairs_file or cfg.data.beir_dir)
    return held


def build_fn_report(cfg: MineConfig, fn: FnReportConfig) -> dict[str, Any]:
    """Run the report for a mining config (candidate tables and embeddings come from ``cfg.cache_dir``). The
    config goes through the same preflight as ``mine`` (max lengths clamped alike), so the report reuses the
    embeddings mining computed instead of encoding again under other keys."""
    from nvr.mining.preflight import preflight_mine, teacher_key_scope

    cfg = preflight_mine(dataclasses.replace(cfg, overwrite=True))  # never writes output_dir
    with teacher_key_scope(cfg):
        return _build(cfg, fn)


def _build(cfg: MineConfig, fn: FnReportConfig) -> dict[str, Any]:
    from nvr.mining.pipeline import (
        MiningData,
        build_tables,
        check_selection_config,
        load_data,
        make_teacher,
        select_negatives,
    )

    check_selection_config(cfg)
    data = load_data(cfg.data)
    held = held_out_set(cfg, fn, data.positives, data.corpus)
    teachers = [make_teacher(t, cfg.cache_dir, cfg.seed) for t in cfg.teachers]
    calibrated = any(f.calibrate is not None for f, _ in effective_filters(cfg, [t.name for t in cfg.teachers]))
    full = build_tables(cfg, teachers, data, cfg.depth) if calibrated else None  # the run's own (cached) tables
    qids = held.query_ids
    # every query is searched (so the query texts, hence the embedding keys, are mining's: nothing is re-encoded),
    # with the anchors as positives and the held-back positives no longer excluded; then the evaluated rows are kept
    sub = MiningData(
        queries=data.queries, positives={q: held.anchors.get(q, p) for q, p in data.positives.items()},
        corpus=data.corpus, skipped_queries=0,
        excluded={q: [d for d in ex if d not in set(held.held.get(q, ()))] for q, ex in data.excluded.items()},
    )
    row_of = {q: i for i, q in enumerate(data.queries.ids)}
    rows = np.array([row_of[q] for q in qids], dtype=np.int64)
    tables = [t.subset(rows) for t in build_tables(cfg, teachers, sub, cfg.depth)]
    if full is not None:
        resolved = resolve_filters(cfg, full, data.queries.ids)
    else:
        resolved = resolve_filters(cfg, tables, qids)
    results = [apply_filter(t, f, calibration=rec) for t, (f, rec) in zip(tables, resolved)]
    selection, _ = select_negatives(cfg, tables, results)
    configured = {"teacher": "+".join(t.teacher for t in tables) if len(tables) > 1 else tables[0].teacher,
                  "config": "configured", "family": "configured", "x": None,
                  **evaluate_selection(tables, results, selection, held.held, cfg.num_negatives)}
    per_teacher = {}
    for t, (f, rec) in zip(tables, resolved):
        per_teacher[t.teacher] = {
            "filter": {k: v for k, v in dataclasses.asdict(f).items() if k != "calibrate"},
            "calibration": rec,
            "rows": teacher_rows(t, fn, f, cfg.sampler, cfg.num_negatives, cfg.seed, held.held),
        }
        per_teacher[t.teacher]["matched"] = matched_hardness(per_teacher[t.teacher]["rows"])
    return {
        "format": REPORT_FORMAT,
        "source": held.source,
        "holdout": fn.holdout if held.source == "holdout" else None,
        "qrels": _file_record(fn.qrels) if fn.qrels is not None else None,
        "seed": cfg.seed if fn.seed is None else fn.seed,
        "k": cfg.num_negatives,
        "depth": cfg.depth,
        "sampler": dataclasses.asdict(cfg.sampler),
        "ensemble": cfg.ensemble,
        "queries": len(qids),
        "anchor_positives": sum(len(v) for v in held.anchors.values()),
        "heldout_positives": sum(len(v) for v in held.held.values()),
        "sweep": dataclasses.asdict(fn),
        "teachers": per_teacher,
        "configured": configured,
    }


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every row of a report: each teacher's sweep, then ``configured``."""
    rows = [row for t in report["teachers"].values() for row in t["rows"]]
    return [*rows, report["configured"]]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: Mapping[str, Any], title: str = "False-negative report") -> str:
    """One table per teacher (plus the configured run), rows in sweep order."""
    head = ("| config | FN rate | queries w/ FN | FN/query | hardness | mean rank | survivors mean / median "
            "| < K | held-back retrieved | rejected |")
    sep = "|" + "---|" * 10
    src = (f"held back {report['holdout']:g} of each multi-positive query's positives (seed {report['seed']})"
           if report["source"] == "holdout" else f"held-back set from {report['qrels']['name']}")
    lines = [f"# {title}", "", f"{report['queries']} queries, {report['anchor_positives']} anchor positives, "
             f"{report['heldout_positives']} held-back positives ({src}); K={report['k']}, depth {report['depth']}, "
             f"sampler {report['sampler']['method']}.", ""]

    def row_line(r: Mapping[str, Any]) -> str:
        return (f"| {r['config']} | {_fmt(r['fn_rate'])} | {_fmt(r['queries_with_fn'], 3)} | "
                f"{_fmt(r['fn_per_query'], 3)} | {_fmt(r['hardness'])} | {_fmt(r['mean_rank'], 1)} | "
                f"{_fmt(r['survivors_mean'], 1)} / {_fmt(r['survivors_median'], 0)} | {_fmt(r['short_share'], 3)} | "
                f"{r['heldout_in_candidates']} | {_fmt(r['heldout_rejected'], 3)} |")

    for name, t in report["teachers"].items():
        lines += [f"## {name}", ""]
        cal = t.get("calibration") or {}
        if cal:
            lines += [f"Calibrated: {cal['method']}.{cal['parameter']} = {cal['chosen']:.6g} ({cal['target']} "
                      f"{cal['value']:g}; achieved {cal['achieved_reject_rate']:.3f} on {cal['positives_used']} "
                      "positives).", ""]
        lines += [head, sep, *(row_line(r) for r in t["rows"]), ""]
        matched = t.get("matched") or []
        if matched:
            fams = [f for f in ("naive", "shifted", "abs", "marginpos", "percpos") if f in matched[0]["fn_rate"]]
            lines += ["FN rate of each family at the hardness of each PercPos setting (linear interpolation between "
                      "its sweep points; - outside its range):", "",
                      "| at | hardness | " + " | ".join(fams) + " |", "|" + "---|" * (2 + len(fams))]
            lines += [f"| {m['reference']} | {_fmt(m['hardness'])} | "
                      + " | ".join(_fmt(m["fn_rate"][f]) for f in fams) + " |" for m in matched]
            lines.append("")
    c = report["configured"]
    lines += [f"## configured run ({c['teacher']}, ensemble {report['ensemble']})", "", head, sep, row_line(c), ""]
    if c["hardness"] is None and len(c.get("hardness_by_teacher", {})) > 1:
        lines += ["Hardness per teacher: " + ", ".join(f"{n} {_fmt(v)}" for n, v in c["hardness_by_teacher"].items())
                  + ".", ""]
    return "\n".join(lines)


def csv_text(report: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in report_rows(report):
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in COLUMNS])
    return buf.getvalue()


_COLORS = {"naive": "black", "shifted": "tab:gray", "abs": "tab:orange", "marginpos": "tab:blue",
           "percpos": "tab:green", "configured": "tab:red"}


def plot(report: Mapping[str, Any], path: str | Path, title: str | None = None) -> None:
    """FN rate vs hardness, one point per config (labelled with its swept value), one panel per teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["teachers"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in report["teachers"][name]["rows"] if r["fn_rate"] is not None and r["hardness"] is not None]
        for family, color in _COLORS.items():
            pts = sorted((r for r in rows if r["family"] == family), key=lambda r: r["hardness"])
            if not pts:
                continue
            xs, ys = [r["hardness"] for r in pts], [r["fn_rate"] for r in pts]
            ax.plot(xs, ys, marker="o", color=color, label=family, linewidth=1, markersize=5)
            for r in pts:
                text = "naive" if r["x"] is None else f"{r['x']:g}"
                ax.annotate(text, (r["hardness"], r["fn_rate"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=color)
        c = report["configured"]
        if len(names) == 1 and c["fn_rate"] is not None and c["hardness"] is not None:
            ax.scatter([c["hardness"]], [c["fn_rate"]], marker="*", s=160, color=_COLORS["configured"],
                       label="configured", zorder=5)
        ax.set_xlabel("hardness: mean teacher score of the selected negatives")
        ax.set_ylabel("false-negative rate of the selected negatives")
        ax.set_title(f"{title + ': ' if title else ''}{name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)


def write_fn_report(report: Mapping[str, Any], folder: str | Path, overwrite: bool = False,
                    title: str | None = None, plots: bool = True) -> Path:
    """``fn_report.{json,md,csv,png}`` in ``folder``, written as one atomic folder."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "fn_report.json", report, ensure_ascii=False, allow_nan=False)
        with atomic_file(tmp / "fn_report.md") as fh:
            fh.write(markdown(report, title or "False-negative report"))
        with atomic_file(tmp / "fn_report.csv") as fh:
            fh.write(csv_text(report))
        if plots:
            plot(report, tmp / "fn_report.png", title)
    return folder


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """Console lines: the configured run's FN rate and hardness, and each teacher's naive Top-K for contrast."""
    lines = [f"false-negative report: {report['queries']} queries, {report['heldout_positives']} held-back positives"]
    c = report["configured"]
    lines.append(f"configured ({c['teacher']}): FN rate {_fmt(c['fn_rate'])}, hardness {_fmt(c['hardness'])}, "
                 f"survivors median {_fmt(c['survivors_median'], 0)}, < K {_fmt(c['short_share'], 3)}")
    for name, t in report["teachers"].items():
        naive = next(r for r in t["rows"] if r["family"] == "naive")
        lines.append(f"{name}: naive FN rate {_fmt(naive['fn_rate'])} at hardness {_fmt(naive['hardness'])}")
    return lines

