"""A corpus from any file: a BEIR ``corpus.jsonl``, a plain text file (``.txt``, one passage per line), or
JSONL / CSV / TSV / parquet / a ``datasets`` folder with a text column (and optional id and title columns).

Ids come from the id column (``_id``, or ``id``/``doc_id``/``pid``/... when unambiguous, or ``corpus_columns.id``);
a file without one names each passage by its content: ``doc:`` + the first 16 hex digits of the sha1 of the passage
text (``"title text"``, UTF-8). Such ids survive added, removed and reordered lines, and a passage gets the same id
from a ``.txt`` file and from a CSV text column; exact repeats of a passage are one document (counted in a
warning). Rows with ids keep BEIR's rules (unique ids, an empty document is kept with a warning); a row without an
id must have a text.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from nvr.data.beir import Corpus, EmptyDocs, optional_str, row_id
from nvr.data.columns import CORPUS_ROLES, check_mapping, describe, resolve_columns
from nvr.data.tabular import Rows, decoded_lines, open_rows
from nvr.data.text import passage_text
from nvr.utils.errors import ConfigError, InputError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz")
CORPUS_COLUMNS_KEY = "data.corpus_columns"


def content_id(passage: str) -> str:
    """The id of a passage that has none: ``doc:<sha1(passage)[:16]>`` (exact text, so case and spacing count)."""
    return "doc:" + hashlib.sha1(passage.encode("utf-8")).hexdigest()[:16]


def is_text_file(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(TEXT_SUFFIXES)


def load_corpus_file(
    path: str | Path, columns: Mapping[str, Any] | None = None, empty_docs: EmptyDocs = "warn"
) -> Corpus:
    """Load a corpus from any supported file (see the module doc); ``columns`` maps ``id``/``title``/``text`` to
    the file's column names. A BEIR ``corpus.jsonl`` gives exactly what ``beir.load_corpus`` gives."""
    if empty_docs not in ("warn", "error"):
        raise ConfigError("empty_docs", f"must be 'warn' or 'error', got {empty_docs!r}")
    path = Path(path)
    explicit = check_mapping(columns, CORPUS_ROLES, CORPUS_COLUMNS_KEY)
    builder = _CorpusBuilder(path)
    if is_text_file(path):
        if explicit:
            raise ConfigError(CORPUS_COLUMNS_KEY, f"{path} is a .txt corpus (one passage per line): it has no columns")
        for line, text in _text_lines(path):
            builder.add_passage("", text, line)
        return builder.finish(empty_docs)
    with open_rows(path) as rows:
        fields = _Fields(rows, explicit)
        for line, row in rows:
            title, text = fields.title_text(row, line)
            if fields.id_col is None:
                fields.refuse_stray_id(row, line)
                builder.add_passage(title, text, line)
            else:
                builder.add_doc(row_id(row, path, line, fields.id_col), title, text, line)
    return builder.finish(empty_docs)


class _Fields:
    """The id / title / text columns of one corpus file."""

    def __init__(self, rows: Rows, explicit: Mapping[str, tuple[str, ...]]) -> None:
        self.path = rows.path
        cols = resolve_columns(CORPUS_ROLES, rows.columns, explicit, path=rows.path, key=CORPUS_COLUMNS_KEY,
                               fixed=rows.fixed, line=rows.first_line)
        self.title_cols, self.text_cols = cols["title"], cols["text"]
        # JSON Lines: the first row decides whether the file has ids (every row must then have one, or none may)
        ids = cols["id"] if rows.fixed or "id" in explicit else tuple(c for c in cols["id"] if c in rows.columns)
        self.id_col: str | None = ids[0] if ids else None
        self.first_line = rows.first_line or 1
        log.info("%s: %s", rows.path, describe(cols, rows.columns) if rows.columns else "empty")

    def title_text(self, row: dict[str, Any], line: int) -> tuple[str, str]:
        return self._first(row, self.title_cols, line), self._first(row, self.text_cols, line)

    def _first(self, row: dict[str, Any], cols: Sequence[str], line: int) -> str:
        for col in cols:
            if row.get(col) is not None:
                return optional_str(row, col, self.path, line)
        return ""

    def refuse_stray_id(self, row: dict[str, Any], line: int) -> None:
        if row.get("_id") is not None:
            raise InputError(f"row has an '_id' but line {self.first_line} has none: give every row an '_id' "
                             "or none (ids are then derived from the passage text)", self.path, line)


class _CorpusBuilder:
    """Collects documents; ids either given (unique, BEIR rules) or derived from content (repeats merged)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: list[str] = []
        self.titles: list[str] = []
        self.texts: list[str] = []
        self.index: dict[str, int] = {}
        self.lines: list[int] = []
        self.empty_lines: list[int] = []
        self.empty_ids: list[str] = []
        self.repeats: list[tuple[int, int]] = []

    def add_doc(self, doc_id: str, title: str, text: str, line: int) -> None:
        first = self.index.get(doc_id)
        if first is not None:
            raise InputError(f"duplicate id {doc_id!r} (first seen on line {self.lines[first]})", self.path, line)
        if not title.strip() and not text.strip():
            self.empty_lines.append(line)
            self.empty_ids.append(doc_id)
        self._append(doc_id, title, text, line)

    def add_passage(self, title: str, text: str, line: int) -> None:
        passage = passage_text(title, text)
        if not passage:
            raise InputError("empty passage (a corpus row without an id needs a text)", self.path, line)
        doc_id = content_id(passage)
        first = self.index.get(doc_id)
        if first is not None:
            self.repeats.append((line, self.lines[first]))
            return
        self._append(doc_id, title, text, line)

    def _append(self, doc_id: str, title: str, text: str, line: int) -> None:
        self.index[doc_id] = len(self.ids)
        self.ids.append(doc_id)
        self.titles.append(title)
        self.texts.append(text)
        self.lines.append(line)

    def finish(self, empty_docs: EmptyDocs) -> Corpus:
        if not self.ids:
            raise InputError("corpus has no documents", self.path)
        if self.empty_lines:
            if empty_docs == "error":
                raise InputError(f"document {self.empty_ids[0]!r} has an empty title and an empty text", self.path,
                                 self.empty_lines[0])
            log.warning("%s: %d documents have an empty title and text (lines %s)", self.path, len(self.empty_lines),
                        self.empty_lines[:10])
        if self.repeats:
            line, first = self.repeats[0]
            log.warning("%s: %d rows repeat an earlier passage and are merged into it (e.g. line %d = line %d)",
                        self.path, len(self.repeats), line, first)
        return Corpus(self.ids, self.titles, self.texts, self.index)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of each non-blank line of a UTF-8 text file (``.gz`` too); blank lines are skipped."""
    if not path.is_file():
        raise InputError("file not found", path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        for line_no, text in enumerate(decoded_lines(fh, path), start=1):
            text = text.rstrip("\r\n")
            if text.strip():
                yield line_no, text
