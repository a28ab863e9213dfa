"""Combining several teachers' negatives (paper section 4.2), keeping provenance per negative.

Inputs are per-teacher candidate tables over the *same* ``doc_ids`` (so documents compare by index) and the
``FilterResult`` of each; rows are matched by query id, and the output follows the first table's row order.

- ``cross_sample``: each query takes all K negatives from one teacher, drawn by ``rng_for(seed, "teacher", qid)``.
- ``intra_sample``: round r takes the r-th survivor of every teacher (teacher order) until K are chosen.
  Without dedup a document agreed on by several teachers appears several times (the paper's best variant: it
  up-weights agreed negatives in the loss). With dedup a repeat is replaced by that teacher's next survivor not
  chosen yet. A teacher that runs out of survivors is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nvr.mining.filters import FilterResult
from nvr.mining.samplers import ranked_survivors
from nvr.mining.selection import Selection, from_positions
from nvr.search.table import CandidateTable
from nvr.utils.seeding import rng_for


def align_rows(tables: Sequence[CandidateTable]) -> list[np.ndarray]:
    """Per teacher, the row index of each of the first table's query ids; checks doc ids and query sets agree."""
    if not tables:
        raise ValueError("an ensemble needs at least one teacher table")
    first = tables[0]
    out = []
    for t in tables:
        if t.doc_ids is not first.doc_ids and list(t.doc_ids) != list(first.doc_ids):
            raise ValueError(f"teacher {t.teacher!r} uses a different doc_ids list than {first.teacher!r}")
        index = {qid: i for i, qid in enumerate(t.query_ids)}
        missing = [q for q in first.query_ids if q not in index]
        if missing or len(index) != len(first.query_ids):
            raise ValueError(f"teacher {t.teacher!r} has different query ids (e.g. {missing[:3]})")
        out.append(np.fromiter((index[q] for q in first.query_ids), dtype=np.int64, count=len(first.query_ids)))
    return out


def cross_sample(per_teacher: Sequence[Selection], seed: int) -> Selection:
    """One teacher per query (uniform, keyed by query id); ``per_teacher`` are row-aligned single-teacher picks."""
    first = per_teacher[0]
    for s in per_teacher[1:]:
        if list(s.query_ids) != list(first.query_ids) or s.k != first.k:
            raise ValueError("cross_sample needs selections with the same query order and K")
    choice = np.array([rng_for(seed, "teacher", q).integers(len(per_teacher)) for q in first.query_ids], np.int64)
    stacked = {
        name: np.stack([getattr(s, name) for s in per_teacher])
        for name in ("neg_idx", "neg_scores", "neg_teacher", "neg_rank", "starved")
    }
    rows = np.arange(len(first.query_ids))
    picked = {name: arr[choice, rows] for name, arr in stacked.items()}
    return Selection(query_ids=list(first.query_ids), **picked)


def _intra_row(
    survivor_lists: list[np.ndarray], cand_idx: list[np.ndarray], k: int, dedup: bool
) -> tuple[list[tuple[int, int]], bool]:
    """One query: (teacher, column) pairs chosen round-robin over the teachers' ranked survivors, and whether some
    teacher ran out of survivors before the row was complete (a deeper candidate list could change the row)."""
    starved = False
    chosen: list[tuple[int, int]] = []
    taken: set[int] = set()
    pointers = [0] * len(survivor_lists)
    while len(chosen) < k:
        progressed = False
        for t, survivors in enumerate(survivor_lists):
            if len(chosen) == k:
                break
            p = pointers[t]
            if dedup:
                while p < len(survivors) and int(cand_idx[t][survivors[p]]) in taken:
                    p += 1
            if p >= len(survivors):
                pointers[t] = p
                starved = True
                continue
            chosen.append((t, int(survivors[p])))
            taken.add(int(cand_idx[t][survivors[p]]))
            pointers[t] = p + 1
            progressed = True
        if not progressed:
            break
    return chosen, starved


def intra_sample(
    tables: Sequence[CandidateTable], results: Sequence[FilterResult], k: int, dedup: bool = False
) -> Selection:
    """Round-robin merge of the teachers' ranked survivors (see module doc)."""
    rows_per_teacher = align_rows(tables)
    survivors = [ranked_survivors(r.keep)[rows] for r, rows in zip(results, rows_per_teacher)]
    cand = [np.asarray(t.cand_idx)[rows] for t, rows in zip(tables, rows_per_teacher)]
    scores = [np.asarray(t.cand_scores, dtype=np.float32)[rows] for t, rows in zip(tables, rows_per_teacher)]
    q = len(tables[0].query_ids)
    neg_idx = np.full((q, k), -1, dtype=np.int64)
    neg_scores = np.full((q, k), np.nan, dtype=np.float32)
    neg_teacher = np.full((q, k), -1, dtype=np.int16)
    neg_rank = np.full((q, k), -1, dtype=np.int32)
    starved = np.zeros(q, dtype=bool)
    for row in range(q):
        lists = [s[row][s[row] >= 0] for s in survivors]
        chosen, starved[row] = _intra_row(lists, [c[row] for c in cand], k, dedup)
        for j, (t, col) in enumerate(chosen):
            neg_idx[row, j] = cand[t][row, col]
            neg_scores[row, j] = scores[t][row, col]
            neg_teacher[row, j] = t
            neg_rank[row, j] = col
    return Selection(
        query_ids=list(tables[0].query_ids), neg_idx=neg_idx, neg_scores=neg_scores, neg_teacher=neg_teacher,
        neg_rank=neg_rank, starved=starved,
    )


def per_teacher_selections(
    tables: Sequence[CandidateTable],
    positions: Sequence[np.ndarray],
    starved: Sequence[np.ndarray | None] | None = None,
) -> list[Selection]:
    """Single-teacher selections (teacher index = list position), rows aligned to the first table; ``starved``
    (per teacher, in that table's row order) marks rows a deeper candidate list could change."""
    rows_per_teacher = align_rows(tables)
    starved = list(starved) if starved is not None else [None] * len(tables)
    return [
        from_positions(t, pos, i, st).subset(rows)
        for i, (t, pos, st, rows) in enumerate(zip(tables, positions, starved, rows_per_teacher))
    ]
