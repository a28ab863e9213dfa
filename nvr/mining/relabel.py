"""Relabel instead of only dropping (issue 13 section 3, as RLHN): judge the candidates the positive-aware filter
rejected as too close to the positive, and turn those the judge accepts into extra positives of the example.

Which candidates are judged (the *pool* of a query): cells whose ``FilterResult.reason`` is the score rule of that
table's filter (``above_perc`` / ``above_margin`` / ``above_max``, and ``shifted`` for ``topk_shifted``; each teacher
may have its own filter), over every teacher's table (the deep re-built table for widened queries), merged by
document (best teacher rank first, ties in teacher order) and capped at ``relabel.max_candidates``. Never judged:
positives and their text duplicates, documents equal to the query or judged relevant in the qrels (those are
exclusions, not rejections), padding, ``below_min`` cells, and documents that became a selected negative of the
query through another teacher of an ensemble.

A pooled candidate whose judge score is ``>= relabel.threshold`` becomes an extra positive (highest judge score
first, text duplicates of an earlier extra positive skipped, at most ``max_extra_positives``); the rest stay
rejected. Judge scores go through :meth:`CrossEncoderRescorer.cached_scores` (cached by the judge's fingerprint and
the pair texts). The result is deterministic: it depends only on the tables, the filter and the judge.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from nvr.config.mining import RelabelConfig
from nvr.data.beir import Corpus
from nvr.data.text import text_key
from nvr.mining.filters import FilterResult, Reason
from nvr.search.table import CandidateTable

log = logging.getLogger(__name__)

RULE_REASONS: tuple[Reason, ...] = (Reason.SHIFTED, Reason.ABOVE_MAX, Reason.ABOVE_MARGIN, Reason.ABOVE_PERC)
"""The rejection codes of the methods' score rules (a filter writes only its own): the cells relabel judges."""

TableGroup = tuple[Sequence[CandidateTable], Sequence[FilterResult]]


@dataclass(frozen=True)
class PoolEntry:
    """One rejected candidate of a query: corpus row, best rank over the teachers that rejected it, and the first
    table's score of it (``nan`` when the first teacher did not list it)."""

    doc: int
    rank: int
    score: float


@dataclass(frozen=True)
class ExtraPositive:
    """A rejected candidate the judge accepted; ``score`` is on the first teacher's scale, like a positive's."""

    doc: int
    rank: int
    score: float
    judge_score: float


