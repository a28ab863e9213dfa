"""Exact top-k search sharded over torch.distributed ranks, resumable from checksummed query chunks.

Rank ``r`` of ``W`` owns corpus rows ``[r*D//W, (r+1)*D//W)`` and reads only those (``docs`` is typically the
cache's read-only memmap: a slice of it pages in nothing else). Queries are processed in chunks; per chunk every rank
runs :func:`nvr.search.exact.exact_topk` on its shard (coarse pass in blocks bounded by ``memory_mb`` that count the
resident doc block, then the exact fp64 refine with its error bound, so each shard's top-k is provably exact), the
``W`` fixed-size ``(chunk, k)`` lists are all-gathered (:func:`nvr.utils.distributed.gather_padded`) and merged by
(exact score desc, doc order asc). The global top-k under that total order lies in the union of the shards' top-k,
and each pair's exact score does not depend on the shard, so the result is byte-identical to the 1-process
:func:`exact_topk` for any ``W`` (ties across shard boundaries and ``k`` larger than a shard included).

With ``work_dir``, rank 0 writes each merged chunk atomically with a checksum sidecar; a run killed at any point
(``kill -9`` included) resumes from the chunks that verify, with the same or a different ``W`` (a chunk's content does
not depend on ``W``). The chunk layout (queries per chunk, ``k``) is recorded in ``layout.json`` and kept on resume.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nvr.search.exact import TorchKnn, _coarse_backend, as_row_source, exact_topk, rows_f32
from nvr.utils.atomic import write_text_atomic
from nvr.utils.checksum import checksummed_file, verify_sidecar

log = logging.getLogger(__name__)

DEFAULT_CHUNK_QUERIES = 8192
_LAYOUT = "layout.json"
ChunkHook = Callable[[int, bool], None]
"""``on_chunk(chunk index, reused)`` after each chunk is final (reused: loaded from a previous run's file)."""


def shard_bounds(n_docs: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` owned by ``rank``: contiguous, sizes differing by at most one, covering ``[0, n_docs)``."""
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
    return n_docs * rank // world, n_docs * (rank + 1) // world


def shard_rows(docs: Any, lo: int, hi: int) -> Any:
    """A view of rows ``[lo, hi)`` of a row source (array, memmap or ``Bfloat16Rows``) without reading them."""
    rows = getattr(docs, "rows", None)
    return rows(lo, hi) if callable(rows) else docs[lo:hi]


def sharded_topk(
    queries: np.ndarray,
    docs: Any,
    k: int,
    memory_mb: float = 1024,
    doc_order: np.ndarray | None = None,
    use_gpu: bool | None = None,
    work_dir: str | Path | None = None,
    chunk_queries: int = DEFAULT_CHUNK_QUERIES,
    all_gather: Callable[..., Any] | None = None,
    rank_world: tuple[int, int] | None = None,
    on_chunk: ChunkHook | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores[Q, k] float32, idx[Q, k] int64)``, identical to ``exact_topk(queries, docs, k, ..., doc_order)``,
    on every rank. Collective: every rank of the group calls it with the same queries, ``k`` and ``work_dir``.

    ``all_gather`` / ``rank_world`` default to the initialized torch.distributed group (one process without one).
    """
    if chunk_queries <= 0:
        raise ValueError(f"chunk_queries must be > 0, got {chunk_queries}")
    if rank_world is None or (all_gather is None and rank_world[1] > 1):
        from nvr.utils.distributed import dist_all_gather, world_info  # imports torch: only when distributed

        rank, world = rank_world or world_info()
        gather = all_gather or dist_all_gather
    else:
        (rank, world), gather = rank_world, all_gather
    queries = as_row_source(queries)  # a memmapped / half-precision query cache is converted chunk by chunk
    n_queries, n_docs = queries.shape[0], docs.shape[0]
    if doc_order is not None and np.shape(doc_order) != (n_docs,):
        raise ValueError(f"doc_order must have shape ({n_docs},), got {np.shape(doc_order)}")
    order = None if doc_order is None else np.asarray(doc_order, dtype=np.int64)
    lo, hi = shard_bounds(n_docs, rank, world)
    shard = shard_rows(docs, lo, hi)
    shard_order = None if order is None else order[lo:hi]
    folder = None if work_dir is None else Path(work_dir)
    if folder is not None:
        chunk_queries = _layout(folder, n_queries, k, chunk_queries, rank, gather, world)
    backend = _coarse_backend(use_gpu)
    if isinstance(backend, TorchKnn):
        backend.reuse = True  # a shard that fits the budget stays resident across all query chunks
    starts = list(range(0, n_queries, chunk_queries))
    done = _finished_chunks(folder, len(starts), gather, world)
    scores = np.full((n_queries, k), np.nan, dtype=np.float32)
    idx = np.full((n_queries, k), -1, dtype=np.int64)
    started = time.monotonic()
    for c, q0 in enumerate(starts):
        rows = slice(q0, min(q0 + chunk_queries, n_queries))
        if done[c]:
            scores[rows], idx[rows] = _read_chunk(folder / _chunk_name(c), rows.stop - rows.start, k)
        else:
            s, i = exact_topk(rows_f32(queries, rows.start, rows.stop), shard, k, memory_mb=memory_mb,
                              doc_order=shard_order, backend=backend)
            i[i >= 0] += lo
            scores[rows], idx[rows] = _merge_shards(s, i, order, k, gather, world)
            if folder is not None and rank == 0:
                _write_chunk(folder / _chunk_name(c), scores[rows], idx[rows])
        if on_chunk is not None:
            on_chunk(c, bool(done[c]))
    if folder is not None:
        _barrier(gather, world)  # every chunk file is written before any rank returns (a caller may then clean up)
    log.info("rank %d/%d: %d queries x docs [%d, %d) in %.1fs (%d of %d chunks reused)", rank, world, n_queries,
             lo, hi, time.monotonic() - started, int(done.sum()), len(starts))
    return scores, idx


def _merge_shards(s: np.ndarray, i: np.ndarray, order: np.ndarray | None, k: int, gather: Callable[..., Any],
                  world: int) -> tuple[np.ndarray, np.ndarray]:
    """All-gather every rank's exact shard top-k and keep the global top-k by (score desc, doc order asc)."""
    if world == 1:
        return s, i
    import torch

    from nvr.utils.distributed import gather_padded

    all_s, all_i, counts = gather_padded(torch.from_numpy(s), torch.from_numpy(i), gather)
    if len(set(counts)) != 1:
        raise RuntimeError(f"ranks searched different query chunks (row counts {counts}); all ranks must call "
                           "sharded_topk with the same queries")
    cand_s = all_s.numpy().transpose(1, 0, 2).reshape(s.shape[0], -1)  # [q, W*k], rank-major columns
    cand_i = all_i.numpy().transpose(1, 0, 2).reshape(s.shape[0], -1)
    key = np.where(cand_i >= 0, cand_i if order is None else order[np.maximum(cand_i, 0)], np.iinfo(np.int64).max)
    neg = np.where(cand_i >= 0, -cand_s.astype(np.float64), np.inf)  # padding sorts last
    perm = np.lexsort((key, neg), axis=1)[:, :k]
    return np.take_along_axis(cand_s, perm, axis=1), np.take_along_axis(cand_i, perm, axis=1)


def _barrier(gather: Callable[..., Any], world: int) -> None:
    if world == 1:
        return
    import torch

    gather(torch.zeros(1))


def _layout(folder: Path, n_queries: int, k: int, chunk_queries: int, rank: int, gather: Callable[..., Any],
            world: int) -> int:
    """The chunk size in force for ``folder`` (an earlier run's, when its layout matches ``n_queries`` and ``k``)."""
    path = folder / _LAYOUT
    if rank == 0:
        recorded = _read_layout(path)
        if recorded is not None and (recorded.get("num_queries"), recorded.get("k")) == (n_queries, k):
            chunk_queries = int(recorded["chunk_queries"])
        else:
            if recorded is not None:
                log.warning("%s: layout %s does not match %d queries, k=%d; starting over", path, recorded,
                            n_queries, k)
            for old in folder.glob("chunk-*"):
                old.unlink(missing_ok=True)
            layout = {"num_queries": n_queries, "k": k, "chunk_queries": chunk_queries}
            write_text_atomic(path, json.dumps(layout, sort_keys=True))
    _barrier(gather, world)
    recorded = _read_layout(path)
    if recorded is None:
        raise RuntimeError(f"{path}: rank 0's chunk layout is not readable here; work_dir must be on a filesystem "
                           "every rank sees")
    return int(recorded["chunk_queries"])


def _read_layout(path: Path) -> dict | None:
    try:
        layout = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return layout if isinstance(layout, dict) and isinstance(layout.get("chunk_queries"), int) else None


def _finished_chunks(folder: Path | None, n_chunks: int, gather: Callable[..., Any], world: int) -> np.ndarray:
    """True for chunks whose file verifies on every rank (the ranks agree, so the collectives stay aligned)."""
    mine = np.zeros(n_chunks, dtype=bool)
    if folder is not None:
        mine = np.array([verify_sidecar(folder / _chunk_name(c)) is None for c in range(n_chunks)], dtype=bool)
    if n_chunks == 0 or world == 1:
        return mine
    import torch

    every = gather(torch.from_numpy(mine.astype(np.uint8)))
    return every.reshape(-1, n_chunks).min(dim=0).values.numpy().astype(bool)


def _chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.npy"


def _write_chunk(path: Path, scores: np.ndarray, idx: np.ndarray) -> None:
    """Two ``.npy`` records back to back (scores, then idx), written atomically with a checksum sidecar."""
    with checksummed_file(path) as fh:
        np.save(fh, np.ascontiguousarray(scores), allow_pickle=False)
        np.save(fh, np.ascontiguousarray(idx), allow_pickle=False)


def _read_chunk(path: Path, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        s, i = np.load(fh, allow_pickle=False), np.load(fh, allow_pickle=False)
    if s.shape != (rows, k) or i.shape != (rows, k) or s.dtype != np.float32 or i.dtype != np.int64:
        raise RuntimeError(f"{path}: chunk of shape {s.shape} / {i.shape}, expected ({rows}, {k}); delete the "
                           "folder and re-run")
    return s, i
