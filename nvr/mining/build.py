"""Build (or load from cache) one teacher's candidate table: the only expensive step of a mining run.

A teacher is anything with ``name``, ``settings_fingerprint`` and ``rank_corpus(query_texts, corpus, k, pair_idx,
doc_order, memory_mb) -> (scores[Q, k], idx[Q, k], pair_scores[Q, P])`` (DenseTeacher, BM25Teacher, RandomTeacher;
a teacher with ``uses_query_ids = True`` also gets ``query_ids=``). The table is cached under
``cache_dir/tables/<fingerprint>`` so a sweep of filters and samplers re-runs in seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from nvr.data.beir import Corpus
from nvr.data.text import text_key
from nvr.mining.search import doc_id_order
from nvr.mining.table import FORMAT_VERSION, CandidateTable
from nvr.teachers.cache import dist_rank_world
from nvr.utils.hashing import sha256_json, sha256_texts

log = logging.getLogger(__name__)


class Teacher(Protocol):
    name: str

    @property
    def settings_fingerprint(self) -> str: ...

    def rank_corpus(
        self,
        query_texts: Sequence[str],
        corpus: Corpus,
        k: int,
        pair_idx: np.ndarray,
        doc_order: np.ndarray | None = None,
        memory_mb: float = 1024,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def build_candidate_table(
    teacher: Teacher,
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    positives: Mapping[str, Sequence[str]],
    corpus: Corpus,
    depth: int,
    memory_mb: float = 1024,
    cache_dir: str | Path | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
) -> CandidateTable:
    """Top ``depth + max #positives`` candidates per query, positives (and their text duplicates) flagged.

    ``rows`` restricts the table to those query rows (e.g. re-building the short ones at a larger depth); the
    table's ``query_ids`` are then that subset, in that order. ``pos_scores`` are computed explicitly for every
    positive, whether or not it was retrieved.
    """
    if depth <= 0:
        raise ValueError(f"depth must be > 0, got {depth}")
    if len(query_ids) != len(query_texts):
        raise ValueError(f"{len(query_ids)} query ids but {len(query_texts)} query texts")
    sel = np.arange(len(query_ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    ids = [query_ids[i] for i in sel]
    texts = [query_texts[i] for i in sel]
    pos_lists = [_positive_rows(qid, positives.get(qid, ()), corpus) for qid in ids]
    pos_idx = _pad_rows(pos_lists)
    k = depth + max((len(p) for p in pos_lists), default=0)

    path = None
    if cache_dir is not None:
        key = table_fingerprint(teacher, ids, texts, pos_lists, corpus, depth)
        path = Path(cache_dir) / "tables" / key
        cached = _load_cached(path)
        if cached is not None:
            return cached

    started = time.monotonic()
    if ids:
        by_id = {"query_ids": ids} if getattr(teacher, "uses_query_ids", False) else {}
        scores, idx, pos_scores = teacher.rank_corpus(
            texts, corpus, k, pos_idx, doc_id_order(corpus.ids), memory_mb, **by_id
        )
    else:
        scores, idx = np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        pos_scores = np.zeros(pos_idx.shape, np.float32)
    table = CandidateTable(
        teacher=teacher.name, query_ids=ids, doc_ids=corpus.ids, cand_idx=idx, cand_scores=scores,
        cand_is_positive=mark_positives(idx, pos_idx, corpus), pos_idx=pos_idx, pos_scores=pos_scores,
    )
    log.info("teacher %s: %d queries x %d candidates in %.1fs", teacher.name, len(ids), k, time.monotonic() - started)
    if path is not None and dist_rank_world()[0] == 0:
        table.save(path, overwrite=True)
    return table


def table_fingerprint(
    teacher: Teacher,
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    pos_rows: Sequence[Sequence[int]],
    corpus: Corpus,
    depth: int,
) -> str:
    """Cache key of a table: teacher settings + corpus + (query id, text) pairs + positives + depth."""
    return sha256_json({
        "format": FORMAT_VERSION, "teacher": teacher.settings_fingerprint, "name": teacher.name,
        "corpus": corpus.fingerprint, "queries": sha256_texts(q for pair in zip(query_ids, query_texts) for q in pair),
        "positives": sha256_json([list(map(int, p)) for p in pos_rows]), "depth": depth,
    })[:40]


def mark_positives(cand_idx: np.ndarray, pos_idx: np.ndarray, corpus: Corpus) -> np.ndarray:
    """(Q, N) True where the candidate is a positive of its query by row, or has the same ``text_key`` as one."""
    is_pos = np.zeros(cand_idx.shape, dtype=bool)
    if cand_idx.size == 0 or pos_idx.size == 0:
        return is_pos
    docs = np.unique(np.concatenate([cand_idx.ravel(), pos_idx.ravel()]))
    docs = docs[docs >= 0]
    key_ids: dict[str, int] = {}
    doc_key = np.full(len(corpus), -1, dtype=np.int64)
    for d in docs:
        doc_key[d] = key_ids.setdefault(text_key(corpus.passage(int(d))), len(key_ids))
    cand_key = np.where(cand_idx >= 0, doc_key[np.maximum(cand_idx, 0)], -1)
    pos_key = np.where(pos_idx >= 0, doc_key[np.maximum(pos_idx, 0)], -2)
    for p in range(pos_idx.shape[1]):
        is_pos |= (cand_idx == pos_idx[:, p : p + 1]) & (pos_idx[:, p : p + 1] >= 0)
        is_pos |= cand_key == pos_key[:, p : p + 1]
    return is_pos


def _positive_rows(qid: str, doc_ids: Sequence[str], corpus: Corpus) -> list[int]:
    rows: list[int] = []
    for doc_id in doc_ids:
        row = corpus.index.get(doc_id)
        if row is None:
            raise ValueError(f"positive doc id {doc_id!r} of query {qid!r} is not in the corpus")
        if row not in rows:
            rows.append(row)
    return rows


def _pad_rows(rows: list[list[int]]) -> np.ndarray:
    out = np.full((len(rows), max((len(r) for r in rows), default=0) or 1), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _load_cached(path: Path) -> CandidateTable | None:
    if not (path / "meta.json").exists():
        return None
    try:
        table = CandidateTable.load(path)
    except (OSError, ValueError, KeyError) as err:
        log.warning("ignoring unreadable cached table %s (%s); rebuilding", path, err)
        return None
    log.info("teacher %s: candidate table loaded from cache %s", table.teacher, path)
    return table
