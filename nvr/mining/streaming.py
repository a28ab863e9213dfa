"""Streaming mining (``stream_chunk_queries``): host RAM bounded by one query chunk, resumable after ``kill -9``.

The in-memory path (``pipeline.run_mining``) holds every teacher's whole ``(Q, depth)`` candidate table. Here the
queries are cut into chunks of ``stream_chunk_queries`` rows (file order) and the work is done in passes over them,
each chunk's result saved atomically with a checksum in a work folder ``cache_dir/stream/<fingerprint>/`` (the
mined set's content address, so only the same job resumes there):

1. **tables**: per chunk, each teacher's candidate table of the chunk's rows (``tables-<chunk>-<teacher>.parquet``).
   Dense teachers encode all queries (and the corpus) once through the embedding cache, memory-mapped, and every
   chunk searches with its rows of those embeddings, so its scores are the in-memory run's bit for bit.
2. **calibration** (``filter.calibrate`` only): the parameter is chosen on every query's positive scores, read back
   from the chunk tables (``(Q, P)``, small), exactly as on the whole table.
3. **widening plan**: the rows whose selection is starved (``max_depth``), over all chunks (``widen.npy``): the
   deep tables reserve room for the most positives of *those* rows, as the in-memory deep table does.
4. **chunks**: per chunk filter, select, widen its starved rows, and save its ``mined.jsonl`` lines
   (``mined-<chunk>.jsonl``) and report parts (``part-<chunk>.npz``: counts and per-query values,
   ``report.report_parts``).

A re-run reuses every file that verifies (a corrupted one is recomputed with a warning) and logs how many. The
output folder (atomic, as in memory) gets ``mined.jsonl`` concatenated chunk by chunk, ``manifest.json`` (byte-
identical to the in-memory run's), ``report.json`` (the same numbers, from the combined parts, plus a ``stream``
section), ``report.png`` and ``candidates/<teacher>.parquet`` (the shallow candidate table, one row group per
chunk). The work folder is removed once the output is in place. The candidate-table cache (``cache_dir/tables``)
is not used: the work folder holds the chunk tables instead.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvr.config.mining import MineConfig
from nvr.mining.calibrate import effective_filters, resolve_filters
from nvr.mining.mined_set import MANIFEST_FILE, MINED_FILE
from nvr.mining.pipeline import (
    MiningData,
    MiningResult,
    apply_filters,
    build_tables,
    check_feasible,
    check_selection_config,
    covers_corpus,
    data_counts,
    excluded_candidate_counts,
    kept_rows,
    load_data,
    make_teacher,
    manifest_from,
    mined_lines,
    mining_fingerprint,
    mining_inputs,
    negatives_written,
    raise_all_dropped,
    report_extra,
    select_negatives,
    selection_counts,
    teacher_records,
    write_json,
    write_mined,
)
from nvr.mining.report import (
    combine_parts,
    filter_settings_of,
    report_from_parts,
    report_parts,
    save_figure,
    score_figure,
)
from nvr.search.table import CandidateTable, CorruptTableError, read_table_parquet, write_table_parquet
from nvr.utils.atomic import atomic_dir, atomic_file
from nvr.utils.checksum import checksummed_file, verify_sidecar
from nvr.utils.distributed import dist_rank_world
from nvr.utils.errors import ConfigError
from nvr.utils.locking import exclusive_lock

log = logging.getLogger(__name__)

STREAM_FORMAT = "nvr-stream/1"
_SELECTION_COUNTS = "count.selection."
_EXCLUDED_COUNTS = "count.excluded."
_NEGATIVES = "count.negatives_written.sum"


@dataclass
class StreamRun:
    """One streaming job: its config, data, teachers, chunks (global row indices) and work folder."""

    cfg: MineConfig
    data: MiningData
    teachers: list[Any]
    chunks: list[np.ndarray]
    work: Path
    stats: dict[str, int]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def table_path(self, chunk: int, teacher: int) -> Path:
        return self.work / f"tables-{chunk:06d}-{teacher}.parquet"

    def load_tables(self, chunk: int, columns: list[str] | None = None) -> list[CandidateTable]:
        ids = self.data.corpus.ids
        return [read_table_parquet(self.table_path(chunk, t), ids, columns) for t in range(len(self.teachers))]


def mine_streaming(cfg: MineConfig, out: Path, started: float) -> int:
    """Mine ``cfg`` chunk by chunk into the output folder ``out`` (see the module doc); returns the rows written."""
    if dist_rank_world()[1] > 1:
        raise ConfigError("stream_chunk_queries", "not supported under torchrun (one process writes and resumes "
                                                  "the chunks); unset it or run a single process")
    check_selection_config(cfg)
    data = load_data(cfg.data)
    check_feasible(cfg, data)
    teachers = [make_teacher(t, cfg.cache_dir, cfg.seed) for t in cfg.teachers]
    records = teacher_records(teachers, cfg.teachers)
    fingerprint = mining_fingerprint(cfg, mining_inputs(cfg, records))
    size = int(cfg.stream_chunk_queries or 0)
    num_queries = len(data.queries)
    chunks = [np.arange(s, min(s + size, num_queries), dtype=np.int64) for s in range(0, num_queries, size)]
    work = Path(cfg.cache_dir) / "stream" / fingerprint
    with exclusive_lock(work, what="streaming work folder"):
        _open_work(work, {"format": STREAM_FORMAT, "fingerprint": fingerprint, "chunk_queries": size,
                          "num_queries": num_queries, "teachers": [t.name for t in teachers]})
        run = StreamRun(cfg, data, teachers, chunks, work, {"chunks": len(chunks), "tables_reused": 0,
                                                             "chunks_reused": 0})
        written = _run(run, records, out, started)
        shutil.rmtree(work, ignore_errors=True)  # the output holds the result (and the candidate tables)
    return written


def _run(run: StreamRun, records: list[dict[str, str]], out: Path, started: float) -> int:
    cfg, data = run.cfg, run.data
    slots = _most_positives(data, range(len(data.queries)))
    views = QueryRows(run.teachers, data, list(data.queries.ids))
    for i in range(len(run.chunks)):
        _ensure_tables(run, views, i, slots)
    resolved = _resolve_filters(run)
    widen = _widen_plan(run, resolved)
    deep = QueryRows(run.teachers, data, [data.queries.ids[r] for r in widen]) if widen.size else None
    deep_slots = _most_positives(data, widen)
    for i in range(len(run.chunks)):
        _ensure_chunk(run, resolved, widen, deep, deep_slots, i)
    log.info("streaming: %d chunks; reused %d finished chunks and %d chunk tables from %s", len(run.chunks),
             run.stats["chunks_reused"], run.stats["tables_reused"], run.work)
    parts = combine_parts([_load_part(run, i) for i in range(len(run.chunks))])
    counts = _counts(parts, data)
    if counts["written"] == 0:
        raise_all_dropped(cfg, len(data.queries))
    filters = filter_settings_of(run.names, resolved)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        mined = write_mined(tmp / MINED_FILE, _chunk_lines(run))
        write_json(tmp / MANIFEST_FILE, manifest_from(cfg, records, data, counts, filters, mined))
        pos, neg = parts["selection.positive.cat"], parts["selection.negative.cat"]
        save_figure(tmp / "report.png", score_figure(pos, neg, run.names, [c for c, _ in resolved]))
        candidates = _write_candidates(run, tmp / "candidates")
        extra = report_extra(cfg, counts, int(parts[_NEGATIVES]), started)
        report = report_from_parts(parts, run.names, filters, extra)
        report["stream"] = {**run.stats, "chunk_queries": cfg.stream_chunk_queries, "candidates": candidates}
        with atomic_file(tmp / "report.json") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    return counts["written"]


def _open_work(work: Path, layout: dict[str, Any]) -> None:
    """Create the work folder, or check that the one there was started with this layout (chunk size, queries,
    teachers); a folder with another layout is cleared with a warning (its chunks cut the queries differently)."""
    path = work / "layout.json"
    if path.is_file():
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == layout
        except (OSError, ValueError):
            same = False
        if same:
            return
        log.warning("streaming work folder %s was started with another chunk layout; starting over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        json.dump(layout, fh, sort_keys=True)


def _most_positives(data: MiningData, rows: Sequence[int] | np.ndarray) -> int:
    """Most distinct positives of any of ``rows`` (the width ``build_candidate_table`` reserves for them)."""
    ids = data.queries.ids
    return max((len(dict.fromkeys(data.positives[ids[int(r)]])) for r in rows), default=0)


class QueryRows:
    """Teachers whose query embeddings come from one encoding of a fixed query list.

    A dense teacher encodes ``query_ids``' texts once (the same cache entry the in-memory run uses for the same
    list: all queries for the shallow tables, the widened ones for the deep tables) and the corpus, before any
    chunk; ``for_rows`` gives a copy of the teacher whose ``encode_queries`` returns those rows of the memmap, so a
    chunk's search sees exactly the vectors of the whole-list encoding (a re-encoding in other batches could move
    scores in the last bits). Other teachers (BM25, random) score each query on its own and are used as they are.
    """

    def __init__(self, teachers: Sequence[Any], data: MiningData, query_ids: Sequence[str]) -> None:
        self.teachers = list(teachers)
        self.position = {q: i for i, q in enumerate(query_ids)}
        self.embeddings: list[Any] = []
        texts = [data.queries.text(q) for q in query_ids]
        for teacher in self.teachers:
            if hasattr(teacher, "encode_queries") and hasattr(teacher, "encode_passages"):
                self.embeddings.append(teacher.encode_queries(texts))
                teacher.encode_passages(data.corpus.passages())  # loaded here once; the copies share the model
            else:
                self.embeddings.append(None)

    def for_rows(self, query_ids: Sequence[str]) -> list[Any]:
        positions = np.fromiter((self.position[q] for q in query_ids), dtype=np.int64, count=len(query_ids))
        return [teacher if emb is None else _with_query_rows(teacher, emb, positions)
                for teacher, emb in zip(self.teachers, self.embeddings)]


def _with_query_rows(teacher: Any, embeddings: Any, positions: np.ndarray) -> Any:
    from nvr.teachers.cache import Bfloat16Rows

    rows = Bfloat16Rows(embeddings.bits[positions]) if isinstance(embeddings, Bfloat16Rows) else \
        np.asarray(embeddings[positions])

    def encode_queries(texts: Sequence[str]) -> Any:
        if len(texts) != len(positions):
            raise ValueError(f"teacher {teacher.name!r}: {len(texts)} query texts for {len(positions)} rows")
        return rows

    view = copy.copy(teacher)
    view.encode_queries = encode_queries
    return view


def _ensure_tables(run: StreamRun, views: QueryRows, chunk: int, slots: int) -> None:
    """Pass 1 for one chunk: its candidate tables, reused when every teacher's file verifies."""
    try:
        run.load_tables(chunk, columns=[])
        run.stats["tables_reused"] += 1
        return
    except CorruptTableError as err:
        if any(run.table_path(chunk, t).exists() for t in range(len(run.teachers))):
            log.warning("streaming chunk %d: %s; recomputing it", chunk, err)
    rows = run.chunks[chunk]
    teachers = views.for_rows([run.data.queries.ids[r] for r in rows])
    tables = build_tables(run.cfg, teachers, run.data, run.cfg.depth, rows, cache=False, positive_slots=slots)
    for t, table in enumerate(tables):
        write_table_parquet(table, run.table_path(chunk, t))
    chunk_saved("tables", chunk)


