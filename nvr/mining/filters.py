"""Positive-aware candidate filters (paper section 3, Algorithms 1-3) as vectorised masks over a candidate table.

Every rule keeps a candidate only when its score is *strictly* below the rule's threshold (``score < threshold``),
as in the paper's ``filter_fn``: a negative scoring exactly like the threshold is dropped. ``nan`` scores (padding)
compare False and are never kept. Masks are (Q, N) bool arrays aligned with ``CandidateTable.cand_idx``.

``apply_filter`` records for every cell the *first* rule that rejects it, checked in this order:
``padding`` -> ``positive`` (or, when ``apply_filter`` is given exclusion labels, ``query_text`` /
``judged_relevant`` for flagged candidates that are not positives) -> method rule (``shifted`` | ``above_max`` |
``above_margin`` | ``above_perc``) -> ``below_min``. So a positive is reported as ``positive`` even if it also
scores above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from nvr.config.mining import AnchorPolicy, FilterConfig
from nvr.search.table import CandidateTable


class Reason(IntEnum):
    """Why a candidate was (not) kept; stored as uint8 in ``FilterResult.reason``. Values are stable on disk."""

    KEPT = 0
    PADDING = 1
    POSITIVE = 2
    SHIFTED = 3
    ABOVE_MAX = 4
    ABOVE_MARGIN = 5
    ABOVE_PERC = 6
    BELOW_MIN = 7
    QUERY_TEXT = 8
    """the document's normalized text equals the query's"""
    JUDGED_RELEVANT = 9
    """judged relevant in the qrels (grade > 0) but below ``min_relevance``: not a positive, never a negative"""


REASON_NAMES: tuple[str, ...] = tuple(r.name.lower() for r in Reason)

# Which reason code each method's own rule writes.
_METHOD_REASON: dict[str, Reason] = {
    "topk_shifted": Reason.SHIFTED,
    "topk_abs": Reason.ABOVE_MAX,
    "topk_marginpos": Reason.ABOVE_MARGIN,
    "topk_percpos": Reason.ABOVE_PERC,
}


@dataclass(frozen=True)
class FilterResult:
    """Outcome of one filter over one table.

    Attributes:
        keep: (Q, N) bool, True where the candidate may become a negative.
        reason: (Q, N) uint8 ``Reason`` codes (``KEPT`` where ``keep``).
        anchor: (Q,) float32 positive score each threshold is relative to (``nan`` if the query has no scored
            positive); filled for every method so reports can compare positives with negatives.
        threshold: (Q,) float32 score upper bound of the method rule (``+inf`` for rank-only methods).
        config: the filter that ran (calibrated parameters filled in), for reports and manifests.
        calibration: how ``filter.calibrate`` chose its parameter (``calibrate.calibrate_filter``); empty if not.
    """

    keep: np.ndarray
    reason: np.ndarray
    anchor: np.ndarray
    threshold: np.ndarray
    config: FilterConfig | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Number of cells per reason, by name (padding included)."""
        bins = np.bincount(self.reason.ravel(), minlength=len(Reason))
        return {name: int(bins[i]) for i, name in enumerate(REASON_NAMES)}

    @property
    def num_kept(self) -> np.ndarray:
        """(Q,) survivors per query."""
        return self.keep.sum(axis=1)


def eligible(table: CandidateTable) -> np.ndarray:
    """(Q, N) real candidates that are not positives (nor text duplicates of one)."""
    return table.valid & ~np.asarray(table.cand_is_positive, dtype=bool)


def anchor_scores(pos_scores: np.ndarray, policy: AnchorPolicy = "min") -> np.ndarray:
    """(Q,) one reference score per query from its positives' scores, ignoring ``nan`` pads.

    ``min`` (default, as NVIDIA's code) is the most conservative: every positive then scores at or above the anchor.
    Rows without any scored positive give ``nan``, which rejects every candidate under positive-aware rules.
    """
    scores = np.asarray(pos_scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"pos_scores must be (Q, P), got shape {scores.shape}")
    present = ~np.isnan(scores)
    count = present.sum(axis=1)
    if policy == "min":
        out = np.where(present, scores, np.inf).min(axis=1, initial=np.inf)
    elif policy == "max":
        out = np.where(present, scores, -np.inf).max(axis=1, initial=-np.inf)
    elif policy == "mean":
        out = np.where(present, scores, 0.0).sum(axis=1) / np.maximum(count, 1)
    else:
        raise ValueError(f"unknown anchor policy {policy!r} (min, mean, max)")
    return np.where(count > 0, out, np.nan).astype(np.float32)


def naive_topk(eligible_mask: np.ndarray) -> np.ndarray:
    """Naive Top-K: every eligible candidate, in rank order (positives are still excluded)."""
    return np.asarray(eligible_mask, dtype=bool).copy()


