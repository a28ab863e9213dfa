"""The candidate table: one teacher's ranked candidates per query, the contract between search and filters.

Everything expensive (encoding, search, cross-encoder rescoring) happens once to build this table; every filter,
sampler and ensemble is then a cheap pure function over it, so a sweep of mining methods needs no re-encoding.
Rank is the column position (0 = most similar). Padding is ``-1`` in index arrays and ``nan`` in score arrays.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nvr.utils.atomic import atomic_dir, write_text_atomic
from nvr.utils.checksum import verify_folder, write_folder_checksums
from nvr.utils.distributed import dist_rank_world
from nvr.utils.locking import entry_lock_path, exclusive_lock

log = logging.getLogger(__name__)

_ARRAYS = ("cand_idx", "cand_scores", "cand_is_positive", "pos_idx", "pos_scores")
_FILES = (*(f"{n}.npy" for n in _ARRAYS), "ids.json", "meta.json")
FORMAT_VERSION = 1


class CorruptTableError(ValueError):
    """A saved table whose files do not match their recorded checksums (or cannot be read)."""


@dataclass(frozen=True)
class CandidateTable:
    """Ranked candidates of one teacher for Q queries over a corpus of D documents.

    Attributes:
        teacher: label of the teacher that scored the candidates (used for provenance).
        query_ids: (Q,) query ids, in the order of the rows.
        doc_ids: (D,) corpus doc ids; ``cand_idx``/``pos_idx`` index into this list. All tables of one mining run
            share the same ``doc_ids`` so that ensembles can compare documents by index.
        cand_idx: (Q, N) int64 doc indices, best first; ``-1`` pads rows with fewer than N candidates.
        cand_scores: (Q, N) float32 teacher scores; ``nan`` where ``cand_idx == -1``.
        cand_is_positive: (Q, N) bool; True if the candidate is a positive of that query by id, or a document whose
            normalized text equals a positive's (a duplicate of a positive never becomes a negative).
        pos_idx: (Q, P) int64 indices of the query's positives; ``-1`` pads.
        pos_scores: (Q, P) float32 teacher scores of those positives, computed explicitly (not looked up in the
            candidate list, which may not contain them); ``nan`` pads.
    """

    teacher: str
    query_ids: list[str]
    doc_ids: list[str]
    cand_idx: np.ndarray
    cand_scores: np.ndarray
    cand_is_positive: np.ndarray
    pos_idx: np.ndarray
    pos_scores: np.ndarray

    def __post_init__(self) -> None:
        q = len(self.query_ids)
        if self.cand_idx.shape[0] != q or self.pos_idx.shape[0] != q:
            raise ValueError(f"table rows do not match {q} query ids")
        if self.cand_scores.shape != self.cand_idx.shape or self.cand_is_positive.shape != self.cand_idx.shape:
            raise ValueError("cand_idx, cand_scores and cand_is_positive must share one (Q, N) shape")
        if self.pos_scores.shape != self.pos_idx.shape:
            raise ValueError("pos_idx and pos_scores must share one (Q, P) shape")

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    @property
    def depth(self) -> int:
        return int(self.cand_idx.shape[1])

    @property
    def valid(self) -> np.ndarray:
        """(Q, N) True where a real candidate sits (not padding)."""
        return self.cand_idx >= 0

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        """Write a folder of ``.npy`` arrays (memory-mappable) plus ids and metadata, atomically, with the checksum
        of every file in ``checksums.json`` (written inside the folder before it is renamed into place)."""
        with atomic_dir(path, overwrite=overwrite) as tmp:
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)), allow_pickle=False)
            ids = {"query_ids": list(self.query_ids), "doc_ids": list(self.doc_ids)}
            write_text_atomic(tmp / "ids.json", json.dumps(ids, ensure_ascii=False))
            meta = {"format_version": FORMAT_VERSION, "teacher": self.teacher, "depth": self.depth}
            write_text_atomic(tmp / "meta.json", json.dumps(meta, sort_keys=True))
            write_folder_checksums(tmp, _FILES)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False, verify: bool = True) -> CandidateTable:
        """Read a table written by :meth:`save`; ``mmap=True`` keeps the arrays on disk.

        ``verify`` (default) first checks every file against ``checksums.json`` and raises
        :class:`CorruptTableError` naming the first file that does not match (a table without checksums too).
        """
        path = Path(path)
        if verify:
            problem = verify_folder(path, _FILES)
            if problem is not None:
                raise CorruptTableError(problem)
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported candidate-table format {meta.get('format_version')}")
            ids = json.loads((path / "ids.json").read_text(encoding="utf-8"))
            arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r" if mmap else None) for n in _ARRAYS}
            return cls(teacher=meta["teacher"], query_ids=ids["query_ids"], doc_ids=ids["doc_ids"], **arrays)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptTableError(f"{path}: unreadable candidate table ({err})") from err

    def subset(self, rows: np.ndarray) -> CandidateTable:
        """The table restricted to the given row indices (e.g. one shard of queries)."""
        return CandidateTable(
            teacher=self.teacher,
            query_ids=[self.query_ids[i] for i in rows],
            doc_ids=self.doc_ids,
            cand_idx=self.cand_idx[rows],
            cand_scores=self.cand_scores[rows],
            cand_is_positive=self.cand_is_positive[rows],
            pos_idx=self.pos_idx[rows],
            pos_scores=self.pos_scores[rows],
        )


def load_cached_table(path: str | Path, warn: bool = True) -> CandidateTable | None:
    """A cached table when ``path`` holds one that verifies; None when absent, or (with a one-line warning naming
    the file, when ``warn``) when it is corrupted, truncated or unverifiable, so the caller recomputes it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return CandidateTable.load(path)
    except CorruptTableError as err:
        if warn:
            log.warning("cached candidate table %s; recomputing it", err)
        return None