def _resolve_filters(run: StreamRun) -> list[tuple[Any, dict[str, Any]]]:
    """Per teacher, the filter to apply and its calibration record (chosen on every query's positive scores)."""
    filters = effective_filters(run.cfg, run.names)
    if all(f.calibrate is None for f, _ in filters):
        return [(f, {}) for f, _ in filters]
    per_chunk = [run.load_tables(i, columns=["pos_idx", "pos_scores"]) for i in range(len(run.chunks))]
    positives = [_stack_positives([tables[t] for tables in per_chunk]) for t in range(len(run.teachers))]
    return resolve_filters(run.cfg, positives, run.data.queries.ids)


def _stack_positives(tables: Sequence[CandidateTable]) -> CandidateTable:
    """One teacher's positives-only table of all rows from its chunk tables (``-1`` / ``nan`` pads)."""
    width = max(t.pos_idx.shape[1] for t in tables)

    def pad(a: np.ndarray, fill: float) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)

    pos_idx = np.concatenate([pad(t.pos_idx, -1) for t in tables])
    q = pos_idx.shape[0]
    return CandidateTable(teacher=tables[0].teacher, query_ids=[x for t in tables for x in t.query_ids],
                          doc_ids=tables[0].doc_ids, cand_idx=np.zeros((q, 0), np.int64),
                          cand_scores=np.zeros((q, 0), np.float32), cand_is_positive=np.zeros((q, 0), bool),
                          pos_idx=pos_idx, pos_scores=np.concatenate([pad(t.pos_scores, np.nan) for t in tables]))


