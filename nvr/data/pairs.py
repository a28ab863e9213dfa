"""Training pairs given as rows of (query, positive text(s) or ids, optional hard negatives) instead of BEIR qrels.

Rows come from any format of :mod:`nvr.data.tabular` (JSON Lines, CSV, TSV, parquet, a ``datasets`` folder); which
column is which field is decided by :mod:`nvr.data.columns` (explicit ``columns`` mapping > nvr's names
``query_id``/``query``/``positive``/``positives``/``positive_ids``/``negative``/``negatives`` > sentence-transformers
names such as ``anchor``/``positive``/``negative``/``negative_1``..). Positive texts are matched to the corpus by
``text_key`` (against the full passage, then against the body text alone); texts not found are appended to a copy of
the corpus with ids ``pos:<sha1[:16]>``. Given negatives are added to the corpus the same way (``neg:<sha1[:16]>``):
nvr mines its own negatives, so a given negative is a candidate the teachers rank and the positive-aware filter
checks like any other passage (a false negative in the data is filtered, not trained on). Rows with the same query
text are merged into one query.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvr.data.beir import Corpus, Queries, check_id
from nvr.data.columns import PAIR_ROLES, check_mapping, describe, resolve_columns, warn_ignored_labels
from nvr.data.tabular import Rows, open_rows
from nvr.data.text import passage_text, text_key
from nvr.utils.errors import InputError

log = logging.getLogger(__name__)

_STRICT_TYPES = {"positive": str, "positives": list, "positive_ids": list}
"""nvr's own JSON keys keep their documented types; any other column may hold one value or a list of values."""
COLUMNS_KEY = "data.columns"


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


@dataclass
class _Row:
    """One row reduced to nvr's fields (values checked)."""

    query: str
    query_id: Any
    positive_texts: list[str]
    positive_ids: list[str]
    negative_texts: list[str]


class _RowReader:
    """Turns a raw row into a ``_Row`` with the columns resolved for its file, naming the column in every error."""

    def __init__(self, rows: Rows, explicit: Mapping[str, tuple[str, ...]]) -> None:
        self.rows = rows
        self.path = rows.path
        self.cols = resolve_columns(PAIR_ROLES, rows.columns, explicit, path=rows.path, key=COLUMNS_KEY,
                                    fixed=rows.fixed, line=rows.first_line)
        if rows.fixed:
            warn_ignored_labels(self.cols, rows.columns, rows.path)
        log.info("%s: %s", rows.path, describe(self.cols, rows.columns))

    def read(self, row: dict[str, Any], line: int) -> _Row:
        query_cols = self.cols["query"]
        queries = self._cells(row, query_cols)
        if not queries or not isinstance(queries[0][1], str) or not queries[0][1].strip():
            raise InputError(f"{_either(query_cols)} must be a non-empty string", self.path, line)
        ids = self._cells(row, self.cols["query_id"])
        positives = self._texts(row, "positive", "a positive", line)
        positive_ids = self._ids(row, line)
        if not positives and not positive_ids:
            raise InputError(self._no_positive(row), self.path, line)
        return _Row(queries[0][1], ids[0][1] if ids else None, positives, positive_ids,
                    self._texts(row, "negative", "a negative", line))

    def _cells(self, row: dict[str, Any], cols: Sequence[str]) -> list[tuple[str, Any]]:
        """``(column, value)`` of the columns with a value; an empty CSV/TSV cell counts as no value."""
        return [(c, row[c]) for c in cols if row.get(c) is not None and (self.rows.typed or row[c] != "")]

    def _values(self, col: str, value: Any, line: int) -> list[Any]:
        expected = _STRICT_TYPES.get(col) if self.rows.typed else None
        if expected is list and not isinstance(value, list):
            what = "a list of strings" if col == "positives" else "a list"
            raise InputError(f"'{col}' must be {what}, got {type(value).__name__}", self.path, line)
        if isinstance(value, list) and expected is not str:
            return value
        return [value]

    def _texts(self, row: dict[str, Any], field_name: str, what: str, line: int) -> list[str]:
        texts: list[str] = []
        for col, value in self._cells(row, self.cols[field_name]):
            for text in self._values(col, value, line):
                if not isinstance(text, str) or not text.strip():
                    raise InputError(f"{what} must be a non-empty string, got {text!r} (column {col!r})",
                                     self.path, line)
                texts.append(text)
        return texts

    def _ids(self, row: dict[str, Any], line: int) -> list[str]:
        ids: list[str] = []
        for col, value in self._cells(row, self.cols["positive_ids"]):
            for raw in self._values(col, value, line):
                if isinstance(raw, bool) or not isinstance(raw, (str, int)):
                    raise InputError(f"positive id must be a string or integer, got {raw!r} (column {col!r})",
                                     self.path, line)
                if not str(raw):
                    raise InputError(f"empty positive id (column {col!r})", self.path, line)
                check_id(str(raw), "positive id", self.path, line)
                ids.append(str(raw))
        return ids

    def _no_positive(self, row: dict[str, Any]) -> str:
        cols = [*self.cols["positive"], *self.cols["positive_ids"]]
        msg = f"row has no positive: {_either(cols)} {'is' if len(cols) == 1 else 'are all'} missing or empty"
        if not self.rows.fixed:
            msg += f" (keys of this row: {', '.join(map(repr, row)) or 'none'}); map yours with {COLUMNS_KEY}.positive"
        return msg


