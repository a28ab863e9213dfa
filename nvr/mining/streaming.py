"""Streaming mining (``stream_chunk_queries``): host RAM bounded by one query chunk, resumable after ``kill -9``.

The in-memory path (``pipeline.run_mining``) holds every teacher's whole ``(Q, depth)`` candidate table. Here the
queries are cut into chunks of ``stream_chunk_queries`` rows (file order) and the work is done in passes over them:

1. **tables**: per chunk, each teacher's candidate table of the chunk's rows, in the chunked table cache
   ``cache_dir/tables/<table key>-chunks<N>/chunk-<chunk>.parquet`` (atomic, sha256 sidecar). ``<table key>`` is
   the key the in-memory run caches that teacher's whole table under (``build.candidate_table_key``: teacher
   settings and weights, queries, positives, corpus, depth, exclusion rules; hashed with the cross-encoder's
   fingerprint when one rescores), ``N`` the chunk size. It is kept after the run, like the in-memory table cache,
   so another filter, sampler or ensemble over the same teachers searches nothing. Dense teachers encode all
   queries (and the corpus) once through the embedding cache, memory-mapped, and every chunk searches with its
   rows of those embeddings, so its scores are the in-memory run's bit for bit.
2. **calibration** (``filter.calibrate`` only): the parameter is chosen on every query's positive scores, read back
   from the chunk tables (``(Q, P)``, small), exactly as on the whole table.
3. **widening plan**: the rows whose selection is starved (``max_depth``), over all chunks (``widen.npy``): the
   deep tables reserve room for the most positives of *those* rows, as the in-memory deep table does.
4. **chunks**: per chunk filter, select, widen its starved rows (deep tables are searched, not cached: they depend
   on the filter), and save its ``mined.jsonl`` lines (``mined-<chunk>.jsonl``) and report parts
   (``part-<chunk>.npz``: counts and per-query values, ``report.report_parts``).

Passes 2-4 write into a work folder ``cache_dir/stream/<fingerprint>/`` (the mined set's content address, so only
the same job resumes there). A re-run reuses every file that verifies (a corrupted one is recomputed with a
warning) and logs how many; each file is verified once per run (later passes trust it). The output folder (atomic,
as in memory) gets ``mined.jsonl`` concatenated chunk by chunk, ``manifest.json`` (byte-identical to the in-memory
run's), ``report.json`` (the same numbers, from the combined parts, plus a ``stream`` section), ``report.png`` and
``candidates/<teacher>.parquet`` (the shallow candidate table, one row group per chunk). The work folder is removed
once the output is in place; the chunk tables stay.

Under torchrun every rank runs the collective parts (encoding its shards, the sharded search of each chunk, the
deep searches) and rank 0 alone reads and writes the files: it decides which chunk tables and chunks are missing
and broadcasts that (and the widening plan), so the ranks make the same collective calls in the same order and
the output is the one process's byte for byte.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvr.config.mining import MineConfig
from nvr.mining.build import TextKeys, candidate_table_key
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
from nvr.utils.atomic import atomic_dir, write_json_atomic
from nvr.utils.checksum import checksummed_file, sidecar, verify_sidecar
from nvr.utils.distributed import dist_rank_world
from nvr.utils.hashing import sha256_json
from nvr.utils.locking import exclusive_lock

log = logging.getLogger(__name__)

STREAM_FORMAT = "nvr-stream/2"
"""2: the chunk tables live in the table cache, not the work folder (a /1 folder is cleared on resume)."""
_SELECTION_COUNTS = "count.selection."
_EXCLUDED_COUNTS = "count.excluded."
_NEGATIVES = "count.negatives_written.sum"


@dataclass
class StreamRun:
    """One streaming job: its config, data, teachers, chunks (global row indices), the mined-set work folder and
    each teacher's chunked table cache entry (both None / empty on torchrun ranks other than 0)."""

    cfg: MineConfig
    data: MiningData
    teachers: list[Any]
    chunks: list[np.ndarray]
    work: Path | None
    table_dirs: list[Path]
    stats: dict[str, int]
    rank: int = 0
    world: int = 1
    verified: set[Path] = field(default_factory=set)
    """Files verified (or written) in this run: later passes read them without hashing them again."""
    text_keys: TextKeys | None = None
    """The corpus documents' text keys, hashed once for all chunks (duplicate and query-text flags)."""

    def __post_init__(self) -> None:
        if self.text_keys is None:
            self.text_keys = TextKeys(self.data.corpus)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def table_path(self, chunk: int, teacher: int) -> Path:
        return self.table_dirs[teacher] / f"chunk-{chunk:06d}.parquet"

    def check(self, path: Path) -> str | None:
        """None when ``path`` matches its sidecar (hashed once per run), else the problem."""
        if path in self.verified:
            return None
        problem = verify_sidecar(path)
        if problem is None:
            self.verified.add(path)
        return problem

    def load_tables(self, chunk: int, columns: list[str] | None = None) -> list[CandidateTable]:
        ids = self.data.corpus.ids
        tables = []
        for t in range(len(self.teachers)):
            path = self.table_path(chunk, t)
            problem = self.check(path)
            if problem is not None:
                raise CorruptTableError(f"{path}: {problem} (changed while mining; re-run to recompute it)")
            tables.append(read_table_parquet(path, ids, columns, verify=False))
        return tables

    def shared(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (rank 0 alone sees the files, so it decides what is left to do)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def mine_streaming(cfg: MineConfig, out: Path, started: float) -> int:
    """Mine ``cfg`` chunk by chunk into the output folder ``out`` (see the module doc); returns the rows written
    (0 on a torchrun rank other than 0: it only helps encode and search)."""
    rank, world = _process_group()
    check_selection_config(cfg)
    data = load_data(cfg.data)
    check_feasible(cfg, data)
    teachers = [make_teacher(t, cfg.cache_dir, cfg.seed) for t in cfg.teachers]
    size = int(cfg.stream_chunk_queries or 0)
    num_queries = len(data.queries)
    chunks = [np.arange(s, min(s + size, num_queries), dtype=np.int64) for s in range(0, num_queries, size)]
    stats = {"chunks": len(chunks), "tables_reused": 0, "tables_built": 0, "chunks_reused": 0}
    if rank != 0:
        return _run(StreamRun(cfg, data, teachers, chunks, None, [], stats, rank, world), [], out, started)
    records = teacher_records(teachers, cfg.teachers)
    inputs = mining_inputs(cfg, records)
    fingerprint = mining_fingerprint(cfg, inputs)
    table_dirs = _table_dirs(cfg, data, teachers, size, inputs["cross_encoder"])
    work = Path(cfg.cache_dir) / "stream" / fingerprint
    with exclusive_lock(work, what="streaming work folder"):
        _open_work(work, {"format": STREAM_FORMAT, "fingerprint": fingerprint, "chunk_queries": size,
                          "num_queries": num_queries, "teachers": [t.name for t in teachers]})
        run = StreamRun(cfg, data, teachers, chunks, work, table_dirs, stats, rank, world)
        written = _run(run, records, out, started)
        shutil.rmtree(work, ignore_errors=True)  # the output holds the result; the chunk tables stay cached
    return written


def _process_group() -> tuple[int, int]:
    """(rank, world); under torchrun the process group the ranks agree through (gloo, created here if needed)."""
    rank, world = dist_rank_world()
    if world > 1:
        from nvr.utils.distributed import ensure_process_group

        if ensure_process_group() != world:
            raise RuntimeError(f"streaming under torchrun: WORLD_SIZE={world} but no process group of that size "
                               "(MASTER_ADDR unset?)")
    return rank, world


def _table_dirs(cfg: MineConfig, data: MiningData, teachers: Sequence[Any], size: int,
                cross_encoder: str | None) -> list[Path]:
    """Per teacher, its chunked table cache entry ``cache_dir/tables/<table key>-chunks<size>``."""
    root = Path(cfg.cache_dir) / "tables"
    dirs = []
    for teacher in teachers:
        key = candidate_table_key(teacher, data.queries.ids, data.queries.texts, data.positives, data.corpus,
                                  cfg.depth, data.excluded)
        if cross_encoder is not None:  # the chunks are stored rescored
            key = sha256_json({"table": key, "cross_encoder": cross_encoder})[:40]
        dirs.append(root / f"{key}-chunks{size}")
    return dirs


def _run(run: StreamRun, records: list[dict[str, str]], out: Path, started: float) -> int:
    """The passes; every collective step (encoding, searching) runs on every rank in the same order."""
    cfg, data = run.cfg, run.data
    slots = _most_positives(data, range(len(data.queries)))
    views = QueryRows(run.teachers, data, list(data.queries.ids))
    _ensure_tables(run, views, slots)
    resolved = _resolve_filters(run) if run.writer else []
    widen = run.shared(_widen_plan(run, resolved) if run.writer else None)
    deep = QueryRows(run.teachers, data, [data.queries.ids[r] for r in widen]) if widen.size else None
    deep_slots = _most_positives(data, widen)
    todo = run.shared([i for i in range(len(run.chunks)) if not _chunk_done(run, i)] if run.writer else None)
    for i in todo:
        _ensure_chunk(run, resolved, widen, deep, deep_slots, i)
    if not run.writer:
        return 0
    log.info("streaming: %d chunks; reused %d finished chunks from %s and %d chunk tables (built %d) from %s",
             len(run.chunks), run.stats["chunks_reused"], run.work, run.stats["tables_reused"],
             run.stats["tables_built"], ", ".join(str(d) for d in run.table_dirs))
    parts = combine_parts([_load_part(run, i) for i in range(len(run.chunks))])
    counts = _counts(parts, data)
    if counts["written"] == 0:
        raise_all_dropped(cfg, len(data.queries))
    filters = filter_settings_of(run.names, resolved)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        mined = write_mined(tmp / MINED_FILE, _chunk_lines(run))
        write_json_atomic(tmp / MANIFEST_FILE, manifest_from(cfg, records, data, counts, filters, mined),
                          ensure_ascii=False)
        pos, neg = parts["selection.positive.cat"], parts["selection.negative.cat"]
        save_figure(tmp / "report.png", score_figure(pos, neg, run.names, [c for c, _ in resolved]))
        candidates = _write_candidates(run, tmp / "candidates")
        extra = report_extra(cfg, counts, int(parts[_NEGATIVES]), started)
        report = report_from_parts(parts, run.names, filters, extra)
        report["stream"] = {**run.stats, "chunk_queries": cfg.stream_chunk_queries, "candidates": candidates,
                            "table_cache": {n: str(d) for n, d in zip(run.names, run.table_dirs)}}
        write_json_atomic(tmp / "report.json", report)
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
    write_json_atomic(path, layout, indent=None, sort_keys=True, newline=False)


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


def _ensure_tables(run: StreamRun, views: QueryRows, slots: int) -> None:
    """Pass 1: every chunk's candidate tables; only the (chunk, teacher) tables missing from the cache are built."""
    missing = run.shared([_missing_tables(run, i) for i in range(len(run.chunks))] if run.writer else None)
    for chunk, wanted in enumerate(missing):
        if not wanted:
            continue
        rows = run.chunks[chunk]
        teachers = views.for_rows([run.data.queries.ids[r] for r in rows])
        tables = build_tables(run.cfg, [teachers[t] for t in wanted], run.data, run.cfg.depth, rows, cache=False,
                              positive_slots=slots, text_keys=run.text_keys)
        if not run.writer:
            continue
        for t, table in zip(wanted, tables):
            path = run.table_path(chunk, t)
            write_table_parquet(table, path)
            run.verified.add(path)
        run.stats["tables_built"] += len(wanted)
        chunk_saved("tables", chunk)


def _missing_tables(run: StreamRun, chunk: int) -> list[int]:
    """The teachers whose table of ``chunk`` is not in the cache (or does not verify: warned and rebuilt)."""
    missing = []
    for t in range(len(run.teachers)):
        path = run.table_path(chunk, t)
        problem = run.check(path)
        if problem is None:
            run.stats["tables_reused"] += 1
            continue
        if path.exists() or sidecar(path).exists():
            log.warning("streaming chunk %d: %s: %s; recomputing it", chunk, path, problem)
        missing.append(t)
    return missing


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
    assert run.work is not None, "only rank 0 has the work folder"
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
    assert run.work is not None, "only rank 0 has the work folder"
    return run.work / f"part-{chunk:06d}.npz", run.work / f"mined-{chunk:06d}.jsonl"


def _chunk_done(run: StreamRun, chunk: int) -> bool:
    """True when the chunk's report parts and mined lines from an earlier run verify (counted as reused)."""
    part, mined = _chunk_files(run, chunk)
    problems = [f"{path}: {problem}" for path in (part, mined) if (problem := run.check(path)) is not None]
    if not problems:
        run.stats["chunks_reused"] += 1
        return True
    if part.exists() or mined.exists():
        log.warning("streaming chunk %d: %s; recomputing it", chunk, problems[0])
    return False


def _deep_tables(run: StreamRun, deep: QueryRows | None, rows: np.ndarray, slots: int) -> list[CandidateTable]:
    """The ``max_depth`` tables of the widened ``rows`` (a collective search under torchrun)."""
    if deep is None:
        raise RuntimeError("streaming: rows to widen but no encoding of the widened queries")
    ids = [run.data.queries.ids[r] for r in rows]
    return build_tables(run.cfg, deep.for_rows(ids), run.data, run.cfg.max_depth, rows, cache=False,
                        positive_slots=slots, text_keys=run.text_keys)


def _ensure_chunk(
    run: StreamRun, resolved: Sequence[tuple[Any, dict[str, Any]]], widen: np.ndarray, deep: QueryRows | None,
    deep_slots: int, chunk: int,
) -> None:
    """Pass 4 for one chunk: filter, select, widen, and save its mined lines and report parts. Other ranks only
    join the deep search of the chunk's rows in the widening plan (the same rows rank 0 finds starved)."""
    rows = run.chunks[chunk]
    deep_rows = rows[np.isin(rows, widen)]
    if not run.writer:
        if deep_rows.size:
            _deep_tables(run, deep, deep_rows, deep_slots)
        return
    cfg, data = run.cfg, run.data
    tables, results, selection, per_teacher = _chunk_selection(run, resolved, chunk)
    short = np.flatnonzero(selection.starved)
    was_short = selection.short.copy()
    expected = rows[short] if short.size and _can_widen(run, tables) else rows[:0]
    if not np.array_equal(expected, deep_rows):
        raise RuntimeError(f"streaming chunk {chunk}: starved rows differ from the widening plan")
    deep_tables: list[CandidateTable] = []
    deep_results: list[Any] = []
    if deep_rows.size:
        deep_tables = _deep_tables(run, deep, deep_rows, deep_slots)
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
    part, mined = _chunk_files(run, chunk)
    with checksummed_file(part) as fh:
        fh.write(buffer.getvalue())
    with checksummed_file(mined) as fh:
        for line in mined_lines(res):
            fh.write(line)
    run.verified.update((part, mined))
    chunk_saved("chunk", chunk)


def chunk_saved(phase: str, chunk: int) -> None:
    """Called after each chunk's files are in place (``phase``: ``tables`` or ``chunk``); tests replace it to kill
    the process at a known point."""
    log.debug("streaming: %s %d saved", phase, chunk)


def _load_part(run: StreamRun, chunk: int) -> dict[str, np.ndarray]:
    part, _ = _chunk_files(run, chunk)
    problem = run.check(part)
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
    """Every chunk's mined lines in row order (each file verified once in this run)."""
    for i in range(len(run.chunks)):
        _, mined = _chunk_files(run, i)
        problem = run.check(mined)
        if problem is not None:
            raise RuntimeError(f"{mined}: {problem} (changed while mining; re-run to recompute it)")
        with open(mined, "rb") as fh:
            yield from fh


def _write_candidates(run: StreamRun, folder: Path) -> dict[str, str]:
    """``candidates/<teacher>.parquet``: each teacher's shallow table, one row group per chunk, copied from the
    verified chunk tables as Arrow (one chunk in RAM at a time). Returns teacher -> file name in the output."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)  # inside the output's temporary folder: renamed with it
    names: dict[str, str] = {}
    for t, name in enumerate(run.names):
        file = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.parquet"
        writer = None
        for i in range(len(run.chunks)):
            path = run.table_path(i, t)
            problem = run.check(path)
            if problem is not None:
                raise RuntimeError(f"{path}: {problem} (changed while mining; re-run to recompute it)")
            arrow = pq.read_table(path)
            if writer is None:
                writer = pq.ParquetWriter(str(file), arrow.schema, compression="zstd")
            writer.write_table(arrow)
        if writer is not None:
            writer.close()
        names[name] = f"candidates/{file.name}"
    return names
