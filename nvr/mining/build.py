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
from nvr.search.exact import doc_id_order
from nvr.search.table import FORMAT_VERSION, CandidateTable, cached_or_built
from nvr.utils.hashing import sha256_json, sha256_texts

log = logging.getLogger(__name__)

EXCLUSION_RULES = "positives+text-duplicates+query-text(passage or body)+excluded-ids/2"
"""Which candidates ``mark_positives`` flags; part of the table cache key, so a change of the rules (e.g. adding the
query-text rule) never serves a table flagged under the old ones."""


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
    excluded: Mapping[str, Sequence[str]] | None = None,
    positive_slots: int | None = None,
    text_keys: TextKeys | None = None,
) -> CandidateTable:
    """Top ``depth + max #positives`` candidates per query, with every candidate that must never be a negative
    flagged in ``cand_is_positive``: positives, their text duplicates, documents whose text equals the query's, and
    the query's ``excluded`` doc ids (judged relevant below ``min_relevance``).

    ``rows`` restricts the table to those query rows (e.g. re-building the short ones at a larger depth); the
    table's ``query_ids`` are then that subset, in that order. ``pos_scores`` are computed explicitly for every
    positive, whether or not it was retrieved. ``positive_slots`` fixes the room the width reserves for positives
    (default: the most positives of any of the rows), so a table of some rows (a streaming chunk) has exactly the
    width of the table of all of them. ``text_keys``: see ``mark_positives``.
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
    excluded = excluded or {}
    ex_lists = [_positive_rows(qid, excluded.get(qid, ()), corpus) for qid in ids]
    most_positives = max((len(p) for p in pos_lists), default=0)
    slots = most_positives if positive_slots is None else int(positive_slots)
    if slots < most_positives:
        raise ValueError(f"positive_slots {slots} < {most_positives} positives of one of the rows")
    k = depth + slots

    def compute() -> CandidateTable:
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
            cand_is_positive=mark_positives(idx, pos_idx, corpus, texts, _pad_rows(ex_lists), text_keys),
            pos_idx=pos_idx,
            pos_scores=pos_scores,
        )
        log.info("teacher %s: %d queries x %d candidates in %.1fs", teacher.name, len(ids), k,
                 time.monotonic() - started)
        return table

    if cache_dir is None:
        return compute()
    key = table_fingerprint(teacher, ids, texts, pos_lists, corpus, depth, excluded=ex_lists,
                            width=None if slots == most_positives else k)
    return cached_or_built(Path(cache_dir) / "tables" / key, compute, f"teacher {teacher.name}")


def candidate_table_key(
    teacher: Teacher,
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    positives: Mapping[str, Sequence[str]],
    corpus: Corpus,
    depth: int,
    excluded: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The ``cache_dir/tables`` key of the whole table ``build_candidate_table`` builds for these queries (every
    row, default width), without building it: the streaming path keys its chunked table cache on it."""
    excluded = excluded or {}
    pos_lists = [_positive_rows(q, positives.get(q, ()), corpus) for q in query_ids]
    ex_lists = [_positive_rows(q, excluded.get(q, ()), corpus) for q in query_ids]
    return table_fingerprint(teacher, query_ids, query_texts, pos_lists, corpus, depth, excluded=ex_lists)


def table_fingerprint(
    teacher: Teacher,
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    pos_rows: Sequence[Sequence[int]],
    corpus: Corpus,
    depth: int,
    excluded: Sequence[Sequence[int]] = (),
    width: int | None = None,
) -> str:
    """Cache key of a table: teacher settings + corpus + (query id, text) pairs + positives + depth (+ the width
    when ``positive_slots`` set it to other than the default, so existing keys are unchanged)."""
    extra = {} if width is None else {"width": int(width)}
    return sha256_json({
        **extra, "format": FORMAT_VERSION, "teacher": teacher.settings_fingerprint, "name": teacher.name,
        "corpus": corpus.fingerprint, "queries": sha256_texts(q for pair in zip(query_ids, query_texts) for q in pair),
        "positives": sha256_json([list(map(int, p)) for p in pos_rows]), "depth": depth,
        "excluded": sha256_json([list(map(int, e)) for e in excluded]), "exclusion_rules": EXCLUSION_RULES,
    })[:40]


def mark_positives(
    cand_idx: np.ndarray,
    pos_idx: np.ndarray,
    corpus: Corpus,
    query_texts: Sequence[str] | None = None,
    excluded_idx: np.ndarray | None = None,
    text_keys: TextKeys | None = None,
) -> np.ndarray:
    """(Q, N) True where the candidate must never become a negative of its query.

    That is a positive (by row), a document with the same ``text_key`` as a positive, a document with the same
    ``text_key`` as the query itself (``query_texts``; sentence-transformers and FlagEmbedding exclude those too),
    or one of the query's ``excluded_idx`` rows (``-1`` pads), e.g. documents judged relevant below ``min_relevance``.
    ``text_keys``: the documents' keys, shared across calls (a streaming run's chunks), else computed here.
    """
    flagged = np.zeros(cand_idx.shape, dtype=bool)
    if cand_idx.size == 0:
        return flagged
    keys = TextKeys(corpus) if text_keys is None else text_keys
    pos_idx = _with_rows(pos_idx, cand_idx.shape[0])
    excluded_idx = _with_rows(excluded_idx, cand_idx.shape[0])
    doc_key, passage_keys = keys.key_ids(cand_idx, pos_idx)
    cand_key = np.where(cand_idx >= 0, doc_key[np.maximum(cand_idx, 0)], -1)
    pos_key = np.where(pos_idx >= 0, doc_key[np.maximum(pos_idx, 0)], -2)
    for p in range(pos_idx.shape[1]):
        flagged |= (cand_idx == pos_idx[:, p : p + 1]) & (pos_idx[:, p : p + 1] >= 0)
        flagged |= cand_key == pos_key[:, p : p + 1]
    for e in range(excluded_idx.shape[1]):
        flagged |= (cand_idx == excluded_idx[:, e : e + 1]) & (excluded_idx[:, e : e + 1] >= 0)
    if query_texts is not None:
        query_digests = np.array([_digest(t) for t in query_texts], dtype=_DIGEST)
        flagged |= cand_key == _lookup(passage_keys, query_digests)[:, None]
        body_key, body_keys = keys.key_ids(cand_idx, body=True)  # "title text" differs, but the body is the query
        cand_body = np.where(cand_idx >= 0, body_key[np.maximum(cand_idx, 0)], -1)
        flagged |= cand_body == _lookup(body_keys, query_digests)[:, None]
    return flagged


