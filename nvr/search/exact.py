"""Exact, memory-bounded, deterministic top-k inner-product search.

A coarse pass (faiss brute force on GPU or CPU, or a numpy matmul when faiss is absent) retrieves the top
``k + slack`` candidates per query within a memory budget. A refine pass re-scores them with fp64 accumulation
(products of fp32 values are exact in fp64, so the rounded fp32 score no longer depends on summation order, block
size or backend) and sorts by score desc, then doc order asc. A row is accepted only when its k-th exact score
provably beats every unretrieved document (coarse error bound); otherwise it is searched again with a wider slack,
so a tie group crossing the k boundary is always resolved the same way.

The corpus may be float32, float16 or a bfloat16 row source (``nvr.teachers.cache.Bfloat16Rows``), in RAM or a
read-only memmap: every block is converted to float32 as it is scanned (the refine gathers convert fp16/bf16 to
fp64 exactly), so a half-precision memmap is never copied whole. The coarse pass runs doc block outer, query block
inner: a backend with ``prepare(block)`` (e.g. :class:`TorchKnn` on CUDA) uploads each doc block once and streams
every query block through it, so the corpus crosses to the device once. ``memory_mb`` counts that resident doc
block as well as the score block. There is no cap on ``k``: blocks are searched with matmul + top-k where faiss-gpu
would refuse ``k > 2048``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CoarseFn = Callable[[np.ndarray, Any, int], tuple[np.ndarray, np.ndarray]]
"""``knn(query_block[q, H] float32, doc_block, k) -> (scores[q, k], local idx[q, k])``; ``doc_block`` is the float32
block, or what the backend's optional ``prepare(block)`` returned for it (a device-resident copy)."""

_F32_UNIT_ROUNDOFF = 2.0**-24
_REFINE_BLOCK_BYTES = 32 * 2**20  # gathers are memory-bound: small blocks reuse warm pages, big ones fault
_PAIR_BLOCK = 8192  # explicit pairs scored per step of score_pairs
_MIN_QUERY_BLOCK = 64  # below this many queries per block the corpus itself is split into blocks
_PREAD_MIN_ROWS = 4096  # memmaps with fewer rows are gathered by indexing (their pages are few anyway)


