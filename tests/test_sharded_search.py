"""Sharded exact search: byte-identical to one process for any world size, each rank reading only its shard,
resumable from checksummed chunks with a different world size; plus real gloo runs (W = 2, 3, kill -9) in
subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nvr.search.exact import exact_topk
from nvr.search.sharded import shard_bounds, sharded_topk
from nvr.teachers.cache import Bfloat16Rows, float32_to_bfloat16
from tests._threads import ThreadGroup

SCRIPT = Path(__file__).parent / "scripts" / "sharded_search.py"


class RecordingRows:
    """Row source that records which global rows were read (to check a rank stays inside its shard)."""

    def __init__(self, data: np.ndarray, offset: int = 0, log: list | None = None) -> None:
        self.data, self.offset, self.log = data, offset, [] if log is None else log
        self.shape, self.ndim = data.shape, 2

    def rows(self, lo: int, hi: int) -> RecordingRows:
        return RecordingRows(self.data[lo:hi], self.offset + lo, self.log)

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, _ = index.indices(self.shape[0])
            self.log.append((self.offset + lo, self.offset + hi))
        else:
            flat = np.asarray(index).ravel()
            if flat.size:
                self.log.append((self.offset + int(flat.min()), self.offset + int(flat.max()) + 1))
        return self.data[index]


def tied_case(seed: int, n_docs: int, n_queries: int = 23, dim: int = 6):
    """Small-integer vectors (many exact ties) and duplicate docs on both sides of every shard boundary."""
    rng = np.random.default_rng(seed)
    docs = rng.integers(-2, 3, size=(n_docs, dim)).astype(np.float32)
    for w in (2, 3, 4):
        for r in range(1, w):
            b = n_docs * r // w
            docs[max(0, b - 2) : b + 2] = docs[0]
    queries = rng.integers(-2, 3, size=(n_queries, dim)).astype(np.float32)
    return queries, docs, rng.permutation(n_docs)


def run_sharded(world: int, queries, docs, k, **kw):
    group = ThreadGroup(world)
    return group.run(lambda r, g: sharded_topk(queries, docs, k, all_gather=g, rank_world=(r, world), **kw))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(("n_docs", "k", "memory_mb"), [(301, 17, 1024), (50, 40, 1024), (37, 60, 1024),
                                                       (2000, 9, 0.004)])
def test_any_world_size_is_byte_identical_to_one_process(world, n_docs, k, memory_mb) -> None:
    """Ties across shard boundaries, k larger than a shard (50 docs / 3 ranks, k = 40), k > D (padding) and tiny
    budgets that split each shard into doc blocks."""
    queries, docs, order = tied_case(world + n_docs, n_docs)
    ref_s, ref_i = exact_topk(queries, docs, k, memory_mb=memory_mb, doc_order=order)
    for s, i in run_sharded(world, queries, docs, k, memory_mb=memory_mb, doc_order=order, chunk_queries=7):
        assert s.tobytes() == ref_s.tobytes() and i.tobytes() == ref_i.tobytes()


def test_each_rank_reads_only_its_shard() -> None:
    queries, docs, order = tied_case(3, 400)
    world = 3
    logs: list[list] = [[] for _ in range(world)]
    group = ThreadGroup(world)
    group.run(lambda r, g: sharded_topk(queries, RecordingRows(docs, log=logs[r]), 11, doc_order=order,
                                        all_gather=g, rank_world=(r, world), memory_mb=0.01))
    for r in range(world):
        lo, hi = shard_bounds(len(docs), r, world)
        assert logs[r], "the rank read nothing"
        assert min(a for a, _ in logs[r]) >= lo and max(b for _, b in logs[r]) <= hi


def test_shard_bounds_partition_the_corpus() -> None:
    for n in (0, 1, 5, 10, 1001):
        for w in (1, 2, 3, 7):
            bounds = [shard_bounds(n, r, w) for r in range(w)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(10, 2, 2)


def test_half_precision_row_sources_match_their_float32_values() -> None:
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    fp16, bf16 = docs.astype(np.float16), Bfloat16Rows(float32_to_bfloat16(docs))
    for stored, values in ((fp16, fp16.astype(np.float32)), (bf16, bf16[:])):
        ref = exact_topk(queries, values, 13, memory_mb=0.01)
        for s, i in run_sharded(3, queries, stored, 13, memory_mb=0.01):
            assert s.tobytes() == ref[0].tobytes() and i.tobytes() == ref[1].tobytes()


class Crash(RuntimeError):
    pass


def test_resume_from_chunks_with_another_world_size(tmp_path: Path) -> None:
    queries, docs, order = tied_case(5, 333, n_queries=40)
    ref = exact_topk(queries, docs, 12, doc_order=order)
    work = tmp_path / "work"

    def crash_after_two(c: int, reused: bool) -> None:
        if c == 2:
            raise Crash

    group = ThreadGroup(2)
    with pytest.raises(Crash):
        group.run(lambda r, g: sharded_topk(queries, docs, 12, doc_order=order, work_dir=work, chunk_queries=6,
                                            all_gather=g, rank_world=(r, 2), on_chunk=crash_after_two))
    # rank 0 writes each chunk before its callback; the other rank may raise first, so chunk 2 may or may not exist
    written = sorted(int(p.name[6:12]) for p in work.glob("chunk-*.npy"))
    assert written in ([0, 1], [0, 1, 2])
    (work / "chunk-000001.npy").write_bytes(b"garbage")  # a corrupted chunk is recomputed, not trusted
    events: list[list] = [[] for _ in range(3)]
    out = ThreadGroup(3).run(lambda r, g: sharded_topk(
        queries, docs, 12, doc_order=order, work_dir=work, chunk_queries=50, all_gather=g, rank_world=(r, 3),
        on_chunk=lambda c, reused: events[r].append((c, reused))))
    n_chunks = -(-40 // 6)  # the recorded layout (6 queries per chunk) wins over the new chunk_queries
    for r in range(3):
        assert events[r] == [(c, c in set(written) - {1}) for c in range(n_chunks)]
        assert out[r][0].tobytes() == ref[0].tobytes() and out[r][1].tobytes() == ref[1].tobytes()


def test_layout_of_another_search_is_discarded(tmp_path: Path) -> None:
    queries, docs, order = tied_case(6, 120, n_queries=10)
    work = tmp_path / "work"
    sharded_topk(queries, docs, 5, doc_order=order, work_dir=work, chunk_queries=4, rank_world=(0, 1))
    events: list = []
    s, i = sharded_topk(queries, docs, 8, doc_order=order, work_dir=work, chunk_queries=4, rank_world=(0, 1),
                        on_chunk=lambda c, reused: events.append(reused))
    assert not any(events)
    ref = exact_topk(queries, docs, 8, doc_order=order)
    assert s.tobytes() == ref[0].tobytes() and i.tobytes() == ref[1].tobytes()


def test_unequal_query_chunks_across_ranks_are_refused() -> None:
    queries, docs, _ = tied_case(7, 60, n_queries=8)
    group = ThreadGroup(2)
    with pytest.raises(RuntimeError, match="same queries"):
        group.run(lambda r, g: sharded_topk(queries[: 8 - r], docs, 3, all_gather=g, rank_world=(r, 2)))


# ------------------------------------------------------------------------------------------- real gloo processes


def _write_case(root: Path, name: str, queries, docs, k, memory_mb, chunk, order=None, resume=False, bf16=False):
    case = root / name
    case.mkdir(parents=True)
    np.save(case / "queries.npy", queries)
    np.save(case / ("docs_bf16.npy" if bf16 else "docs.npy"), float32_to_bfloat16(docs) if bf16 else docs)
    if order is not None:
        np.save(case / "order.npy", order)
    (case / "params.json").write_text(json.dumps({"k": k, "memory_mb": memory_mb, "chunk": chunk, "resume": resume}))
    values = Bfloat16Rows(float32_to_bfloat16(docs))[:] if bf16 else docs
    return exact_topk(queries, values.astype(np.float32), k, memory_mb=memory_mb, doc_order=order)


def _launch(world: int, data: Path, out: Path, kill_after: int | None = None) -> list[int]:
    init = data.parent / f"init-{world}-{kill_after}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--world", str(world), "--init", str(init), "--data", str(data),
           "--out", str(out)] + ([] if kill_after is None else ["--kill-after", str(kill_after)])
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    codes = []
    for p in procs:
        try:
            p.wait(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        codes.append(p.returncode)
        if p.returncode not in (0, -9):
            raise AssertionError(p.stderr.read())
    return codes


@pytest.mark.slow
def test_gloo_processes_two_and_three_ranks_and_kill9_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    q, d, order = tied_case(11, 301, n_queries=30)
    refs = {"a_ties": _write_case(data, "a_ties", q, d, 17, 0.004, 8, order)}
    q2, d2, _ = tied_case(12, 50, n_queries=9)
    refs["b_k_beyond_shard"] = _write_case(data, "b_k_beyond_shard", q2, d2, 40, 1024, 4)
    rng = np.random.default_rng(3)
    d3 = rng.standard_normal((700, 12)).astype(np.float32)
    refs["c_bf16"] = _write_case(data, "c_bf16", rng.standard_normal((15, 12)).astype(np.float32), d3, 25, 0.01, 6,
                                 bf16=True)
    q4, d4, order4 = tied_case(13, 257, n_queries=33)
    refs["z_resume"] = _write_case(data, "z_resume", q4, d4, 10, 1024, 5, order4, resume=True)

    killed = _launch(3, data, tmp_path / "out3", kill_after=3)
    assert killed == [-9, -9, -9]
    work = data / "z_resume" / "work"
    assert len(list(work.glob("chunk-*.npy"))) >= 3  # chunks 0..2 at least (rank 0 writes before the hook)
    assert _launch(2, data, tmp_path / "out2") == [0, 0]
    for out, world in ((tmp_path / "out3", 3), (tmp_path / "out2", 2)):
        for name, (ref_s, ref_i) in refs.items():
            if name == "z_resume" and world == 3:
                continue  # killed mid-way
            for r in range(world):
                got = np.load(out / name / f"rank{r}.npz")
                assert got["scores"].tobytes() == ref_s.tobytes(), (name, world, r)
                assert got["idx"].tobytes() == ref_i.tobytes(), (name, world, r)
    events = json.loads((tmp_path / "out2" / "z_resume" / "rank1.json").read_text())
    assert [c for c, reused in events if reused][:3] == [0, 1, 2] and not events[-1][1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_dense_teacher_under_torchrun_env_shards_and_matches_one_process(tiny_bert_dir, tmp_path: Path) -> None:
    """``torchrun``-style environment, no process group yet: the teacher creates a gloo group, both ranks encode
    their shards and search their half of the corpus; every rank returns the 1-process table."""
    script = Path(__file__).parent / "scripts" / "dense_sharded.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CACHE_DTYPE": "float16"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    subprocess.run([sys.executable, str(script), str(tiny_bert_dir), str(tmp_path / "c1"), str(tmp_path / "o1")],
                   env=env, check=True, timeout=180)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_bert_dir), str(tmp_path / "c2"),
                               str(tmp_path / "o2")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    one = np.load(tmp_path / "o1" / "rank0.npz")
    for r in (0, 1):
        got = np.load(tmp_path / "o2" / f"rank{r}.npz")
        assert int(got["world"]) == 2 and int(one["world"]) == 1
        for name in ("scores", "idx", "pairs"):
            assert got[name].tobytes() == one[name].tobytes(), (r, name)
    assert not any((tmp_path / "c2" / "search").glob("*/chunk-*")), "resume chunks are removed after the search"


def test_resident_shard_crosses_once_for_all_query_chunks(monkeypatch) -> None:
    """With a device backend, a shard that fits the budget is uploaded once for the whole search (every query chunk
    reuses it); a shard cut into several blocks crosses once per query chunk."""
    from nvr.search import sharded
    from nvr.search.exact import TorchKnn

    backends: list[TorchKnn] = []

    def make(use_gpu):
        backends.append(TorchKnn("cpu"))
        return backends[-1]

    monkeypatch.setattr(sharded, "_coarse_backend", make)
    rng = np.random.default_rng(9)
    docs = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    ref = exact_topk(queries, docs, 7)
    for memory_mb, per_chunk in ((64, False), (0.05, True)):
        backends.clear()
        out = run_sharded(2, queries, docs, 7, memory_mb=memory_mb, chunk_queries=10)
        assert all(s.tobytes() == ref[0].tobytes() and i.tobytes() == ref[1].tobytes() for s, i in out)
        assert len(backends) == 2
        for b in backends:
            shard_bytes = 1500 * 16 * 4
            assert b.doc_bytes == shard_bytes * (5 if per_chunk else 1)
