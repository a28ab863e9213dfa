"""The chosen negatives of a mining run, with provenance (which teacher, at which rank) per negative."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nvr.search.table import CandidateTable


@dataclass
class Selection:
    """K negatives per query (fewer when short; ``-1`` / ``nan`` pads are never real negatives).

    Attributes:
        query_ids: (Q,) row order.
        neg_idx: (Q, K) int64 doc indices into the shared ``doc_ids``.
        neg_scores: (Q, K) float32 score given by the providing teacher.
        neg_teacher: (Q, K) int16 index of the providing teacher in the run's teacher list.
        neg_rank: (Q, K) int32 0-based rank of the negative in that teacher's candidate list.
        widened: (Q,) bool, rows re-selected from deeper candidate lists (shortfall step 1).
        starved: (Q,) bool, rows whose selection ran past the survivors of a candidate list (fewer than K, or a
            sampling window that is not full): a deeper list could change them, so they are widened.
    """

    query_ids: list[str]
    neg_idx: np.ndarray
    neg_scores: np.ndarray
    neg_teacher: np.ndarray
    neg_rank: np.ndarray
    widened: np.ndarray = field(default=None)  # type: ignore[assignment]
    starved: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.widened is None:
            self.widened = np.zeros(len(self.query_ids), dtype=bool)
        if self.starved is None:
            self.starved = self.short.copy()
        shape = self.neg_idx.shape
        if shape[0] != len(self.query_ids):
            raise ValueError(f"selection rows {shape[0]} != {len(self.query_ids)} query ids")
        for name in ("neg_scores", "neg_teacher", "neg_rank"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} shape {getattr(self, name).shape} != neg_idx shape {shape}")

    @property
    def k(self) -> int:
        return int(self.neg_idx.shape[1])

    @property
    def n_selected(self) -> np.ndarray:
        """(Q,) real negatives per query."""
        return (self.neg_idx >= 0).sum(axis=1)

    @property
    def short(self) -> np.ndarray:
        """(Q,) rows with fewer than K negatives."""
        return self.n_selected < self.k

    def subset(self, rows: np.ndarray) -> Selection:
        rows = np.asarray(rows, dtype=np.int64)
        return Selection(
            query_ids=[self.query_ids[i] for i in rows],
            neg_idx=self.neg_idx[rows],
            neg_scores=self.neg_scores[rows],
            neg_teacher=self.neg_teacher[rows],
            neg_rank=self.neg_rank[rows],
            widened=self.widened[rows],
            starved=self.starved[rows],
        )

    def replace_rows(self, rows: np.ndarray, other: Selection, widened: bool = True) -> Selection:
        """A copy where ``rows`` come from ``other`` (same K, rows matched by query id), marked as widened."""
        rows = np.asarray(rows, dtype=np.int64)
        if [self.query_ids[i] for i in rows] != list(other.query_ids):
            raise ValueError("replacement rows do not match the other selection's query ids")
        out = self.subset(np.arange(len(self.query_ids)))
        for name in ("neg_idx", "neg_scores", "neg_teacher", "neg_rank", "starved"):
            getattr(out, name)[rows] = getattr(other, name)
        out.widened[rows] = widened
        return out

    def shortfall_counts(self) -> dict[str, int]:
        """Bookkeeping for the report: full / short / empty rows, and how many were widened."""
        n = self.n_selected
        return {
            "queries": int(n.shape[0]),
            "full": int((n == self.k).sum()),
            "short": int(((n > 0) & (n < self.k)).sum()),
            "empty": int((n == 0).sum()),
            "widened": int(self.widened.sum()),
            "negatives": int(n.sum()),
        }


def from_positions(
    table: CandidateTable, positions: np.ndarray, teacher_index: int = 0, starved: np.ndarray | None = None
) -> Selection:
    """A single-teacher selection from (Q, K) column positions into ``table`` (``-1`` pads); ``starved`` defaults
    to the short rows (right for top-k; samplers pass ``samplers.starved``)."""
    positions = np.asarray(positions, dtype=np.int64)
    real = positions >= 0
    safe = np.where(real, positions, 0)
    idx = np.take_along_axis(np.asarray(table.cand_idx), safe, axis=1)
    scores = np.take_along_axis(np.asarray(table.cand_scores, dtype=np.float32), safe, axis=1)
    return Selection(
        query_ids=list(table.query_ids),
        neg_idx=np.where(real, idx, -1).astype(np.int64),
        neg_scores=np.where(real, scores, np.nan).astype(np.float32),
        neg_teacher=np.where(real, teacher_index, -1).astype(np.int16),
        neg_rank=np.where(real, positions, -1).astype(np.int32),
        starved=None if starved is None else np.asarray(starved, dtype=bool),
    )


def concat(selections: Sequence[Selection]) -> Selection:
    """Stack selections of disjoint query sets (same K), e.g. shards."""
    return Selection(
        query_ids=[q for s in selections for q in s.query_ids],
        neg_idx=np.concatenate([s.neg_idx for s in selections]),
        neg_scores=np.concatenate([s.neg_scores for s in selections]),
        neg_teacher=np.concatenate([s.neg_teacher for s in selections]),
        neg_rank=np.concatenate([s.neg_rank for s in selections]),
        widened=np.concatenate([s.widened for s in selections]),
        starved=np.concatenate([s.starved for s in selections]),
    )