@dataclass
class RelabelResult:
    """Extra positives per query id (only queries that got some) and the counts for manifest and report."""

    extra: dict[str, list[ExtraPositive]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def rejected_pool(
    groups: Sequence[TableGroup],
    query_ids: Sequence[str],
    max_candidates: int,
    selected: Mapping[str, set[int]] | None = None,
) -> dict[str, list[PoolEntry]]:
    """Per query of ``query_ids``, the candidates to judge (see the module doc), best rank first.

    ``groups`` are ``(tables, results)`` with one table per teacher (first = the teacher whose scale positives
    use); a later group replaces an earlier one for the queries its tables hold (the widened queries' deep tables).
    ``selected``: per query, corpus rows chosen as negatives (left out of the pool).
    """
    codes = np.array([int(r) for r in RULE_REASONS], dtype=np.uint8)
    wanted = set(query_ids)
    source: dict[str, tuple[int, int]] = {}  # qid -> (group, row)
    for g, (tables, _) in enumerate(groups):
        if tables:
            for row, qid in enumerate(tables[0].query_ids):
                if qid in wanted:
                    source[qid] = (g, row)
    row_maps = [[{q: i for i, q in enumerate(t.query_ids)} for t in tables] for tables, _ in groups]
    selected = selected or {}
    pools: dict[str, list[PoolEntry]] = {}
    for qid in query_ids:
        if qid not in source:
            pools[qid] = []
            continue
        g, _ = source[qid]
        tables, results = groups[g]
        best: dict[int, tuple[int, int]] = {}  # doc -> (rank, teacher)
        first_scores: dict[int, float] = {}
        for t, (table, result) in enumerate(zip(tables, results)):
            row = row_maps[g][t][qid]
            idx = np.asarray(table.cand_idx[row])
            if t == 0:
                first_scores = {int(d): float(s) for d, s in zip(idx.tolist(), np.asarray(table.cand_scores[row]))
                                if d >= 0}
            cols = np.flatnonzero(np.isin(np.asarray(result.reason[row]), codes))[:max_candidates]
            for c in cols.tolist():
                doc = int(idx[c])
                if doc not in best or (c, t) < best[doc]:
                    best[doc] = (c, t)
        skip = selected.get(qid, set())
        ranked = sorted((rt, d) for d, rt in best.items() if d not in skip)[:max_candidates]
        pools[qid] = [PoolEntry(d, rt[0], first_scores.get(d, float("nan"))) for rt, d in ranked]
    return pools


def accept(pool: Sequence[PoolEntry], judge_scores: np.ndarray, cfg: RelabelConfig,
           corpus: Corpus) -> list[ExtraPositive]:
    """The pooled candidates the judge accepts (``judge >= threshold``), highest judge score first (ties: better
    rank), text duplicates of an earlier accepted one skipped, capped at ``max_extra_positives``."""
    order = sorted(range(len(pool)), key=lambda i: (-float(judge_scores[i]), pool[i].rank, pool[i].doc))
    out: list[ExtraPositive] = []
    seen: set[str] = set()
    for i in order:
        judge = float(judge_scores[i])
        if not judge >= cfg.threshold:  # nan never passes
            continue
        key = text_key(corpus.passage(pool[i].doc))
        if key in seen:
            continue
        seen.add(key)
        out.append(ExtraPositive(pool[i].doc, pool[i].rank, pool[i].score, judge))
        if cfg.max_extra_positives is not None and len(out) >= cfg.max_extra_positives:
            break
    return out


def relabel(
    cfg: RelabelConfig,
    groups: Sequence[TableGroup],
    query_ids: Sequence[str],
    query_texts: Mapping[str, str],
    corpus: Corpus,
    cache_dir: str | None,
    selected: Mapping[str, set[int]] | None = None,
) -> RelabelResult:
    """Judge every query's pool in one batched (cached) cross-encoder pass and return the extra positives."""
    from nvr.teachers.cross_encoder import CrossEncoderRescorer

    pools = rejected_pool(groups, query_ids, cfg.max_candidates, selected)
    flat = [(qid, e) for qid in query_ids for e in pools[qid]]
    judge = CrossEncoderRescorer(cfg.judge_config(), activation=cfg.activation, cache_dir=cache_dir, key="relabel")
    scores = judge.cached_scores([query_texts[q] for q, _ in flat], [corpus.passage(e.doc) for _, e in flat])
    result = RelabelResult()
    start = 0
    for qid in query_ids:
        n = len(pools[qid])
        accepted = accept(pools[qid], scores[start : start + n], cfg, corpus) if n else []
        start += n
        if accepted:
            result.extra[qid] = accepted
    extras = sum(len(v) for v in result.extra.values())
    result.counts = {
        "relabel_judged_queries": sum(1 for q in query_ids if pools[q]),
        "relabel_judged_candidates": len(flat),
        "relabel_extra_positives": extras,
        "relabel_queries_with_extra_positives": len(result.extra),
        "relabel_still_rejected": len(flat) - extras,
    }
    log.info("relabel: judged %d rejected candidates of %d queries; %d became extra positives of %d queries",
             len(flat), result.counts["relabel_judged_queries"], extras, len(result.extra))
    return result


def relabel_mined(cfg, data, groups: Sequence[TableGroup], selection, kept_rows: np.ndarray) -> RelabelResult:
    """:func:`relabel` for a mining run (``cfg``: MineConfig with ``relabel`` set; ``data``: MiningData) over the
    written queries, leaving out each query's selected negatives."""
    qids = [selection.query_ids[r] for r in kept_rows]
    selected = {selection.query_ids[r]: {int(d) for d in selection.neg_idx[r] if d >= 0} for r in kept_rows}
    texts = {q: data.queries.text(q) for q in qids}
    return relabel(cfg.relabel, groups, qids, texts, data.corpus, cfg.cache_dir, selected)


def extra_positive_rows(extra: Sequence[ExtraPositive], corpus: Corpus) -> list[dict]:
    """The ``mined.jsonl`` ``extra_positives`` objects (contract C2; ``score`` null when unknown)."""
    def rounded(x: float) -> float | None:
        return None if not np.isfinite(x) else round(float(x), 6)

    return [{"id": corpus.ids[e.doc], "text": corpus.passage(e.doc), "score": rounded(e.score),
             "judge_score": rounded(e.judge_score)} for e in extra]