def topk_shifted(eligible_mask: np.ndarray, shift: int) -> np.ndarray:
    """Top-K shifted by N: skip the first ``shift`` *eligible* candidates (positives do not use up the shift)."""
    mask = np.asarray(eligible_mask, dtype=bool)
    return mask & (np.cumsum(mask, axis=1) > shift)


def topk_abs(scores: np.ndarray, max_score: float) -> np.ndarray:
    """TopK-Abs: keep n if ``score(n) < max_score`` (the bound is cast to the scores' dtype, as stored)."""
    s = np.asarray(scores)
    return s < np.asarray(max_score, dtype=s.dtype)


def marginpos_threshold(anchor: np.ndarray, margin: float) -> np.ndarray:
    return np.asarray(anchor, dtype=np.float32) - np.float32(margin)


def percpos_threshold(anchor: np.ndarray, perc: float) -> np.ndarray:
    """``a - |a| * (1 - perc)``: equals ``a * perc`` for a positive anchor and stays *below* a negative anchor
    (plain ``a * perc`` would move a negative anchor up, letting harder-than-positive candidates through)."""
    a = np.asarray(anchor, dtype=np.float32)
    return a - np.abs(a) * np.float32(1.0 - perc)


def topk_marginpos(scores: np.ndarray, anchor: np.ndarray, margin: float) -> np.ndarray:
    """TopK-MarginPos: keep n if ``score(n) < anchor - margin``."""
    return np.asarray(scores) < marginpos_threshold(anchor, margin)[:, None]


def topk_percpos(scores: np.ndarray, anchor: np.ndarray, perc: float) -> np.ndarray:
    """TopK-PercPos (sign-safe): keep n if ``score(n) < anchor - |anchor| * (1 - perc)``."""
    return np.asarray(scores) < percpos_threshold(anchor, perc)[:, None]


def method_threshold(anchor: np.ndarray, cfg: FilterConfig) -> np.ndarray:
    """(Q,) the score bound of ``cfg.method`` per query (``+inf`` for rank-only methods)."""
    q = np.asarray(anchor).shape[0]
    if cfg.method == "topk_abs":
        return np.full(q, cfg.max_score, dtype=np.float32)
    if cfg.method == "topk_marginpos":
        return marginpos_threshold(anchor, cfg.margin)
    if cfg.method == "topk_percpos":
        return percpos_threshold(anchor, cfg.perc)
    return np.full(q, np.inf, dtype=np.float32)


def apply_filter(
    table: CandidateTable, cfg: FilterConfig, labels: np.ndarray | None = None,
    calibration: dict[str, Any] | None = None,
) -> FilterResult:
    """Run ``cfg.method`` (plus the optional ``min_score`` floor) over ``table``; see the module doc for the order.

    ``labels`` ((Q, N) uint8, from ``build.exclusion_reasons``) names why each flagged candidate is excluded; only
    the reason codes change with it, never ``keep``. ``cfg`` must be resolved: a ``filter.calibrate`` is chosen
    first by ``calibrate.resolve_filter`` (whose record is passed as ``calibration``), never silently ignored.
    """
    if cfg.calibrate is not None:
        raise ValueError("apply_filter needs a resolved filter: run calibrate.resolve_filter first")
    scores = np.asarray(table.cand_scores, dtype=np.float32)
    anchor = anchor_scores(table.pos_scores, cfg.anchor)
    threshold = method_threshold(anchor, cfg)
    valid = table.valid
    elig = eligible(table)
    if cfg.method == "naive_topk":
        rule = naive_topk(elig)
    elif cfg.method == "topk_shifted":
        rule = topk_shifted(elig, cfg.shift)
    else:
        rule = scores < threshold[:, None]
    reason = np.full(scores.shape, Reason.KEPT, dtype=np.uint8)
    rejected = np.zeros(scores.shape, dtype=bool)
    steps: list[tuple[np.ndarray, Reason]] = [(~valid, Reason.PADDING), (~elig, Reason.POSITIVE)]
    if cfg.method in _METHOD_REASON:
        steps.append((~rule, _METHOD_REASON[cfg.method]))
    if cfg.min_score is not None:
        steps.append((~(scores >= cfg.min_score), Reason.BELOW_MIN))
    for fails, code in steps:
        new = fails & ~rejected
        reason[new] = code
        rejected |= new
    if labels is not None:
        labels = np.asarray(labels, dtype=np.uint8)
        relabel = (reason == Reason.POSITIVE) & (labels != 0)
        reason[relabel] = labels[relabel]
    return FilterResult(keep=~rejected, reason=reason, anchor=anchor, threshold=threshold, config=cfg,
                        calibration=dict(calibration or {}))