def exact_topk(
    queries: np.ndarray,
    docs: np.ndarray,
    k: int,
    memory_mb: float = 1024,
    doc_order: np.ndarray | None = None,
    use_gpu: bool | None = None,
    backend: CoarseFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents per query by inner product, ties broken by ``doc_order`` (rank of each doc's id).

    ``docs``: float32 / float16 array or memmap, or a bfloat16 row source (see the module docstring).
    ``backend``: the coarse backend (default: chosen from ``use_gpu``); a :class:`TorchKnn` with ``reuse=True``
    passed to several calls over the same ``docs`` keeps its resident doc block between them.

    Returns ``(scores[Q, k] float32, idx[Q, k] int64)``; rows are padded with ``nan`` / ``-1`` when ``D < k``.
    ``memory_mb`` bounds the working memory of every block (the score matrix and every temporary derived from it,
    the merge and re-scoring buffers, the norm pass); only per-query result buffers (O(Q x k)) come on top.
    """
    queries, docs = _check_inputs(queries, docs, k, memory_mb)
    n_queries, n_docs = queries.shape[0], docs.shape[0]
    order = _check_doc_order(doc_order, n_docs)
    scores = np.full((n_queries, k), np.nan, dtype=np.float32)
    idx = np.full((n_queries, k), -1, dtype=np.int64)
    k_eff = min(k, n_docs)
    if n_queries == 0 or k_eff == 0:
        return scores, idx
    budget = int(memory_mb * 2**20)
    _checked_max_norm(queries, "queries", budget)
    doc_norm_max = _checked_max_norm(docs, "docs", budget)
    coarse = backend if backend is not None else _coarse_backend(use_gpu)
    pending = np.arange(n_queries)
    fetch = min(n_docs, k_eff + max(16, k_eff // 4))
    while pending.size:
        block = queries if pending.size == n_queries else queries[pending]  # no copy of all queries on pass 1
        if fetch >= n_docs:  # every document is a candidate (D <= k + slack): no coarse pass, no candidate buffer
            cand = (np.zeros((block.shape[0], 0), np.float32),
                    np.broadcast_to(np.arange(n_docs, dtype=np.int64), (block.shape[0], n_docs)))
        else:
            cand = _coarse_topk(block, docs, fetch, budget, coarse)
        if pending.size == n_queries:  # pass 1 refines straight into the results (unsafe rows are redone below)
            _, _, safe = _refine(block, docs, cand, k_eff, order, doc_norm_max, budget,
                                 out=(scores[:, :k_eff], idx[:, :k_eff]))
        else:
            top_s, top_i, safe = _refine(block, docs, cand, k_eff, order, doc_norm_max, budget)
            done = pending[safe]
            scores[done, :k_eff] = top_s[safe]
            idx[done, :k_eff] = top_i[safe]
            del top_s, top_i
        del block, cand
        pending = pending[~safe]
        fetch = min(n_docs, 2 * fetch)
    return scores, idx


def score_pairs(queries: np.ndarray, docs: np.ndarray, q_idx: np.ndarray, d_idx: np.ndarray) -> np.ndarray:
    """Scores of explicit (query, doc) pairs, computed exactly like the scores :func:`exact_topk` reports
    (fp64 accumulation, rounded to fp32), so a positive's score equals its score as a candidate.

    Any index shape is accepted (e.g. ``(Q, P)`` positives); ``-1`` in ``d_idx`` yields ``nan``.
    """
    q_idx, d_idx = np.broadcast_arrays(np.asarray(q_idx, dtype=np.int64), np.asarray(d_idx, dtype=np.int64))
    out = np.full(d_idx.shape, np.nan, dtype=np.float32)
    valid = d_idx >= 0
    q_sel, d_sel = q_idx[valid], d_idx[valid]
    flat = np.empty(q_sel.shape, dtype=np.float32)
    for a in range(0, len(q_sel), _PAIR_BLOCK):
        b = slice(a, a + _PAIR_BLOCK)
        flat[b] = _exact_dot(queries[q_sel[b]], gather_rows(docs, d_sel[b]))
    out[valid] = flat
    return out


def doc_id_order(doc_ids: Sequence[str]) -> np.ndarray:
    """``order[i]`` = rank of ``doc_ids[i]`` in sorted-id order: the tie-break that makes rankings reproducible."""
    order = np.empty(len(doc_ids), dtype=np.int64)
    order[sorted(range(len(doc_ids)), key=doc_ids.__getitem__)] = np.arange(len(doc_ids))
    return order


def topk_of_scores(
    scores: np.ndarray, k: int, doc_order: np.ndarray | None = None, floor: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of an explicit score matrix ``[Q, D]`` (e.g. BM25), same tie-break and padding as exact_topk.

    Documents scoring ``<= floor`` are not candidates (BM25 uses ``floor=0``: no shared term, not retrieved).
    """
    scores = np.asarray(scores, dtype=np.float32)
    n_queries, n_docs = scores.shape
    order = _check_doc_order(doc_order, n_docs)
    out_s = np.full((n_queries, k), np.nan, dtype=np.float32)
    out_i = np.full((n_queries, k), -1, dtype=np.int64)
    for q in range(n_queries):
        row = scores[q]
        cand = np.flatnonzero(row > floor) if floor is not None else np.arange(n_docs)
        if cand.size > k:  # keep the whole tie group at the k-th score, then sort exactly
            kth = np.partition(row[cand], cand.size - k)[cand.size - k]
            cand = cand[row[cand] >= kth]
        ranked = cand[np.lexsort((cand if order is None else order[cand], -row[cand]))][:k]
        out_s[q, : ranked.size] = row[ranked]
        out_i[q, : ranked.size] = ranked
    return out_s, out_i


def _check_inputs(queries: np.ndarray, docs: np.ndarray, k: int, memory_mb: float) -> tuple[np.ndarray, np.ndarray]:
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    docs = as_row_source(docs)
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise ValueError(f"need queries [Q, H] and docs [D, H] with one H, got {queries.shape} and {docs.shape}")
    return queries, docs


def as_row_source(docs: Any) -> Any:
    """``docs`` unchanged when it is a float32/float16 array (memmaps stay memmaps) or a row source with ``shape``,
    ``ndim`` and ``__getitem__`` (bfloat16 storage); anything else as a float32 array."""
    if isinstance(docs, np.ndarray):
        return docs if docs.dtype in (np.float32, np.float16) else np.asarray(docs, dtype=np.float32)
    if hasattr(docs, "shape") and hasattr(docs, "ndim") and hasattr(docs, "__getitem__"):
        return docs
    return np.asarray(docs, dtype=np.float32)


def rows_f32(docs: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a row source as float32 (a view when already float32, else a block copy)."""
    return np.ascontiguousarray(docs[start:stop], dtype=np.float32)


def release_pages(docs: Any) -> None:
    """Unmap the pages a memmapped corpus has faulted in (they stay in the OS page cache, re-read on access), so
    this process's RSS stays bounded by the block being scanned rather than growing to the whole file. A no-op for
    arrays in RAM."""
    mm = getattr(getattr(docs, "bits", docs), "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # closed, or a platform without it: only RSS accounting is affected
        pass


def _checked_max_norm(x: np.ndarray, name: str, budget: int) -> float:
    """Largest row norm (for the coarse error bound); also rejects nan/inf. Streams blocks: no per-row array."""
    block = _norm_block(x, budget)
    best = 0.0
    for a in range(0, x.shape[0], block):
        sq = _row_sq_norms(x[a : a + block], block)
        if not np.isfinite(sq).all():
            raise ValueError(f"{name} embeddings contain nan or inf (row {a + int(np.argmin(np.isfinite(sq)))})")
        best = max(best, float(sq.max()))
        release_pages(x)
    return float(np.sqrt(best))


def _norm_block(x: np.ndarray, budget: int) -> int:
    """Rows per block of the norm pass: the rows converted to float32 (a half-precision corpus: 4 B per value), their
    fp64 copy (8 B) and its products (8 B) fit the budget."""
    return max(1, min(8192, budget // (20 * max(1, x.shape[1]) + 8)))


def _check_doc_order(doc_order: np.ndarray | None, n_docs: int) -> np.ndarray | None:
    """The doc order as int64, or None for the identity (no O(D) ``arange`` is built: row order is the order)."""
    if doc_order is None:
        return None
    order = np.asarray(doc_order, dtype=np.int64)
    if order.shape != (n_docs,):
        raise ValueError(f"doc_order must have shape ({n_docs},), got {order.shape}")
    return order


def _row_sq_norms(x: np.ndarray, block: int = 8192) -> np.ndarray:
    """Squared row norms in fp64, in blocks so a memmapped corpus is never copied whole."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for a in range(0, x.shape[0], block):
        b = x[a : a + block].astype(np.float64)
        out[a : a + block] = np.einsum("ij,ij->i", b, b)
    return out


def _exact_dot(q_rows: np.ndarray, d_rows: np.ndarray) -> np.ndarray:
    """Row-wise dot products with fp64 accumulation, rounded to fp32 (order-independent in practice)."""
    return np.einsum("ij,ij->i", q_rows.astype(np.float64), d_rows.astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- coarse search


def _numpy_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by a matmul: 4 B per score plus argpartition's int64 positions (8 B) = ``_NUMPY_CELL_BYTES``; the
    scores are negated in place (no ``-sims`` copy)."""
    sims = xq @ xb.T
    if k >= xb.shape[0]:
        return sims, np.broadcast_to(np.arange(xb.shape[0], dtype=np.int64), sims.shape).copy()
    np.negative(sims, out=sims)
    part = np.argpartition(sims, k - 1, axis=1)[:, :k].copy()  # a copy: a view would keep all positions alive
    top = np.take_along_axis(sims, part, axis=1)
    np.negative(top, out=top)
    return top, part.astype(np.int64, copy=False)


_numpy_knn.cell_bytes = 12  # type: ignore[attr-defined]


class TorchKnn:
    """Coarse backend on a torch device: each doc block is uploaded once (:meth:`prepare`) and kept resident while
    every query block is streamed through it (matmul + ``topk``, no ``k`` cap).

    ``h2d_bytes`` counts the bytes moved host -> device (doc blocks and query blocks), so a test on CPU can check
    that the corpus crosses once; ``transfer`` is injectable for the same reason. With ``reuse`` the last resident
    block is kept across calls and reused when the same rows are asked for again (sharded search passes one backend
    to every query chunk over the same shard: a shard that fits the budget crosses once for the whole search). Use
    ``reuse`` only with one ``docs`` per backend: blocks are identified by their row range.
    """

    cell_bytes = 12  # per score cell: the fp32 score and topk's value + int64 index scratch, bounded by k <= block

    def __init__(self, device: str = "cuda", transfer: Callable[[np.ndarray], Any] | None = None,
                 reuse: bool = False) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.h2d_bytes = 0
        self.doc_bytes = 0
        self.reuse = reuse
        self._resident: tuple[tuple[int, int], Any] | None = None
        self._transfer = transfer or (lambda a: torch.from_numpy(a).to(self.device, non_blocking=False))

    def _upload(self, a: np.ndarray) -> Any:
        self.h2d_bytes += a.nbytes
        return self._transfer(np.ascontiguousarray(a, dtype=np.float32))

    def prepare(self, load: Callable[[], np.ndarray], rows: tuple[int, int]) -> Any:
        """The device copy of doc rows ``rows`` (``load()`` gives them as float32): uploaded once and reused for
        every query block (and, with ``reuse``, by later calls asking for the same rows)."""
        if self._resident is not None and self._resident[0] == rows:
            return self._resident[1]
        self._resident = None  # free the previous block before uploading the next one
        block = load()
        self.doc_bytes += block.nbytes
        handle = self._upload(block)
        if self.reuse:
            self._resident = (rows, handle)
        return handle

    def __call__(self, xq: np.ndarray, xb: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        xb = xb if isinstance(xb, torch.Tensor) else self._upload(xb)
        # full fp32 products: the refine's error bound assumes fp32 rounding, which TF32 (``set_float32_matmul_
        # precision("high")``, common in training scripts) would break
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            sims = self._upload(xq) @ xb.T
        finally:
            torch.set_float32_matmul_precision(saved)
        top = torch.topk(sims, min(k, xb.shape[0]), dim=1, largest=True, sorted=False)
        return top.values.cpu().numpy(), top.indices.cpu().numpy().astype(np.int64, copy=False)


def _coarse_backend(use_gpu: bool | None) -> CoarseFn:
    """On CUDA (asked, or auto and a GPU is visible): :class:`TorchKnn` with resident doc blocks; else faiss-cpu
    brute force, else numpy."""
    if use_gpu is not False:
        cuda = _cuda_device()
        if cuda is not None:
            return TorchKnn(cuda)
        if use_gpu:
            raise RuntimeError("use_gpu=True but torch sees no CUDA device")
    try:
        import faiss
    except ImportError:
        return _numpy_knn

    def cpu_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)

    return cpu_knn


def _cuda_device() -> str | None:
    """The local rank's CUDA device when torch is importable and sees one (search never needs torch otherwise)."""
    import sys

    if "torch" not in sys.modules and not os.path.exists("/dev/nvidiactl"):
        return None  # no NVIDIA driver: do not pay torch's import on a CPU run served from the cache
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"


_MERGE_BYTES_PER_FETCH = 60
"""Bytes per (query, fetched candidate) of a doc-blocked merge: two concatenated (score, id) lists (2 x 12), the
negated scores (8), argpartition positions (16) and the merged result (12)."""


def _block_sizes(n_queries: int, n_docs: int, fetch: int, budget: int, cell_bytes: int = 4,
                 doc_row_bytes: int = 0) -> tuple[int, int]:
    """(query block, doc block) so that the resident doc block (``doc_row_bytes`` per row: its float32 copy) plus
    one block of scores with every temporary derived from it (``cell_bytes`` per query x doc cell) fit in
    ``budget`` bytes, and so does the merge of a doc-blocked pass."""
    whole = n_docs * doc_row_bytes
    if whole + n_docs * cell_bytes * min(n_queries, _MIN_QUERY_BLOCK) <= budget:
        return max(1, min(n_queries, (budget - whole) // (n_docs * cell_bytes))), n_docs
    q_block = max(1, min(n_queries, _MIN_QUERY_BLOCK, budget // (_MERGE_BYTES_PER_FETCH * fetch)))
    return q_block, max(fetch, budget // (cell_bytes * q_block + doc_row_bytes))


def gather_rows(docs: Any, idx: np.ndarray) -> np.ndarray:
    """``docs[idx]`` (any index shape). From a large memmap the rows are read with ``pread`` instead of through
    the mapping: a random row faults in its whole page-cache folio (up to 2 MB on current kernels), so gathering
    candidates through the mapping would grow RSS by megabytes per row; a read copies just the row."""
    raw = getattr(docs, "bits", docs)
    located = _file_rows(raw) if raw.shape[0] >= _PREAD_MIN_ROWS else None
    if located is None:
        return docs[idx]
    path, start, row_bytes = located
    flat = np.asarray(idx, dtype=np.int64).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= raw.shape[0]):
        raise IndexError(f"row index out of range for {raw.shape[0]} rows")
    out = np.empty((flat.size, raw.shape[1]), dtype=raw.dtype)
    buf = out.view(np.uint8).reshape(flat.size, row_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        for j, r in enumerate(flat.tolist()):
            if os.preadv(fd, [buf[j]], start + r * row_bytes) != row_bytes:
                raise OSError(f"{path}: short read at row {r}")
    finally:
        os.close(fd)
    out = out.reshape(*np.shape(idx), raw.shape[1])
    return _bf16_bits_to_f32(out) if raw is not docs else out


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of raw bfloat16 bits (as ``nvr.teachers.cache.bfloat16_to_float32``; search stays free of
    teacher imports)."""
    out = bits.astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


def _file_rows(raw: Any) -> tuple[str, int, int] | None:
    """(file, byte offset of row 0, bytes per row) of a C-contiguous memmap (or a row slice of one), else None."""
    mm = getattr(raw, "_mmap", None)
    name = getattr(raw, "filename", None)
    if mm is None or name is None or raw.ndim != 2 or not raw.flags.c_contiguous:
        return None
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (ValueError, TypeError):
        return None
    map_start = raw.offset - raw.offset % mmap.ALLOCATIONGRANULARITY
    return name, map_start + raw.ctypes.data - base, raw.strides[0]


def _is_mapped(docs: Any) -> bool:
    raw = getattr(docs, "bits", docs)
    return isinstance(raw, np.memmap) or getattr(raw, "_mmap", None) is not None


def _resident_row_bytes(docs: Any, device_copy: bool) -> int:
    """Bytes per doc row held while its block is scanned, on top of what the caller already holds: the float32
    copy of a half-precision block (or the device copy), plus the memmap pages the block faults in. A float32
    array in RAM is scanned through views: 0."""
    raw = getattr(docs, "bits", docs)
    itemsize = raw.dtype.itemsize if hasattr(raw, "dtype") else 4
    mapped = _is_mapped(docs)
    converted = not (isinstance(docs, np.ndarray) and docs.dtype == np.float32)
    dim = docs.shape[1]
    return 4 * dim * (converted or device_copy) + itemsize * dim * mapped


def _coarse_topk(
    queries: np.ndarray, docs: np.ndarray, fetch: int, budget: int, knn: CoarseFn
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate-order top-``fetch`` (scores, idx) per query, merged over doc blocks."""
    n_queries, n_docs = queries.shape[0], docs.shape[0]
    row_bytes = _resident_row_bytes(docs, hasattr(knn, "prepare"))
    q_block, d_block = _block_sizes(n_queries, n_docs, fetch, budget, getattr(knn, "cell_bytes", 4), row_bytes)
    prepare = getattr(knn, "prepare", None)
    best_s = np.full((n_queries, fetch), -np.inf, dtype=np.float32)
    best_i = np.full((n_queries, fetch), -1, dtype=np.int64)
    for d0 in range(0, n_docs, d_block):
        kb = min(fetch, n_docs - d0)
        if prepare is not None:  # e.g. upload to the GPU once; every query block below reuses it
            block_docs = prepare(lambda a=d0: rows_f32(docs, a, a + d_block), (d0, min(n_docs, d0 + d_block)))
        else:
            block_docs = rows_f32(docs, d0, d0 + d_block)
        for q0 in range(0, n_queries, q_block):
            s, i = knn(queries[q0 : q0 + q_block], block_docs, kb)
            rows = slice(q0, q0 + q_block)
            if d_block >= n_docs:
                best_s[rows, :kb], best_i[rows, :kb] = s, i
            else:
                best_s[rows], best_i[rows] = _merge(best_s[rows], best_i[rows], s, i + d0, fetch)
        del block_docs
        release_pages(docs)
    return best_s, best_i


def _merge(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.concatenate([s1, s2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    top = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, axis=1)
    return np.take_along_axis(s, top, axis=1), np.take_along_axis(i, top, axis=1)


# ----------------------------------------------------------------------------------------------- exact refine


def _refine(
    queries: np.ndarray,
    docs: np.ndarray,
    cand: tuple[np.ndarray, np.ndarray],
    k: int,
    order: np.ndarray | None,
    doc_norm_max: float,
    budget: int,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k among the coarse candidates plus, per row, whether that top-k is provably the global one.

    ``out`` (two (Q, k) arrays, e.g. views of the final results) receives the top-k instead of new arrays.
    """
    coarse_s, coarse_i = cand
    n_queries, fetch = coarse_i.shape
    n_docs, dim = docs.shape
    if out is None:
        out = (np.empty((n_queries, k), dtype=np.float32), np.empty((n_queries, k), dtype=np.int64))
    out_s, out_i = out
    gather_budget = min(budget, _REFINE_BLOCK_BYTES)
    gather_bytes = dim * 14 + 8  # per candidate: the gather (bf16: + its float32 widening), fp64 copy and product
    q_block = max(1, min(n_queries, gather_budget // (fetch * (gather_bytes + 24))))
    # when even one query's candidates do not fit, its gather is cut into column blocks (k larger than a block)
    c_block = max(1, min(fetch, gather_budget // (q_block * gather_bytes)))
    for q0 in range(0, n_queries, q_block):
        rows = slice(q0, q0 + q_block)
        ci = coarse_i[rows]
        q64 = queries[rows].astype(np.float64)
        exact = np.empty(ci.shape, dtype=np.float32)
        for c0 in range(0, fetch, c_block):
            cols = slice(c0, c0 + c_block)
            exact[:, cols] = np.einsum("qh,qkh->qk", q64, gather_rows(docs, ci[:, cols]).astype(np.float64))
        perm = np.lexsort((ci if order is None else order[ci], -exact), axis=1)[:, :k]
        out_s[rows] = np.take_along_axis(exact, perm, axis=1)
        out_i[rows] = np.take_along_axis(ci, perm, axis=1)
        release_pages(docs)
    if fetch >= n_docs:
        return out_s, out_i, np.ones(n_queries, dtype=bool)
    q_norm = np.sqrt(_row_sq_norms(queries, _norm_block(queries, budget)))
    coarse_err = 2 * dim * _F32_UNIT_ROUNDOFF * q_norm * doc_norm_max + 1e-30
    unretrieved_max = coarse_s.min(axis=1).astype(np.float64) + coarse_err
    safe = out_s[:, k - 1].astype(np.float64) > unretrieved_max
    return out_s, out_i, safe