def _chunk_selection(run: StreamRun, resolved: Sequence[tuple[Any, dict[str, Any]]], chunk: int):
    tables = run.load_tables(chunk)
    results = apply_filters(tables, resolved, run.data)
    selection, per_teacher = select_negatives(run.cfg, tables, results)
    return tables, results, selection, per_teacher


def _can_widen(run: StreamRun, tables: Sequence[CandidateTable]) -> bool:
    return run.cfg.max_depth > run.cfg.depth and not covers_corpus(tables, len(run.data.corpus))


def _widen_plan(run: StreamRun, resolved: Sequence[tuple[Any, dict[str, Any]]]) -> np.ndarray:
    """Pass 3: global rows to re-build at ``max_depth`` (saved as ``widen.npy``; reused when it verifies)."""
    path = run.work / "widen.npy"
    if path.exists():
        problem = verify_sidecar(path)
        if problem is None:
            return np.load(path)
        log.warning("streaming widening plan %s: %s; recomputing it", path, problem)
    rows: list[np.ndarray] = []
    for i, chunk_rows in enumerate(run.chunks):
        tables, _, selection, _ = _chunk_selection(run, resolved, i)
        if not _can_widen(run, tables):
            rows = []
            break
        rows.append(chunk_rows[np.flatnonzero(selection.starved)])
    plan = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    buffer = io.BytesIO()
    np.save(buffer, plan.astype(np.int64), allow_pickle=False)
    with checksummed_file(path) as fh:
        fh.write(buffer.getvalue())
    return plan