_DIGEST = "S20"
"""A ``text_key`` as its 20 raw sha1 bytes (numpy compares fixed-size byte strings vectorized)."""


def _digest(text: str) -> bytes:
    return bytes.fromhex(text_key(text))


def _lookup(sorted_keys: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Index of each digest in ``sorted_keys`` (unique, sorted), ``-3`` where absent (never a doc's id)."""
    if sorted_keys.size == 0:
        return np.full(digests.shape, -3, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_keys, digests), sorted_keys.size - 1)
    return np.where(sorted_keys[at] == digests, at, -3).astype(np.int64)


class TextKeys:
    """The ``text_key`` of corpus documents' passages ("title text") and bodies, each hashed once however many
    tables ask: a streaming run's chunks name mostly the same documents (41 bytes per document)."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self.passage = np.zeros(len(corpus), dtype=_DIGEST)
        self.body = np.zeros(len(corpus), dtype=_DIGEST)
        self.has_body = np.zeros(len(corpus), dtype=bool)
        self.known = np.zeros(len(corpus), dtype=bool)

    def _fill(self, docs: np.ndarray) -> None:
        for d in docs[~self.known[docs]].tolist():
            self.passage[d] = _digest(self.corpus.passage(d))
            body = self.corpus.texts[d]
            self.has_body[d] = bool(body.strip())
            if self.has_body[d]:
                self.body[d] = _digest(body)
        self.known[docs] = True

    def key_ids(self, *idx_arrays: np.ndarray, body: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(key_id[D], keys)``: for every doc named in ``idx_arrays`` (``-1`` pads) the index of its passage (or,
        with ``body``, body) key in the sorted unique ``keys``; ``-1`` for the others and for empty bodies."""
        docs = np.unique(np.concatenate([a.ravel() for a in idx_arrays]))
        docs = docs[docs >= 0]
        self._fill(docs)
        if body:
            docs = docs[self.has_body[docs]]
        keys, ids = np.unique((self.body if body else self.passage)[docs], return_inverse=True)
        key_id = np.full(len(self.corpus), -1, dtype=np.int64)
        key_id[docs] = ids.reshape(-1)
        return key_id, keys


def equals_query(corpus: Corpus, doc: int, query_key: str) -> bool:
    """True when the doc's passage ("title text") or its body alone has the query's ``text_key``."""
    body = corpus.texts[doc]
    return text_key(corpus.passage(doc)) == query_key or (bool(body.strip()) and text_key(body) == query_key)


def exclusion_reasons(
    table: CandidateTable, query_texts: Sequence[str], corpus: Corpus, excluded: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """(Q, N) uint8 why each flagged candidate is not a negative: a ``filters.Reason`` code (``POSITIVE``,
    ``QUERY_TEXT`` or ``JUDGED_RELEVANT``), 0 where the candidate is not flagged.

    ``mark_positives`` folds every exclusion into ``cand_is_positive`` (one flag that every filter honours); this
    recovers the cause for reports and audits. Only flagged cells that are not positives by row are hashed, so it is
    cheap on a cached table. Precedence: positive (or its text duplicate), then judged relevant, then query text.
    """
    from nvr.mining.filters import Reason

    flagged = np.asarray(table.cand_is_positive, dtype=bool) & table.valid
    cand, pos = np.asarray(table.cand_idx), np.asarray(table.pos_idx)
    out = np.where(flagged, np.uint8(Reason.POSITIVE), np.uint8(0)).astype(np.uint8)
    by_row = np.zeros(cand.shape, dtype=bool)
    for p in range(pos.shape[1]):
        by_row |= (cand == pos[:, p : p + 1]) & (pos[:, p : p + 1] >= 0)
    keys: dict[int, str] = {}

    def key_of(doc: int) -> str:
        if doc not in keys:
            keys[doc] = text_key(corpus.passage(doc))
        return keys[doc]

    for r, c in zip(*np.nonzero(flagged & ~by_row)):
        doc = int(cand[r, c])
        if key_of(doc) in {key_of(int(p)) for p in pos[r] if p >= 0}:
            continue
        if corpus.ids[doc] in set(excluded.get(table.query_ids[r], ())):
            out[r, c] = Reason.JUDGED_RELEVANT
        elif equals_query(corpus, doc, text_key(query_texts[r])):
            out[r, c] = Reason.QUERY_TEXT
    return out


def _with_rows(idx: np.ndarray | None, rows: int) -> np.ndarray:
    """``idx`` as an int64 (rows, M) array, M >= 1 (``-1`` pads); None gives one all-padding column."""
    if idx is None or np.size(idx) == 0:
        return np.full((rows, 1), -1, dtype=np.int64)
    return np.asarray(idx, dtype=np.int64)


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