class _PairsBuilder:
    """Accumulates queries and positives, growing a copy of the corpus only when a new text must be added."""

    def __init__(self, corpus: Corpus | None, path: Path) -> None:
        self.path = path
        self.base = corpus if corpus is not None else Corpus([], [], [])
        self.corpus: Corpus | None = None if corpus is not None else self.base
        self.key_to_row = _text_key_index(self.base)
        self.by_text: dict[str, _QueryEntry] = {}
        self.by_id: dict[str, _QueryEntry] = {}
        self.negatives = 0
        self.new_negatives = 0

    def current_corpus(self) -> Corpus:
        return self.corpus if self.corpus is not None else self.base

    def add_row(self, row: _Row, line: int) -> None:
        entry = self._entry(row.query, row.query_id, line)
        for text in row.positive_texts:
            entry.add(self._doc_for_text(text, "pos"))
        corpus = self.current_corpus()
        for doc_id in row.positive_ids:
            if doc_id not in corpus.index:
                raise InputError(f"unknown positive id {doc_id!r} (not in the corpus)", self.path, line)
            entry.add(doc_id)
        for text in row.negative_texts:
            size = len(self.current_corpus())
            self._doc_for_text(text, "neg")
            self.negatives += 1
            self.new_negatives += len(self.current_corpus()) - size

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

    def _doc_for_text(self, text: str, prefix: str) -> str:
        key = text_key(text)
        row = self.key_to_row.get(key)
        if row is None:
            if self.corpus is None:
                self.corpus = self.base.copy()
            row = self.corpus.append(f"{prefix}:{key[:16]}", "", text)
            self.key_to_row[key] = row
        return self.current_corpus().ids[row]


@dataclass
class Pairs:
    """What :func:`read_pairs` returns; ``merged_queries`` counts the distinct query ids (or, for rows without an
    id, distinct exact texts) that were merged with another one because their normalized texts are equal;
    ``given_negatives`` counts the negative texts read, ``new_negative_passages`` those added to the corpus."""

    queries: Queries
    positives: dict[str, list[str]]
    corpus: Corpus
    merged_queries: int = 0
    given_negatives: int = 0
    new_negative_passages: int = 0


def load_pairs(
    path: str | Path, corpus: Corpus | None = None, columns: Mapping[str, Any] | None = None
) -> tuple[Queries, dict[str, list[str]], Corpus]:
    """``(queries, {qid: [doc ids]}, corpus)`` of :func:`read_pairs`."""
    pairs = read_pairs(path, corpus, columns)
    return pairs.queries, pairs.positives, pairs.corpus


def read_pairs(path: str | Path, corpus: Corpus | None = None, columns: Mapping[str, Any] | None = None) -> Pairs:
    """Read training pairs: queries, ``{qid: [doc ids]}``, the corpus and how many queries were merged.

    ``columns`` maps nvr's fields (``query``, ``query_id``, ``positive``, ``positive_ids``, ``negative``) to the
    file's column names (a list of columns for ``positive``/``positive_ids``/``negative``); unmapped fields are
    detected. ``corpus`` is not modified: when passages must be added, the returned corpus is a copy that contains
    them (otherwise it is ``corpus`` itself). Without a corpus, one is built from the positive (and negative) texts.
    Query ids come from the query id column or, when absent, ``q:<sha1[:16]>`` of the normalized query.
    """
    explicit = check_mapping(columns, PAIR_ROLES, COLUMNS_KEY)
    count = 0
    with open_rows(path) as rows:
        reader = _RowReader(rows, explicit)
        builder = _PairsBuilder(corpus, rows.path)
        for line, raw in rows:
            builder.add_row(reader.read(raw, line), line)
            count += 1
    if count == 0:
        raise InputError("no training pairs", rows.path)
    entries = list(builder.by_text.values())
    queries = Queries([e.qid for e in entries], [e.text for e in entries])
    positives = {e.qid: list(e.doc_ids) for e in entries}
    merged = sum(len(e.names) for e in entries if len(e.names) > 1)
    if builder.negatives:
        log.info("%s: %d given negatives are mining candidates (%d new passages added to the corpus)", rows.path,
                 builder.negatives, builder.new_negatives)
    return Pairs(queries, positives, builder.current_corpus(), merged, builder.negatives, builder.new_negatives)


def _either(cols: Sequence[str]) -> str:
    names = [repr(c) for c in cols]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" or {names[-1]}"


def _text_key_index(corpus: Corpus) -> dict[str, int]:
    """text_key -> first row, for full passages and (when they differ) body texts; passages take precedence."""
    index: dict[str, int] = {}
    for i, (title, text) in enumerate(zip(corpus.titles, corpus.texts)):
        index.setdefault(text_key(passage_text(title, text)), i)
    for i, (title, text) in enumerate(zip(corpus.titles, corpus.texts)):
        if title.strip() and text.strip():
            index.setdefault(text_key(text), i)
    return index
