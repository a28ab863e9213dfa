"""Training pairs given as rows of (query, positive text(s) or ids) instead of BEIR qrels.

Rows (JSONL or parquet) look like ``{"query_id"?, "query", "positive": str}``, ``"positives": [str]`` or
``"positive_ids": [doc ids]`` (keys may be combined). Positive texts are matched to the corpus by ``text_key``
(against the full passage, then against the body text alone); texts not found are appended to a copy of the corpus
with ids ``pos:<sha1[:16]>``. Rows with the same query text are merged into one query.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvr.data.beir import Corpus, Queries, check_id
from nvr.data.jsonl import iter_jsonl
from nvr.data.text import passage_text, text_key
from nvr.utils.errors import InputError

_PARQUET_SUFFIXES = (".parquet", ".pq")
_POSITIVE_KEYS = ("positive", "positives", "positive_ids")


@dataclass
class _QueryEntry:
    qid: str
    text: str
    line: int
    doc_ids: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    """How the rows merged here named their query: each explicit ``query_id``, or (without one) the exact text."""

    def add(self, doc_id: str) -> None:
        if doc_id not in self.doc_ids:
            self.doc_ids.append(doc_id)


class _PairsBuilder:
    """Accumulates queries and positives, growing a copy of the corpus only when a new text must be added."""

    def __init__(self, corpus: Corpus | None, path: Path) -> None:
        self.path = path
        self.base = corpus if corpus is not None else Corpus([], [], [])
        self.corpus: Corpus | None = None if corpus is not None else self.base
        self.key_to_row = _text_key_index(self.base)
        self.by_text: dict[str, _QueryEntry] = {}
        self.by_id: dict[str, _QueryEntry] = {}

    def current_corpus(self) -> Corpus:
        return self.corpus if self.corpus is not None else self.base

    def add_row(self, row: dict[str, Any], line: int) -> None:
        query = row.get("query")
        if not isinstance(query, str) or not query.strip():
            raise InputError("'query' must be a non-empty string", self.path, line)
        entry = self._entry(query, row.get("query_id"), line)
        if not any(row.get(k) is not None for k in _POSITIVE_KEYS):
            raise InputError("row has no 'positive', 'positives' or 'positive_ids'", self.path, line)
        for text in self._positive_texts(row, line):
            entry.add(self._doc_for_text(text))
        for doc_id in self._positive_ids(row, line):
            entry.add(doc_id)

    def _entry(self, query: str, raw_id: Any, line: int) -> _QueryEntry:
        key = text_key(query)
        qid = self._query_id(raw_id, key, line)
        by_id = self.by_id.get(qid)
        if by_id is not None and text_key(by_id.text) != key:
            raise InputError(f"query_id {qid!r} was used for a different query text on line {by_id.line}",
                             self.path, line)
        entry = self.by_text.get(key)
        if entry is None:
            entry = by_id if by_id is not None else _QueryEntry(qid, query, line)
            self.by_text[key] = entry
        self.by_id.setdefault(qid, entry)
        entry.names.add(f"id:{raw_id}" if raw_id is not None else f"text:{query}")
        return entry

    def _query_id(self, raw_id: Any, key: str, line: int) -> str:
        if raw_id is None:
            return f"q:{key[:16]}"
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
            raise InputError(f"'query_id' must be a non-empty string or integer, got {raw_id!r}", self.path, line)
        check_id(str(raw_id), "'query_id'", self.path, line)
        return str(raw_id)

    def _positive_texts(self, row: dict[str, Any], line: int) -> list[str]:
        texts: list[str] = []
        single = row.get("positive")
        if single is not None:
            texts.append(single)
        many = row.get("positives")
        if many is not None:
            if not isinstance(many, list):
                raise InputError(f"'positives' must be a list of strings, got {type(many).__name__}", self.path, line)
            texts.extend(many)
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"a positive must be a non-empty string, got {text!r}", self.path, line)
        return texts

    def _positive_ids(self, row: dict[str, Any], line: int) -> list[str]:
        raw = row.get("positive_ids")
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise InputError(f"'positive_ids' must be a list, got {type(raw).__name__}", self.path, line)
        corpus = self.current_corpus()
        ids: list[str] = []
        for value in raw:
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise InputError(f"positive id must be a string or integer, got {value!r}", self.path, line)
            doc_id = str(value)
            check_id(doc_id, "positive id", self.path, line)
            if doc_id not in corpus.index:
                raise InputError(f"unknown positive id {doc_id!r} (not in the corpus)", self.path, line)
            ids.append(doc_id)
        return ids

    def _doc_for_text(self, text: str) -> str:
        key = text_key(text)
        row = self.key_to_row.get(key)
        if row is None:
            if self.corpus is None:
                self.corpus = self.base.copy()
            row = self.corpus.append(f"pos:{key[:16]}", "", text)
            self.key_to_row[key] = row
        return self.current_corpus().ids[row]


@dataclass
class Pairs:
    """What :func:`read_pairs` returns; ``merged_queries`` counts the distinct query ids (or, for rows without an
    id, distinct exact texts) that were merged with another one because their normalized texts are equal."""

    queries: Queries
    positives: dict[str, list[str]]
    corpus: Corpus
    merged_queries: int = 0


def load_pairs(path: str | Path, corpus: Corpus | None = None) -> tuple[Queries, dict[str, list[str]], Corpus]:
    """``(queries, {qid: [doc ids]}, corpus)`` of :func:`read_pairs`."""
    pairs = read_pairs(path, corpus)
    return pairs.queries, pairs.positives, pairs.corpus


def read_pairs(path: str | Path, corpus: Corpus | None = None) -> Pairs:
    """Read training pairs: queries, ``{qid: [doc ids]}``, the corpus and how many queries were merged.

    ``corpus`` is not modified: when positives must be added, the returned corpus is a copy that contains them
    (otherwise it is ``corpus`` itself). Without a corpus, one is built from the positive texts. Query ids come from
    ``query_id`` or, when absent, ``q:<sha1[:16]>`` of the normalized query. For parquet files, the "line" in error
    messages is the 1-based row number.
    """
    path = Path(path)
    builder = _PairsBuilder(corpus, path)
    count = 0
    for line, row in _iter_rows(path):
        builder.add_row(row, line)
        count += 1
    if count == 0:
        raise InputError("no training pairs", path)
    entries = list(builder.by_text.values())
    queries = Queries([e.qid for e in entries], [e.text for e in entries])
    positives = {e.qid: list(e.doc_ids) for e in entries}
    merged = sum(len(e.names) for e in entries if len(e.names) > 1)
    return Pairs(queries, positives, builder.current_corpus(), merged)


def _text_key_index(corpus: Corpus) -> dict[str, int]:
    """text_key -> first row, for full passages and (when they differ) body texts; passages take precedence."""
    index: dict[str, int] = {}
    for i, (title, text) in enumerate(zip(corpus.titles, corpus.texts)):
        index.setdefault(text_key(passage_text(title, text)), i)
    for i, (title, text) in enumerate(zip(corpus.titles, corpus.texts)):
        if title.strip() and text.strip():
            index.setdefault(text_key(text), i)
    return index


def _iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.name.endswith(_PARQUET_SUFFIXES):
        return _iter_parquet(path)
    return iter_jsonl(path)


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream parquet rows in record batches (row numbers are 1-based)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError("file not found", path)
    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError) for unreadable files
        raise InputError(f"cannot read parquet file ({exc})", path) from exc
    row_no = 0
    for batch in reader.iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row
