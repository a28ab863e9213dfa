"""Opt-in per-candidate audit: for every real candidate of every teacher, the decision and why.

One parquet row per (teacher, query, candidate): ``query_id, doc_id, teacher, rank, score, anchor, threshold,
reason, selected, query_written``. ``reason`` is a ``filters.Reason`` name (``kept`` or the first rule that
rejected it); ``selected`` is True when the final selection took this teacher's candidate at this rank;
``query_written`` is False for queries the shortfall policy dropped from ``mined.jsonl``. Rows are ordered by group,
teacher, query (selection order), then rank, so the file is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nvr.mining.filters import REASON_NAMES, FilterResult
from nvr.mining.selection import Selection
from nvr.search.table import CandidateTable
from nvr.utils.atomic import atomic_file


def selected_mask(selection: Selection, table: CandidateTable, teacher_index: int) -> np.ndarray:
    """(Q_table, N) True where ``selection`` took this teacher's candidate (rows matched by query id)."""
    mask = np.zeros(table.cand_idx.shape, dtype=bool)
    row_of = {q: i for i, q in enumerate(table.query_ids)}
    hit_rows, hit_cols = np.nonzero(selection.neg_teacher == teacher_index)
    for r, c in zip(hit_rows, hit_cols):
        row = row_of.get(selection.query_ids[r])
        if row is not None:
            mask[row, selection.neg_rank[r, c]] = True
    return mask


def audit_table(
    tables: Sequence[CandidateTable],
    results: Sequence[FilterResult],
    selection: Selection,
    written: set[str] | None = None,
):
    """The audit as a ``pyarrow.Table`` (only queries present in ``selection``, in its order); ``written`` is the
    set of query ids that reached ``mined.jsonl`` (all when None)."""
    import pyarrow as pa

    parts = []
    for t_index, (table, result) in enumerate(zip(tables, results)):
        row_of = {q: i for i, q in enumerate(table.query_ids)}
        rows = np.array([row_of[q] for q in selection.query_ids if q in row_of], dtype=np.int64)
        valid = table.valid[rows]
        r_idx, c_idx = np.nonzero(valid)
        src_rows = rows[r_idx]
        doc_ids = np.asarray(table.doc_ids, dtype=object)
        query_ids = np.asarray(table.query_ids, dtype=object)
        parts.append({
            "query_id": query_ids[src_rows],
            "doc_id": doc_ids[np.asarray(table.cand_idx)[src_rows, c_idx]],
            "teacher": np.full(src_rows.size, table.teacher, dtype=object),
            "rank": c_idx.astype(np.int32),
            "score": np.asarray(table.cand_scores, dtype=np.float32)[src_rows, c_idx],
            "anchor": result.anchor[src_rows],
            "threshold": result.threshold[src_rows],
            "reason": np.asarray(REASON_NAMES, dtype=object)[result.reason[src_rows, c_idx]],
            "selected": selected_mask(selection, table, t_index)[src_rows, c_idx],
            "query_written": np.array([written is None or q in written for q in query_ids[src_rows]], dtype=bool),
        })
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return pa.table({
        "query_id": pa.array(columns["query_id"].tolist(), pa.string()),
        "doc_id": pa.array(columns["doc_id"].tolist(), pa.string()),
        "teacher": pa.array(columns["teacher"].tolist(), pa.string()).dictionary_encode(),
        "rank": pa.array(columns["rank"], pa.int32()),
        "score": pa.array(columns["score"], pa.float32()),
        "anchor": pa.array(columns["anchor"].astype(np.float32), pa.float32()),
        "threshold": pa.array(columns["threshold"].astype(np.float32), pa.float32()),
        "reason": pa.array(columns["reason"].tolist(), pa.string()).dictionary_encode(),
        "selected": pa.array(columns["selected"], pa.bool_()),
        "query_written": pa.array(columns["query_written"], pa.bool_()),
    })


Group = tuple[Sequence[CandidateTable], Sequence[FilterResult], Selection]


def write_audit(path: str | Path, groups: Sequence[Group], written: set[str] | None = None) -> int:
    """Write ``audit.parquet`` atomically from one or more (tables, results, selection) groups (e.g. the normal
    rows and the rows re-built at a larger depth); returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [audit_table(tables, results, selection, written) for tables, results, selection in groups]
    table = pa.concat_tables([p.cast(parts[0].schema) for p in parts]) if len(parts) > 1 else parts[0]
    with atomic_file(path, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
    return table.num_rows
