"""``filter.calibrate``: choose a filter's threshold per teacher from that teacher's own positive scores.

A fixed ``perc: 0.95`` or ``max_score: 0.7`` means different things on different score scales (cosine of MiniLM,
e5 or BM25). Calibration states the threshold in a unit every teacher shares: the share of *known positives* it
would reject. Known positives stand for the unlabeled ones a positive-aware filter exists to catch: if 90% of a
query's held-back positives score within ``t`` of the anchor, a threshold at ``t`` keeps ~90% of its unlabeled
positives out of the negatives too.

For each teacher's candidate table (positive scores are computed explicitly for every positive):

- ``heldout_reject_rate``: per query with >= 2 scored positives a seeded share is held back
  (``rng_for(seed, "calibrate-holdout", query_id)`` over the sorted doc ids, so neither row nor file order matters),
  the anchor (``filter.anchor``) comes from the others, and each held-back positive gives one value.
- ``positive_quantile``: deterministic; each positive of a multi-positive query in turn against the anchor of the
  others (TopK-Abs: the scores of all positives, single-positive queries included).

The value is the gap ``anchor - score`` (MarginPos), the relative gap ``(anchor - score) / |anchor|`` (PercPos,
sign-safe like ``filters.percpos_threshold``) or the score itself (TopK-Abs). The rule rejects a candidate when
``score >= threshold``, i.e. when its gap is at most ``margin`` / ``1 - perc``, so the chosen parameter is the
``value``-quantile of the gaps (``inverted_cdf``: an observed gap, at least ``value`` of them at or below it) and,
for TopK-Abs, the score that ``value`` of the scores reach. The share actually rejected by the float32 rule is
measured and recorded (``achieved_reject_rate``) next to the chosen value. ``margin`` is clipped at 0 and ``perc``
to ``[PERC_MIN, 2]`` (both flagged ``clipped``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from nvr.config.mining import CALIBRATED_PARAMETER, FilterConfig, MineConfig
from nvr.mining.filters import anchor_scores, method_threshold
from nvr.search.table import CandidateTable
from nvr.utils.errors import ConfigError
from nvr.utils.hashing import sha256_json
from nvr.utils.seeding import rng_for

PERC_MIN = 1e-3
_MEMO: OrderedDict[str, tuple[CandidateTable, FilterConfig, dict[str, Any]]] = OrderedDict()
_MEMO_SIZE = 8
"""Full tables remembered for their partial re-builds (the table object itself: no copy of its arrays)."""


def holdout_count(n: int, fraction: float) -> int:
    """How many of ``n`` positives to hold back: ``fraction * n`` rounded half up, at least 1 and at most n - 1
    (0 when n < 2: a query needs a kept positive to anchor and a held-back one to measure)."""
    if n < 2:
        return 0
    return min(n - 1, max(1, int(math.floor(fraction * n + 0.5))))


def holdout_split(doc_ids: Sequence[str], fraction: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(kept, held) doc ids: a seeded ``holdout_count`` of the distinct ids, drawn over their sorted order."""
    items = sorted(set(doc_ids))
    h = holdout_count(len(items), fraction)
    if h == 0:
        return items, []
    held = set(items[i] for i in rng.permutation(len(items))[:h])
    return [d for d in items if d not in held], sorted(held)


