"""BEIR datasets (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), validated row by row.

Documents are kept as three parallel lists of strings plus an id -> row index dict: no per-document objects, so a
corpus of millions of passages stays compact. Every problem in the files raises ``InputError`` naming file and line.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nvr.data.jsonl import iter_jsonl
from nvr.data.text import passage_text, text_key
from nvr.utils.errors import ConfigError, InputError
from nvr.utils.hashing import sha256_texts

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]
"""query id -> {doc id: graded relevance}; doc order is the order of the qrels file."""

QRELS_HEADER = ("query-id", "corpus-id", "score")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
EmptyDocs = Literal["warn", "error"]
_DECIMAL_INT = re.compile(r"-?[0-9]+")
_ID_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f]")


class Corpus:
    """Documents as parallel lists ``ids`` / ``titles`` / ``texts`` with ``index`` mapping id -> row."""

    def __init__(
        self, ids: list[str], titles: list[str], texts: list[str], index: dict[str, int] | None = None
    ) -> None:
        if not len(ids) == len(titles) == len(texts):
            raise ValueError(f"ids, titles and texts differ in length: {len(ids)}, {len(titles)}, {len(texts)}")
        self.ids = ids
        self.titles = titles
        self.texts = texts
        self.index = index if index is not None else _unique_index(ids)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Corpus({len(self)} docs)"

    def passage(self, i: int) -> str:
        """The text a model encodes for row ``i`` (``"title text"``)."""
        return passage_text(self.titles[i], self.texts[i])

    def passages(self, indices: Iterable[int] | None = None) -> list[str]:
        """Passage texts for the given rows (all rows when ``indices`` is None); accepts numpy integer arrays."""
        if indices is None:
            return [passage_text(t, x) for t, x in zip(self.titles, self.texts)]
        return [self.passage(int(i)) for i in indices]

    @property
    def fingerprint(self) -> str:
        """sha256 over ids, titles and texts in order: a cache key for embeddings and candidate tables."""
        if self._fingerprint is None:
            self._fingerprint = sha256_texts(_interleave(self.ids, self.titles, self.texts))
        return self._fingerprint

    def append(self, doc_id: str, title: str, text: str) -> int:
        """Add one document and return its row; the id must be new."""
        if doc_id in self.index:
            raise ValueError(f"duplicate doc id {doc_id!r}")
        self.index[doc_id] = len(self.ids)
        self.ids.append(doc_id)
        self.titles.append(title)
        self.texts.append(text)
        self._fingerprint = None
        return len(self.ids) - 1

    def copy(self) -> Corpus:
        """A shallow copy (the strings are shared) that can be appended to without touching this corpus."""
        return Corpus(list(self.ids), list(self.titles), list(self.texts), dict(self.index))


class Queries:
    """Queries as parallel lists ``ids`` / ``texts`` with ``index`` mapping id -> row."""

    def __init__(self, ids: list[str], texts: list[str], index: dict[str, int] | None = None) -> None:
        if len(ids) != len(texts):
            raise ValueError(f"ids and texts differ in length: {len(ids)}, {len(texts)}")
        self.ids = ids
        self.texts = texts
        self.index = index if index is not None else _unique_index(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Queries({len(self)} queries)"

    def text(self, qid: str) -> str:
        return self.texts[self.index[qid]]

    def subset(self, qids: Iterable[str]) -> Queries:
        """The given queries, in the given order (unknown ids raise KeyError)."""
        qids = list(qids)
        return Queries(qids, [self.texts[self.index[q]] for q in qids])


@dataclass
class BeirDataset:
    name: str
    corpus: Corpus
    queries: Queries
    qrels: Qrels


class Positives(dict[str, list[str]]):
    """``dict[qid, list[doc_id]]`` returned by :func:`positives_from_qrels`, plus what was skipped.

    Attributes:
        skipped_ids: query ids present in the qrels whose judgements were all below ``min_relevance``.
    """

    def __init__(self, items: Iterable[tuple[str, list[str]]] = (), skipped_ids: Sequence[str] = ()) -> None:
        super().__init__(items)
        self.skipped_ids: list[str] = list(skipped_ids)

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)


@dataclass
class _RowIds:
    """Ids seen while loading one file, with their line numbers (to name both lines of a duplicate)."""

    path: Path
    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    lines: array = field(default_factory=lambda: array("q"))  # 8 bytes per row, not a list of int objects

    def add(self, doc_id: str, line: int) -> None:
        first = self.index.get(doc_id)
        if first is not None:
            raise InputError(f"duplicate _id {doc_id!r} (first seen on line {self.lines[first]})", self.path, line)
        self.index[doc_id] = len(self.ids)
        self.ids.append(doc_id)
        self.lines.append(line)


def load_corpus(path: str | Path, empty_docs: EmptyDocs = "warn") -> Corpus:
    """Read ``corpus.jsonl[.gz]`` rows ``{_id, title?, text}``.

    A document with an empty title AND an empty text raises InputError when ``empty_docs="error"``; with the default
    ``"warn"`` it is kept (so qrels that name it still load: the real Cranfield corpus has two such rows, one of them
    judged relevant) and reported in one warning with its line numbers.
    """
    if empty_docs not in ("warn", "error"):
        raise ConfigError("empty_docs", f"must be 'warn' or 'error', got {empty_docs!r}")
    path = Path(path)
    seen = _RowIds(path)
    titles: list[str] = []
    texts: list[str] = []
    empty_lines: list[int] = []
    for line, row in iter_jsonl(path):
        doc_id = _row_id(row, path, line)
        title = _optional_str(row, "title", path, line)
        text = _optional_str(row, "text", path, line)
        seen.add(doc_id, line)
        if not title.strip() and not text.strip():
            if empty_docs == "error":
                raise InputError(f"document {doc_id!r} has an empty title and an empty text", path, line)
            empty_lines.append(line)
        titles.append(title)
        texts.append(text)
    if not seen.ids:
        raise InputError("corpus has no documents", path)
    if empty_lines:
        log.warning("%s: %d documents have an empty title and text (lines %s)", path, len(empty_lines),
                    empty_lines[:10])
    return Corpus(seen.ids, titles, texts, seen.index)


def load_queries(path: str | Path) -> Queries:
    """Read ``queries.jsonl[.gz]`` rows ``{_id, text}`` (extra keys such as ``metadata`` are ignored)."""
    path = Path(path)
    seen = _RowIds(path)
    texts: list[str] = []
    for line, row in iter_jsonl(path):
        qid = _row_id(row, path, line)
        text = _optional_str(row, "text", path, line)
        if not text.strip():
            raise InputError(f"query {qid!r} has an empty text", path, line)
        seen.add(qid, line)
        texts.append(text)
    if not seen.ids:
        raise InputError("no queries", path)
    return Queries(seen.ids, texts, seen.index)


def load_qrels(path: str | Path, corpus: Corpus | None = None, queries: Queries | None = None) -> Qrels:
    """Read a BEIR qrels TSV (header ``query-id<TAB>corpus-id<TAB>score``, integer graded scores).

    When ``corpus`` / ``queries`` are given, every doc / query id must exist in them. A repeated (query, doc) pair
    with the same score is tolerated; with a different score it is an error naming both lines.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("qrels file not found", path)
    qrels: Qrels = {}
    first_line: dict[tuple[str, str], int] = {}
    with open(path, "rb") as fh:
        header_seen = False
        for line_no, raw in enumerate(fh, start=1):
            text = _decode_tsv_line(raw, path, line_no)
            if not text.strip():
                continue
            cols = text.split("\t")
            if not header_seen:
                _check_header(cols, path, line_no)
                header_seen = True
                continue
            qid, doc_id, score = _parse_qrels_row(cols, path, line_no)
            _check_known(qid, doc_id, corpus, queries, path, line_no)
            docs = qrels.setdefault(qid, {})
            if doc_id in docs:
                if docs[doc_id] != score:
                    raise InputError(
                        f"({qid!r}, {doc_id!r}) judged {score} here and {docs[doc_id]} on line "
                        f"{first_line[(qid, doc_id)]}", path, line_no,
                    )
                continue
            docs[doc_id] = score
            first_line[(qid, doc_id)] = line_no
    if not header_seen:
        raise InputError(f"empty qrels file; expected the header {_header_text()}", path, 1)
    return qrels