def _chunk_files(run: StreamRun, chunk: int) -> tuple[Path, Path]:
    return run.work / f"part-{chunk:06d}.npz", run.work / f"mined-{chunk:06d}.jsonl"


def _ensure_chunk(
    run: StreamRun, resolved: Sequence[tuple[Any, dict[str, Any]]], widen: np.ndarray, deep: QueryRows | None,
    deep_slots: int, chunk: int,
) -> None:
    """Pass 4 for one chunk: filter, select, widen, and save its mined lines and report parts."""
    part, mined = _chunk_files(run, chunk)
    problems = [f"{path}: {problem}" for path in (part, mined) if (problem := verify_sidecar(path)) is not None]
    if not problems:
        run.stats["chunks_reused"] += 1
        return
    if part.exists() or mined.exists():
        log.warning("streaming chunk %d: %s; recomputing it", chunk, problems[0])
    cfg, data = run.cfg, run.data
    tables, results, selection, per_teacher = _chunk_selection(run, resolved, chunk)
    rows = run.chunks[chunk]
    short = np.flatnonzero(selection.starved)
    was_short = selection.short.copy()
    deep_tables: list[CandidateTable] = []
    deep_results: list[Any] = []
    if short.size and _can_widen(run, tables):
        if deep is None or not np.isin(rows[short], widen).all():
            raise RuntimeError(f"streaming chunk {chunk}: starved rows differ from the widening plan")
        ids = [data.queries.ids[r] for r in rows[short]]
        deep_tables = build_tables(cfg, deep.for_rows(ids), data, cfg.max_depth, rows[short], cache=False,
                                   positive_slots=deep_slots)
        deep_results = apply_filters(deep_tables, resolved, data)
        deep_sel, deep_per = select_negatives(cfg, deep_tables, deep_results)
        selection = selection.replace_rows(short, deep_sel)
        per_teacher = [p.replace_rows(short, d) for p, d in zip(per_teacher, deep_per)]
    kept = kept_rows(cfg, selection)
    counts = selection_counts(selection, was_short, kept)
    excluded = excluded_candidate_counts([*tables, *deep_tables], [*results, *deep_results])
    res = MiningResult(data, tables, results, selection, per_teacher, deep_tables, deep_results, kept, [], counts)
    arrays = report_parts(tables, results, selection, per_teacher)
    arrays.update({f"{_SELECTION_COUNTS}{k}.sum": np.int64(v) for k, v in counts.items()})
    arrays.update({f"{_EXCLUDED_COUNTS}{k}.sum": np.int64(v) for k, v in excluded.items()})
    arrays[_NEGATIVES] = np.int64(negatives_written(selection, kept))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with checksummed_file(part) as fh:
        fh.write(buffer.getvalue())
    with checksummed_file(mined) as fh:
        for line in mined_lines(res):
            fh.write(line)
    chunk_saved("chunk", chunk)