def calibration_pairs(
    table: CandidateTable, cfg: FilterConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(anchors, scores) of the calibration positives of ``table`` (one pair per positive used; the anchor is
    ``nan`` for TopK-Abs, which needs none)."""
    cal = cfg.calibrate
    if cal is None:
        raise ValueError("calibration_pairs needs filter.calibrate")
    anchors: list[float] = []
    scores: list[float] = []
    doc_ids = table.doc_ids
    for row, qid in enumerate(table.query_ids):
        idx, sc = np.asarray(table.pos_idx[row]), np.asarray(table.pos_scores[row], dtype=np.float32)
        present = (idx >= 0) & np.isfinite(sc)
        by_doc = {doc_ids[int(d)]: float(s) for d, s in zip(idx[present], sc[present])}
        if cfg.method == "topk_abs" and cal.target == "positive_quantile":
            scores.extend(by_doc.values())
            anchors.extend([math.nan] * len(by_doc))
            continue
        if len(by_doc) < 2:
            continue
        if cal.target == "heldout_reject_rate":
            kept, held = holdout_split(list(by_doc), cal.holdout, rng_for(seed, "calibrate-holdout", qid))
            groups = [(kept, held)]
        else:
            groups = [([d for d in by_doc if d != p], [p]) for p in sorted(by_doc)]
        for kept, held in groups:
            anchor = float(anchor_scores(np.array([[by_doc[d] for d in kept]], np.float32), cfg.anchor)[0])
            for d in held:
                anchors.append(anchor)
                scores.append(by_doc[d])
    return np.asarray(anchors, dtype=np.float32), np.asarray(scores, dtype=np.float32)


def _choose(method: str, anchors: np.ndarray, scores: np.ndarray, value: float) -> tuple[float, bool]:
    """(parameter, clipped) so that at least ``value`` of the calibration positives are rejected."""
    if method == "topk_abs":
        return float(-np.quantile(-scores.astype(np.float64), value, method="inverted_cdf")), False
    a, s = anchors.astype(np.float64), scores.astype(np.float64)
    if method == "topk_marginpos":
        t = float(np.quantile(a - s, value, method="inverted_cdf"))
        return max(t, 0.0), t < 0
    usable = a != 0  # |anchor| = 0: every perc gives the same threshold, the gap says nothing
    t = float(np.quantile((a[usable] - s[usable]) / np.abs(a[usable]), value, method="inverted_cdf"))
    perc = 1.0 - t
    return float(min(max(perc, PERC_MIN), 2.0)), not PERC_MIN <= perc <= 2.0


def _achieved(cfg: FilterConfig, parameter: str, chosen: float, anchors: np.ndarray, scores: np.ndarray) -> float:
    """Share of the calibration positives the float32 rule rejects (``score >= threshold``) at ``chosen``."""
    resolved = dataclasses.replace(cfg, calibrate=None, **{parameter: chosen})
    if cfg.method == "topk_abs":
        threshold = np.full(scores.shape, np.float32(chosen), dtype=np.float32)
    else:
        threshold = method_threshold(anchors, resolved)
    return float(np.mean(scores >= threshold))


def _tighten(
    cfg: FilterConfig, parameter: str, chosen: float, anchors: np.ndarray, scores: np.ndarray, value: float
) -> tuple[float, float]:
    """(chosen, achieved): the exact quantile can miss a boundary positive by float32 rounding of the rule's
    threshold; step the parameter stricter by a few float32 ulps until the rule rejects ``value`` as chosen."""
    achieved = _achieved(cfg, parameter, chosen, anchors, scores)
    scale = float(np.max(np.abs(anchors[np.isfinite(anchors)]), initial=1.0)) if anchors.size else 1.0
    for _ in range(64):
        if achieved >= value - 1e-12:
            break
        if parameter == "perc":
            if chosen <= PERC_MIN:
                break
            chosen = max(PERC_MIN, chosen - 2 * float(np.finfo(np.float32).eps))
        elif parameter == "margin":
            chosen += 2 * float(np.spacing(np.float32(scale)))
        else:
            chosen = float(np.nextafter(np.float32(chosen), np.float32(-np.inf)))
        achieved = _achieved(cfg, parameter, chosen, anchors, scores)
    return chosen, achieved


def calibrate_filter(
    table: CandidateTable, cfg: FilterConfig, seed: int, key: str = "filter"
) -> tuple[FilterConfig, dict[str, Any]]:
    """``cfg`` with its method's parameter chosen on ``table`` (``calibrate`` cleared), and the record of the
    choice (target, value, parameter, chosen value, positives and queries used, achieved reject rate).
    ``key`` names the config section in errors (``teachers[<name>].filter`` for a per-teacher filter)."""
    cal = cfg.calibrate
    if cal is None:
        return cfg, {}
    parameter = CALIBRATED_PARAMETER[cfg.method]
    anchors, scores = calibration_pairs(table, cfg, seed)
    if cfg.method == "topk_percpos":
        keep = anchors != 0
        anchors, scores = anchors[keep], scores[keep]
    if scores.size == 0:
        need = "scored positives" if cfg.method == "topk_abs" and cal.target == "positive_quantile" else \
            "queries with >= 2 scored positives"
        raise ConfigError(f"{key}.calibrate", f"teacher {table.teacher!r} has no {need} to calibrate "
                                              f"{cfg.method}.{parameter} on")
    chosen, clipped = _choose(cfg.method, anchors, scores, cal.value)
    chosen, achieved = _tighten(cfg, parameter, chosen, anchors, scores, cal.value)
    resolved = dataclasses.replace(cfg, calibrate=None, **{parameter: chosen})
    queries = sum(1 for row in range(table.num_queries) if int((table.pos_idx[row] >= 0).sum()) >= 2)
    record = {
        "teacher": table.teacher, "method": cfg.method, "target": cal.target, "value": cal.value,
        "holdout": cal.holdout if cal.target == "heldout_reject_rate" else None, "seed": seed,
        "parameter": parameter, "chosen": chosen, "clipped": clipped, "positives_used": int(scores.size),
        "multi_positive_queries": queries, "achieved_reject_rate": round(achieved, 6),
    }
    return resolved, record


def _same_rows(full: CandidateTable, part: CandidateTable) -> bool:
    """True when every row of ``part`` is a row of ``full``: same positives, scores equal up to encoding noise (a
    dense teacher re-encodes the subset's queries in other batches: under bf16 autocast scores move by ~1e-4)."""
    index = {q: i for i, q in enumerate(full.query_ids)}
    for r, q in enumerate(part.query_ids):
        j = index.get(q)
        if j is None:
            return False
        a_idx, b_idx = np.asarray(full.pos_idx[j]), np.asarray(part.pos_idx[r])
        a_idx, a_sc = a_idx[a_idx >= 0], np.asarray(full.pos_scores[j], np.float32)[a_idx >= 0]
        b_sc = np.asarray(part.pos_scores[r], np.float32)[b_idx >= 0]
        b_idx = b_idx[b_idx >= 0]
        if a_idx.tolist() != b_idx.tolist() or not np.allclose(a_sc, b_sc, rtol=1e-2, atol=1e-2, equal_nan=True):
            return False
    return True


def _memo_key(table: CandidateTable, cfg: FilterConfig, seed: int, all_query_ids: Sequence[str]) -> str:
    return sha256_json({"teacher": table.teacher, "filter": dataclasses.asdict(cfg), "seed": seed,
                        "queries": list(all_query_ids)})


def resolve_filter(
    table: CandidateTable, cfg: FilterConfig, seed: int, all_query_ids: Sequence[str] | None = None,
    key: str = "filter",
) -> tuple[FilterConfig, dict[str, Any]]:
    """``calibrate_filter`` on the run's full table, reused for its partial re-builds.

    The pipeline filters the shallow table of every query, then re-builds the short queries at ``max_depth``: the
    deep table must be filtered with the parameter chosen on *all* queries (its own few rows would choose another).
    So a table covering ``all_query_ids`` computes and remembers its choice (by teacher, filter config, seed and
    query set); a partial table (rows a subset) reuses it after checking that its positives and their scores are
    those of the remembered table (scores up to encoding noise). A partial table with no remembered full one is a
    ``ValueError``.
    """
    if cfg.calibrate is None:
        return cfg, {}
    all_ids = list(table.query_ids) if all_query_ids is None else list(all_query_ids)
    memo = _memo_key(table, cfg, seed, all_ids)
    if list(table.query_ids) == all_ids:
        resolved, record = calibrate_filter(table, cfg, seed, key)
        _MEMO[memo] = (table, resolved, record)
        _MEMO.move_to_end(memo)
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
        return resolved, record
    entry = _MEMO.get(memo)
    if entry is None or not _same_rows(entry[0], table):
        raise ValueError(f"teacher {table.teacher!r}: a partial table is calibrated with the choice made on the full "
                         "table of the same run; filter the full table first")
    return entry[1], entry[2]


def effective_filters(cfg: MineConfig, teacher_names: Sequence[str]) -> list[tuple[FilterConfig, str]]:
    """Per teacher (by name, else position), the filter that applies (its own ``filter``, else the run's) and its
    config key."""
    by_name = {t.name: t for t in cfg.teachers}
    out = []
    for i, name in enumerate(teacher_names):
        teacher = by_name.get(name) or (cfg.teachers[i] if i < len(cfg.teachers) else None)
        if teacher is not None and teacher.filter is not None:
            out.append((teacher.filter, f"teachers[{teacher.name}].filter"))
        else:
            out.append((cfg.filter, "filter"))
    return out


def resolve_filters(
    cfg: MineConfig, tables: Sequence[CandidateTable], all_query_ids: Sequence[str] | None = None
) -> list[tuple[FilterConfig, dict[str, Any]]]:
    """Per table, the filter to apply with calibrated parameters (``resolve_filter``) and the calibration record
    (empty when the filter is not calibrated). The held-back split uses ``filter.calibrate.seed`` or ``cfg.seed``."""
    out = []
    for table, (fcfg, key) in zip(tables, effective_filters(cfg, [t.teacher for t in tables])):
        seed = cfg.seed if fcfg.calibrate is None or fcfg.calibrate.seed is None else fcfg.calibrate.seed
        out.append(resolve_filter(table, fcfg, seed, all_query_ids, key))
    return out