def beir_files(folder: str | Path, split: str = "test") -> tuple[Path, Path, Path]:
    """``(corpus, queries, qrels)`` paths of a BEIR folder, or the ``InputError`` that ``load_beir`` would raise.

    Cheap (no file is read), so commands can check every folder before an expensive step such as loading a model.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("BEIR folder not found", folder)
    corpus, queries = _find_jsonl(folder, "corpus"), _find_jsonl(folder, "queries")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise InputError(f"qrels for split {split!r} not found (available splits: {available or 'none'})", qrels_path)
    return corpus, queries, qrels_path


def load_beir(folder: str | Path, split: str = "test", empty_docs: EmptyDocs = "warn") -> BeirDataset:
    """Load ``folder/{corpus,queries}.jsonl[.gz]`` and ``folder/qrels/<split>.tsv``, cross-checking ids."""
    corpus_path, queries_path, qrels_path = beir_files(folder, split)
    corpus = load_corpus(corpus_path, empty_docs=empty_docs)
    queries = load_queries(queries_path)
    qrels = load_qrels(qrels_path, corpus=corpus, queries=queries)
    return BeirDataset(Path(folder).name, corpus, queries, qrels)


def positives_from_qrels(
    qrels: Qrels, queries: Queries | None = None, min_relevance: int = 1, corpus: Corpus | None = None
) -> Positives:
    """Query id -> doc ids judged ``>= min_relevance`` (doc order as in the qrels file).

    Queries come in ``queries`` order when given (qrels order otherwise). A query in the qrels with no doc reaching
    ``min_relevance`` is skipped, counted in ``result.skipped`` / ``result.skipped_ids`` and reported with one
    warning. When ``corpus`` is given, positives whose passage is empty are dropped too (an empty text teaches
    nothing), with a warning. The result is a ``dict`` subclass, usable wherever a plain dict is expected.
    """
    if queries is not None:
        unknown = [q for q in qrels if q not in queries.index]
        if unknown:
            raise ValueError(f"{len(unknown)} qrels query ids are not among the queries, e.g. {unknown[:3]}")
        order = [q for q in queries.ids if q in qrels]
    else:
        order = list(qrels)
    empty = _empty_doc_ids(corpus) if corpus is not None else set()
    kept: list[tuple[str, list[str]]] = []
    skipped: list[str] = []
    dropped_empty = 0
    for qid in order:
        docs = [d for d, rel in qrels[qid].items() if rel >= min_relevance]
        nonempty = [d for d in docs if d not in empty]
        dropped_empty += len(docs) - len(nonempty)
        if nonempty:
            kept.append((qid, nonempty))
        else:
            skipped.append(qid)
    if dropped_empty:
        log.warning("%d positives are documents with an empty passage and are dropped", dropped_empty)
    if skipped:
        log.warning(
            "%d of %d queries have no usable document with relevance >= %d and are skipped (e.g. %s)",
            len(skipped), len(order), min_relevance, skipped[:5],
        )
    return Positives(kept, skipped)


def same_text_queries(queries: Queries, qids: Iterable[str]) -> dict[str, list[str]]:
    """qid -> every qid among ``qids`` whose query text is the same after ``normalize_text`` (itself included,
    ``qids`` order); only queries that share their text with another one are listed.

    Two ids asking the same question are one information need: the positives of one must not become the other's
    negatives (the pairs loader and sentence-transformers merge such rows by text).
    """
    groups: dict[str, list[str]] = {}
    for qid in qids:
        groups.setdefault(text_key(queries.text(qid)), []).append(qid)
    return {q: group for group in groups.values() if len(group) > 1 for q in group}


def union_over(group: Sequence[str], lists: Mapping[str, Sequence[str]]) -> list[str]:
    """Union of ``lists[q]`` for q in ``group`` (first-seen order; queries without a list contribute nothing)."""
    return list(dict.fromkeys(d for q in group for d in lists.get(q, ())))


def judged_relevant(qrels: Qrels) -> dict[str, list[str]]:
    """qid -> docs judged with a grade > 0 (qrels order): whatever ``min_relevance`` is, never a negative."""
    return {q: [d for d, rel in docs.items() if rel > 0] for q, docs in qrels.items()}


def _empty_doc_ids(corpus: Corpus) -> set[str]:
    return {corpus.ids[i] for i, (t, x) in enumerate(zip(corpus.titles, corpus.texts)) if not (t.strip() or x.strip())}


def _unique_index(ids: Sequence[str]) -> dict[str, int]:
    index = {doc_id: i for i, doc_id in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError("ids are not unique")
    return index


def _interleave(*columns: Sequence[str]) -> Iterable[str]:
    for row in zip(*columns):
        yield from row


def _row_id(row: dict[str, Any], path: Path, line: int, key: str = "_id") -> str:
    """The id in column ``key`` as a non-empty string; integers are accepted and converted (BEIR ids are often
    numbers)."""
    if key not in row:
        raise InputError(f"missing '{key}'", path, line)
    raw = row[key]
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise InputError(f"'{key}' must be a string or an integer, got {type(raw).__name__}", path, line)
    doc_id = str(raw)
    if not doc_id.strip():
        raise InputError(f"'{key}' is empty", path, line)
    check_id(doc_id, f"'{key}'", path, line)
    return doc_id


def row_id(row: dict[str, Any], path: Path, line: int, key: str = "_id") -> str:
    """Public form of the id check every loader shares (see ``_row_id``)."""
    return _row_id(row, path, line, key)


def optional_str(row: dict[str, Any], key: str, path: Path, line: int) -> str:
    """``row[key]`` as a string, ``""`` when absent or null; any other type is an ``InputError``."""
    return _optional_str(row, key, path, line)


def find_jsonl(folder: str | Path, stem: str) -> Path:
    """``folder/<stem>.jsonl`` or ``.jsonl.gz``, else the ``InputError`` naming the expected path."""
    return _find_jsonl(Path(folder), stem)


def check_id(value: str, what: str, path: Path, line: int) -> None:
    """Ids are compared exactly as written: one with surrounding whitespace, or a tab / line break / control
    character (which no TSV qrels line can carry), would silently match another id or none, so it is an error."""
    if value != value.strip():
        raise InputError(f"{what} {value!r} has leading or trailing whitespace (ids are compared exactly)", path, line)
    if _ID_BAD_CHAR.search(value):
        raise InputError(f"{what} {value!r} contains a tab, line break or control character", path, line)


def _optional_str(row: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"'{key}' must be a string, got {type(value).__name__}", path, line)
    return value


def _find_jsonl(folder: Path, stem: str) -> Path:
    for suffix in _JSONL_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(f"{stem} file not found (also looked for {stem}.jsonl.gz)", folder / f"{stem}.jsonl")


def _decode_tsv_line(raw: bytes, path: Path, line_no: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", path, line_no) from exc
    if line_no == 1:
        text = text.removeprefix("\ufeff")
    return text.rstrip("\r\n")


def _header_text() -> str:
    return "'" + "\\t".join(QRELS_HEADER) + "'"


def _check_header(cols: list[str], path: Path, line_no: int) -> None:
    """Accept ``query-id corpus-id score`` (case and ``_`` vs ``-`` ignored); a data row here means no header."""
    names = tuple(c.strip().lower().replace("_", "-") for c in cols)
    if names == QRELS_HEADER:
        return
    if len(cols) == 3 and _is_int(cols[2]):
        raise InputError(f"missing header: expected {_header_text()} before the first row", path, line_no)
    raise InputError(f"bad header {cols!r}: expected {_header_text()} (tab-separated)", path, line_no)


def _parse_qrels_row(cols: list[str], path: Path, line_no: int) -> tuple[str, str, int]:
    if len(cols) != 3:
        raise InputError(f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}", path,
                         line_no)
    qid, doc_id, score = cols
    if not qid.strip() or not doc_id.strip():
        raise InputError("empty query-id or corpus-id", path, line_no)
    check_id(qid, "query-id", path, line_no)
    check_id(doc_id, "corpus-id", path, line_no)
    if not _is_int(score):
        raise InputError(f"score must be an integer, got {score!r} (ASCII digits, optional leading '-')", path,
                         line_no)
    return qid, doc_id, int(score)


def _is_int(text: str) -> bool:
    """Plain ASCII decimal integers only: Python's ``int()`` also takes ``' 1'``, ``'+1'``, ``'1_0'`` and ``'١'``."""
    return _DECIMAL_INT.fullmatch(text) is not None


def _check_known(
    qid: str, doc_id: str, corpus: Corpus | None, queries: Queries | None, path: Path, line_no: int
) -> None:
    if queries is not None and qid not in queries.index:
        raise InputError(f"unknown query id {qid!r} (not in the queries file{_near_miss(qid, queries.index)})",
                         path, line_no)
    if corpus is not None and doc_id not in corpus.index:
        raise InputError(f"unknown corpus id {doc_id!r} (not in the corpus file{_near_miss(doc_id, corpus.index)})",
                         path, line_no)


def _near_miss(value: str, index: Mapping[str, int]) -> str:
    """``"; it has 'd1': ids are compared exactly"`` when ``value`` matches a known id once invisible characters
    (zero-width spaces, BOMs, other Unicode format characters) and whitespace are removed; else ``""``."""
    cleaned = "".join(ch for ch in value if unicodedata.category(ch) != "Cf").strip()
    if cleaned != value and cleaned in index:
        return f"; it has {cleaned!r}: ids are compared exactly, and this one has invisible characters"
    return ""