def chunk_saved(phase: str, chunk: int) -> None:
    """Called after each chunk's files are in place (``phase``: ``tables`` or ``chunk``); tests replace it to kill
    the process at a known point."""
    log.debug("streaming: %s %d saved", phase, chunk)


def _load_part(run: StreamRun, chunk: int) -> dict[str, np.ndarray]:
    part, _ = _chunk_files(run, chunk)
    problem = verify_sidecar(part)
    if problem is not None:
        raise RuntimeError(f"{part}: {problem} (changed while mining; re-run to recompute it)")
    with np.load(part, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _counts(parts: dict[str, np.ndarray], data: MiningData) -> dict[str, int]:
    """The manifest counts, in the in-memory run's key order."""
    def group(prefix: str) -> dict[str, int]:
        return {k[len(prefix):-len(".sum")]: int(v) for k, v in parts.items() if k.startswith(prefix)}

    return {**group(_SELECTION_COUNTS), **data_counts(data), **group(_EXCLUDED_COUNTS)}


def _chunk_lines(run: StreamRun) -> Iterator[bytes]:
    """Every chunk's mined lines in row order, each chunk file checked against its sidecar first."""
    for i in range(len(run.chunks)):
        _, mined = _chunk_files(run, i)
        problem = verify_sidecar(mined)
        if problem is not None:
            raise RuntimeError(f"{mined}: {problem} (changed while mining; re-run to recompute it)")
        with open(mined, "rb") as fh:
            yield from fh


def _write_candidates(run: StreamRun, folder: Path) -> dict[str, str]:
    """``candidates/<teacher>.parquet``: each teacher's shallow table, one row group per chunk (one chunk in RAM
    at a time). Returns teacher -> file name inside the output folder."""
    import pyarrow.parquet as pq

    from nvr.search.table import table_to_arrow

    folder.mkdir(parents=True, exist_ok=True)  # inside the output's temporary folder: renamed with it
    names: dict[str, str] = {}
    for t, name in enumerate(run.names):
        file = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.parquet"
        writer = None
        for i in range(len(run.chunks)):
            arrow = table_to_arrow(read_table_parquet(run.table_path(i, t), run.data.corpus.ids))
            if writer is None:
                writer = pq.ParquetWriter(str(file), arrow.schema, compression="zstd")
            writer.write_table(arrow)
        if writer is not None:
            writer.close()
        names[name] = f"candidates/{file.name}"
    return names
