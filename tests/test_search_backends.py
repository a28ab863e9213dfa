"""Coarse backends of exact search: device-resident doc blocks (the corpus crosses host->device once), the memory
budget counting the resident block, no cap on k, half-precision corpora scanned block by block."""

from __future__ import annotations

import numpy as np
import pytest

from nvr.search import exact as search
from nvr.search.exact import TorchKnn, exact_topk
from nvr.teachers.cache import Bfloat16Rows, float32_to_bfloat16


def brute_force(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    full = (queries.astype(np.float64) @ docs.astype(np.float64).T).astype(np.float32)
    ranked = np.lexsort((np.broadcast_to(np.arange(len(docs)), full.shape), -full), axis=1)[:, :k]
    return np.take_along_axis(full, ranked, axis=1), ranked.astype(np.int64)


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class CountingTorchKnn(TorchKnn):
    """TorchKnn on the CPU recording every block it sees."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.prepared: list[int] = []
        self.calls: list[tuple[int, int]] = []

    def prepare(self, load, rows):
        self.prepared.append(rows[1] - rows[0])
        return super().prepare(load, rows)

    def __call__(self, xq, xb, k):
        self.calls.append((xq.shape[0], xb.shape[0]))
        return super().__call__(xq, xb, k)


@pytest.mark.parametrize(("n_queries", "n_docs", "memory_mb"), [(300, 20000, 0.5), (1000, 5000, 0.3)])
def test_resident_doc_blocks_cross_once(monkeypatch, n_queries: int, n_docs: int, memory_mb: float) -> None:
    rng = np.random.default_rng(0)
    queries, docs = unit(rng, n_queries, 16), unit(rng, n_docs, 16)
    knn = CountingTorchKnn()
    monkeypatch.setattr(search, "_coarse_backend", lambda use_gpu: knn)
    scores, idx = exact_topk(queries, docs, 10, memory_mb=memory_mb)
    ref = brute_force(queries, docs, 10)
    np.testing.assert_array_equal(idx, ref[1])
    np.testing.assert_array_equal(scores, ref[0])
    n_blocks = len(knn.prepared)
    assert n_blocks > 1 and sum(knn.prepared) == n_docs, "the corpus is cut in blocks, each uploaded once"
    assert knn.doc_bytes == docs.nbytes
    assert len(knn.calls) > n_blocks, "several query blocks stream through each resident doc block"
    assert knn.h2d_bytes == docs.nbytes + n_blocks * queries.nbytes
    budget = memory_mb * 2**20
    for q_rows, d_rows in knn.calls:  # the resident block (float32 copy) + the score block fit the budget
        assert d_rows * 16 * 4 + q_rows * d_rows * knn.cell_bytes <= budget


def test_block_sizes_count_the_resident_doc_block() -> None:
    budget = 2**20
    q, d = search._block_sizes(10**6, 10**6, 100, budget, cell_bytes=4, doc_row_bytes=4 * 1024)
    assert d * 4 * 1024 + q * d * 4 <= budget
    assert search._block_sizes(10**6, 10**6, 100, budget, 4, 0)[1] > d  # without it the doc block is larger


@pytest.mark.parametrize("backend", ["torch", "faiss", "numpy"])
@pytest.mark.parametrize(("n_docs", "k", "memory_mb"), [(6000, 2500, 1024), (9000, 4100, 0.25)])
def test_k_beyond_2048(monkeypatch, backend: str, n_docs: int, k: int, memory_mb: float) -> None:
    rng = np.random.default_rng(1)
    queries, docs = unit(rng, 5, 8), unit(rng, n_docs, 8)
    if backend == "faiss":
        pytest.importorskip("faiss")
    knn = {"torch": TorchKnn("cpu"), "numpy": search._numpy_knn, "faiss": search._coarse_backend(False)}[backend]
    monkeypatch.setattr(search, "_coarse_backend", lambda use_gpu: knn)
    scores, idx = exact_topk(queries, docs, k, memory_mb=memory_mb)
    ref = brute_force(queries, docs, k)
    np.testing.assert_array_equal(idx, ref[1])
    np.testing.assert_array_equal(scores, ref[0])


def test_use_gpu_without_cuda_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(search, "_cuda_device", lambda: None)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        search._coarse_backend(True)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_precision_memmap_is_converted_block_by_block(tmp_path, storage: str) -> None:
    """A half-precision memmap corpus is never converted whole: beyond ``memory_mb`` only (Q, k) buffers come on
    top, and the result equals brute force over the stored values."""
    import tracemalloc

    rng = np.random.default_rng(2)
    docs32 = unit(rng, 60000, 32)
    queries = unit(rng, 20, 32)
    path = tmp_path / "docs.npy"
    np.save(path, docs32.astype(np.float16) if storage == "float16" else float32_to_bfloat16(docs32))
    stored = np.load(path, mmap_mode="r")
    docs = stored if storage == "float16" else Bfloat16Rows(stored)
    values = np.asarray(stored, dtype=np.float32) if storage == "float16" else docs[:]
    memory_mb = 1.0
    tracemalloc.start()
    try:
        scores, idx = exact_topk(queries, docs, 15, memory_mb=memory_mb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= memory_mb * 2**20 * 1.05 + 2**16, f"peak {peak} for a {values.nbytes}-byte float32 corpus"
    ref = brute_force(queries, values, 15)
    np.testing.assert_array_equal(idx, ref[1])
    np.testing.assert_array_equal(scores, ref[0])


def test_torch_backend_forces_full_fp32_products() -> None:
    """The refine's error bound assumes fp32 products: TF32 / bf16 matmul set by a training script is overridden
    inside the coarse call and restored after."""
    import torch

    seen: list[str] = []

    def transfer(a: np.ndarray):
        seen.append(torch.get_float32_matmul_precision())
        return torch.from_numpy(a)

    knn = TorchKnn("cpu", transfer=transfer)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        rng = np.random.default_rng(4)
        knn(unit(rng, 3, 8), unit(rng, 50, 8), 5)
        assert seen[-1] == "highest" and torch.get_float32_matmul_precision() == "medium"
        assert knn.h2d_bytes == 3 * 8 * 4 + 50 * 8 * 4
    finally:
        torch.set_float32_matmul_precision(saved)


_RSS_CHILD = """
import re, sys
import numpy as np
from nvr.search.exact import exact_topk
def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
docs = np.load(sys.argv[1], mmap_mode="r")
queries = np.ascontiguousarray(np.asarray(docs[:40], dtype=np.float32) + 0.01)
exact_topk(queries[:2], np.asarray(docs[:1000]), 5)  # warm up imports and faiss before the baseline
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = kib("VmRSS")
exact_topk(queries, docs, 50, memory_mb=float(sys.argv[2]))
print((kib("VmHWM") - base) / 1024)
"""


def test_memmap_corpus_rss_stays_near_the_budget(tmp_path) -> None:
    """Peak RSS growth while searching a float16 memmap (102 MB on disk, 205 MB as float32) stays near the budget
    (allocator slack included): the pages of each scanned block and of the refine's random gathers are released,
    not kept mapped (without that the growth is the whole file)."""
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    path = tmp_path / "docs.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(800_000, 64))
    for a in range(0, 800_000, 100_000):
        out[a : a + 100_000] = unit(rng, 100_000, 64)
    out.flush()
    del out
    budget_mb = 8
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), str(budget_mb)], capture_output=True,
                          text=True, check=True)
    growth_mb = float(done.stdout.strip().splitlines()[-1])
    assert growth_mb <= 2 * budget_mb + 16, f"peak RSS grew {growth_mb:.0f} MB for a {budget_mb} MB budget"


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_gather_rows_reads_memmap_rows_exactly(tmp_path, storage: str) -> None:
    """Candidate rows of a large memmap (and of a row slice of it, as a rank's shard) are read with pread: same
    values as indexing the mapping, any index shape."""
    from nvr.search.exact import gather_rows
    from nvr.search.sharded import shard_rows

    rng = np.random.default_rng(6)
    values = rng.standard_normal((9000, 24)).astype(np.float32)
    stored = {"float32": values, "float16": values.astype(np.float16), "bfloat16": float32_to_bfloat16(values)}
    np.save(tmp_path / "d.npy", stored[storage])
    raw = np.load(tmp_path / "d.npy", mmap_mode="r")
    docs = Bfloat16Rows(raw) if storage == "bfloat16" else raw
    idx = rng.integers(0, 9000, size=(7, 13))
    np.testing.assert_array_equal(gather_rows(docs, idx), docs[idx])
    shard = shard_rows(docs, 4000, 9000)
    np.testing.assert_array_equal(gather_rows(shard, idx % 5000), docs[idx % 5000 + 4000])
    with pytest.raises(IndexError, match="out of range"):
        gather_rows(shard, np.array([5000]))