def cached_or_built(path: Path, compute: Callable[[], CandidateTable], what: str) -> CandidateTable:
    """The verified table cached at ``path``, else ``compute()`` saved there (with its checksums).

    The writer (rank 0) holds the entry's exclusive lock while computing, waiting for it when another process
    holds it, then re-checks the cache: two processes never write one entry and the second reuses the first's
    result. Other torchrun ranks compute without the lock (they help encode but never write the table).
    """
    cached = _load_cached(path, what)
    if cached is not None:
        return cached
    if dist_rank_world()[0] != 0:
        return compute()
    with exclusive_lock(entry_lock_path(path), wait=True, what="candidate table cache entry"):
        cached = _load_cached(path, what, warn=False)  # another process may have built it while we waited
        if cached is not None:
            return cached
        table = compute()
        table.save(path, overwrite=True)
    return table


def _load_cached(path: Path, what: str, warn: bool = True) -> CandidateTable | None:
    """The verified cached table, or None (a corrupted one is reported with a warning naming the file)."""
    table = load_cached_table(path, warn=warn)
    if table is not None:
        log.info("%s: candidate table loaded from cache %s", what, path)
    return table


PARQUET_FORMAT = "nvr-candidates/1"
_LIST_COLUMNS = (("cand_idx", "int64"), ("cand_scores", "float32"), ("cand_is_positive", "bool"),
                 ("pos_idx", "int64"), ("pos_scores", "float32"))


def table_to_arrow(table: CandidateTable):
    """The table as a ``pyarrow.Table``: one row per query (``query_id`` + one fixed-size list column per array);
    the teacher, the widths and the format go into the schema metadata. Doc ids are not stored (every table of a
    run shares the corpus' list), so a chunk of a 700k-query run costs only its own rows."""
    import pyarrow as pa

    columns = {"query_id": pa.array(list(table.query_ids), type=pa.string())}
    for name, dtype in _LIST_COLUMNS:
        values = np.ascontiguousarray(getattr(table, name), dtype=dtype)
        width = values.shape[1]
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=dtype), width)
    meta = {"format": PARQUET_FORMAT, "teacher": table.teacher, "depth": str(table.depth),
            "positives": str(table.pos_idx.shape[1])}
    return pa.table(columns).replace_schema_metadata(meta)


def table_from_arrow(arrow, doc_ids: list[str]) -> CandidateTable:
    """Inverse of :func:`table_to_arrow` (``doc_ids``: the corpus ids the indices point into)."""
    meta = {k.decode(): v.decode() for k, v in (arrow.schema.metadata or {}).items()}
    if meta.get("format") != PARQUET_FORMAT:
        raise ValueError(f"not an nvr candidate table (format {meta.get('format')!r})")
    rows = arrow.num_rows
    widths = {"cand": int(meta["depth"]), "pos": int(meta["positives"])}
    arrays = {}
    for name, dtype in _LIST_COLUMNS:
        if name not in arrow.column_names:  # not read: width 0
            arrays[name] = np.zeros((rows, 0), dtype=dtype)
            continue
        column = arrow.column(name).combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False)
        arrays[name] = np.asarray(flat, dtype=dtype).reshape(rows, widths[name.split("_")[0]])
    return CandidateTable(teacher=meta["teacher"], query_ids=arrow.column("query_id").to_pylist(),
                          doc_ids=doc_ids, **arrays)


def write_table_parquet(table: CandidateTable, path: str | Path) -> None:
    """Write one table (e.g. one query chunk) as a parquet file, atomically, with its checksum sidecar."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nvr.utils.checksum import checksummed_file

    buffer = pa.BufferOutputStream()  # one chunk's bytes: pyarrow's writer needs a file object it can close
    pq.write_table(table_to_arrow(table), buffer, compression="zstd")
    with checksummed_file(path) as fh:
        fh.write(buffer.getvalue().to_pybytes())


def read_table_parquet(
    path: str | Path, doc_ids: list[str], columns: list[str] | None = None, verify: bool = True
) -> CandidateTable:
    """A table written by :func:`write_table_parquet`, checked against its sidecar first unless ``verify`` is False
    (a caller that verified the file earlier in the same run; :class:`CorruptTableError` naming the file when it
    does not match or cannot be read). ``columns``: read only those array columns (the others come back with width
    0; the cand_* columns go together), e.g. the positives' scores for calibration."""
    import pyarrow.parquet as pq

    from nvr.utils.checksum import verify_sidecar

    problem = verify_sidecar(path) if verify else None
    if problem is not None:
        raise CorruptTableError(f"{path}: {problem}")
    try:
        wanted = None if columns is None else ["query_id", *columns]
        arrow = pq.read_table(path, columns=wanted)
        return table_from_arrow(arrow, doc_ids)
    except (OSError, ValueError, KeyError) as err:
        raise CorruptTableError(f"{path}: unreadable candidate table ({err})") from err
