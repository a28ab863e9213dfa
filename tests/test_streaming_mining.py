"""Streaming mining (``stream_chunk_queries``): byte-identical to the in-memory path for any chunk size and under
torchrun (2 gloo ranks), chunk tables cached by the table key so a filter / sampler / ensemble sweep searches
nothing, resumable after kill -9 from the finished chunks, corrupted chunks recomputed, unsupported settings refused
up front."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nvr.config.mining import (
    CalibrateConfig,
    DataSource,
    FilterConfig,
    MineConfig,
    RelabelConfig,
    SamplerConfig,
    TeacherConfig,
)
from nvr.data.beir import load_beir
from nvr.mining import streaming
from nvr.mining.build import TextKeys, build_candidate_table, mark_positives
from nvr.mining.pipeline import content_config, mine, mining_fingerprint
from nvr.search.table import (
    CandidateTable,
    CorruptTableError,
    read_table_parquet,
    table_from_arrow,
    write_table_parquet,
)
from nvr.utils.errors import ConfigError

pytestmark = pytest.mark.slow

CHUNK_SIZES = (1, 3, 100)  # one query per chunk, a ragged last chunk, one chunk larger than Q (10 queries)


def bm25(**kw) -> TeacherConfig:
    return TeacherConfig(name="bm25", kind="bm25", **kw)


def dense(bert: Path, **kw) -> TeacherConfig:
    return TeacherConfig(name="tiny", model_name_or_path=str(bert), device="cpu", batch_size=4, dtype="float32", **kw)


def base_cfg(beir: Path, root: Path, teachers: list[TeacherConfig], **kw) -> MineConfig:
    base = dict(data=DataSource(beir_dir=str(beir)), teachers=teachers, output_dir=str(root / "memory"),
                cache_dir=str(root / "cache"), depth=4, max_depth=40, num_negatives=4,
                filter=FilterConfig(method="topk_percpos", perc=0.95))
    return MineConfig(**{**base, **kw})


def compare_outputs(memory: Path, stream: Path) -> None:
    """mined.jsonl, manifest.json, report.png byte-identical; report.json equal but for the run and stream info."""
    for name in ("mined.jsonl", "manifest.json", "report.png"):
        assert (memory / name).read_bytes() == (stream / name).read_bytes(), name
    a, b = (json.loads((p / "report.json").read_text()) for p in (memory, stream))
    a.pop("run")
    b.pop("run")
    assert b.pop("stream")["chunks"] >= 1
    assert a == b


CASES = {
    "naive_topk": lambda bert: dict(teachers=[bm25()], filter=FilterConfig(method="naive_topk")),
    "shifted_sampled": lambda bert: dict(teachers=[bm25()], filter=FilterConfig(method="topk_shifted", shift=2),
                                         sampler=SamplerConfig(method="sampled_topk", window=6)),
    "abs_top1_sampled_drop": lambda bert: dict(
        teachers=[bm25()], filter=FilterConfig(method="topk_abs", max_score=4.0),
        sampler=SamplerConfig(method="top1_sampled", window=5), shortfall="drop"),
    "dense_marginpos_widened": lambda bert: dict(teachers=[dense(bert)],
                                                 filter=FilterConfig(method="topk_marginpos", margin=0.01)),
    "dense_percpos_calibrated": lambda bert: dict(
        teachers=[dense(bert)], filter=FilterConfig(method="topk_percpos", calibrate=CalibrateConfig(value=0.8))),
    "cross_sample_keep_short": lambda bert: dict(
        teachers=[bm25(), dense(bert)], ensemble="cross_sample", num_negatives=6, max_depth=8,
        filter=FilterConfig(method="topk_percpos", perc=0.9)),
    "intra_nodedup": lambda bert: dict(teachers=[dense(bert), bm25(filter=FilterConfig(method="naive_topk"))],
                                       ensemble="intra_sample_nodedup"),
    "intra_dedup_random": lambda bert: dict(
        teachers=[TeacherConfig(name="random", kind="random"), bm25()], ensemble="intra_sample_dedup",
        filter=FilterConfig(method="naive_topk")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_output_is_byte_identical_for_any_chunk_size(case, tiny_beir_dir, tiny_bert_dir, tmp_path):
    cfg = base_cfg(tiny_beir_dir, tmp_path, **CASES[case](tiny_bert_dir))
    memory = mine(cfg)
    manifest = json.loads((memory / "manifest.json").read_text())
    for size in CHUNK_SIZES:
        out = mine(dataclasses.replace(cfg, output_dir=str(tmp_path / f"stream{size}"), stream_chunk_queries=size))
        compare_outputs(memory, out)
        assert not (tmp_path / "cache" / "stream" / manifest["fingerprint"]).exists()  # removed once written
        report = json.loads((out / "report.json").read_text())
        assert report["stream"]["chunks"] == -(-10 // size)
        for folder in map(Path, report["stream"]["table_cache"].values()):  # kept, keyed like the whole table
            key, chunks = folder.name.rsplit("-chunks", 1)
            assert chunks == str(size) and (folder.parent / key / "checksums.json").is_file()
            assert len(list(folder.glob("chunk-*.parquet"))) == report["stream"]["chunks"]
        for teacher in cfg.teachers:
            file = out / report["stream"]["candidates"][teacher.name]
            assert pq.ParquetFile(file).num_row_groups == report["stream"]["chunks"]
            assert pq.read_table(file, columns=["query_id"]).num_rows == 10
    if case == "dense_marginpos_widened":
        assert manifest["counts"]["widened"] > 0 and manifest["counts"]["recovered_by_widening"] > 0
    if case == "dense_percpos_calibrated":
        assert manifest["filters"]["tiny"]["calibration"]["positives_used"] > 0
    if case == "abs_top1_sampled_drop":
        assert manifest["counts"]["dropped_short"] > 0


def test_streaming_is_fingerprint_neutral(tiny_beir_dir, tmp_path):
    cfg = base_cfg(tiny_beir_dir, tmp_path, teachers=[bm25()])
    streamed = dataclasses.replace(cfg, stream_chunk_queries=7)
    assert content_config(streamed) == content_config(cfg)
    assert "stream_chunk_queries" not in content_config(streamed)
    assert mining_fingerprint(streamed) == mining_fingerprint(cfg)


def test_unsupported_settings_are_refused_before_any_work(tiny_beir_dir, tmp_path):
    with pytest.raises(ConfigError, match="stream_chunk_queries.*> 0"):
        base_cfg(tiny_beir_dir, tmp_path, teachers=[bm25()], stream_chunk_queries=0)
    with pytest.raises(ConfigError, match="stream_chunk_queries.*audit"):
        base_cfg(tiny_beir_dir, tmp_path, teachers=[bm25()], stream_chunk_queries=2, audit=True)
    with pytest.raises(ConfigError, match="stream_chunk_queries.*relabel"):
        base_cfg(tiny_beir_dir, tmp_path, teachers=[bm25()], stream_chunk_queries=2,
                 relabel=RelabelConfig(model_name_or_path="judge"))
    from nvr.cli.mine import main

    with pytest.raises(ConfigError, match="stream_chunk_queries.*fn_report"):
        main(["--data.beir_dir", str(tiny_beir_dir), "--teachers", '[{"name": "b", "kind": "bm25"}]',
              "--output_dir", str(tmp_path / "cli"), "--cache_dir", str(tmp_path / "cache"),
              "--stream_chunk_queries", "2", "--fn_report"])
    assert not (tmp_path / "cli").exists() and not (tmp_path / "cache" / "stream").exists()


def count_searches(monkeypatch) -> list[str]:
    """Every teacher search (``rank_corpus`` of BM25, dense and random teachers) appends the teacher's name."""
    from nvr.teachers.bm25 import BM25Teacher
    from nvr.teachers.dense import DenseTeacher
    from nvr.teachers.random import RandomTeacher

    calls: list[str] = []
    for cls in (BM25Teacher, DenseTeacher, RandomTeacher):
        def counted(self, *a, _search=cls.rank_corpus, **kw):
            calls.append(self.name)
            return _search(self, *a, **kw)

        monkeypatch.setattr(cls, "rank_corpus", counted)
    return calls


def test_filter_sampler_ensemble_sweep_reuses_every_chunk_table(tiny_beir_dir, tiny_bert_dir, tmp_path,
                                                                 monkeypatch):
    calls = count_searches(monkeypatch)
    first = base_cfg(tiny_beir_dir, tmp_path, teachers=[dense(tiny_bert_dir), bm25()], max_depth=4,
                     ensemble="intra_sample_nodedup", output_dir=str(tmp_path / "s0"), stream_chunk_queries=3)
    stats = json.loads((mine(first) / "report.json").read_text())["stream"]
    assert stats["tables_built"] == 8 and stats["tables_reused"] == 0 and sorted(set(calls)) == ["bm25", "tiny"]
    sweep = {
        "cross_marginpos_sampled": dict(ensemble="cross_sample", filter=FilterConfig(method="topk_marginpos",
                                                                                      margin=0.05),
                                        sampler=SamplerConfig(method="sampled_topk", window=5)),
        "dense_only_calibrated": dict(teachers=[dense(tiny_bert_dir)], ensemble="none", filter=FilterConfig(
            method="topk_percpos", calibrate=CalibrateConfig(value=0.8))),
        "bm25_only_shifted": dict(teachers=[bm25()], ensemble="none",
                                  filter=FilterConfig(method="topk_shifted", shift=1)),
    }
    for name, change in sweep.items():
        calls.clear()
        streamed = dataclasses.replace(first, output_dir=str(tmp_path / name), **change)
        out = mine(streamed)
        assert calls == [], name  # no teacher searched: every chunk table came from the cache
        stats = json.loads((out / "report.json").read_text())["stream"]
        assert stats["tables_built"] == 0 and stats["tables_reused"] == 4 * len(streamed.teachers), name
        compare_outputs(mine(dataclasses.replace(streamed, output_dir=str(tmp_path / f"{name}-memory"),
                                                 stream_chunk_queries=None)), out)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the 1-process reference with the ranks' thread count: the world size must not change the output, but
    the intra-op thread count may change fp32 matmul rounding (seen on AVX-512 CPUs, 1 ulp -> a 6th-decimal score)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream_script():
    path = Path(__file__).parent / "scripts" / "stream_mine.py"
    spec = importlib.util.spec_from_file_location("stream_mine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_torchrun_two_gloo_ranks_match_one_process(tiny_beir_dir, tiny_bert_dir, tmp_path):
    """2 ranks (torchrun environment, the group created by the run): both encode and search, rank 0 writes; the
    output equals the 1-process in-memory run's, widening included; a second run with another filter reuses every
    chunk table under torchrun too."""
    script, module = _stream_script()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cache = tmp_path / "cache-2"
    for filter_name in ("marginpos", "percpos"):
        out = tmp_path / f"stream-{filter_name}"
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, str(script), str(tiny_beir_dir), str(out), str(cache),
                                   str(tiny_bert_dir), "3", filter_name], stderr=subprocess.PIPE, text=True,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
        if filter_name == "marginpos":  # each rank searched its half of the corpus, chunk by chunk
            assert all(f"rank {r}/2:" in err for r, err in enumerate(errors)), errors[1][-3000:]
        with torch_threads(1):  # as each rank (OMP_NUM_THREADS=1): on AVX-512 fp32 sums depend on the thread count
            memory = mine(module.config(str(tiny_beir_dir), str(tmp_path / f"memory-{filter_name}"),
                                        str(tmp_path / "cache-1"), str(tiny_bert_dir), None, filter_name))
        compare_outputs(memory, out)
        stats = json.loads((out / "report.json").read_text())["stream"]
        if filter_name == "marginpos":
            assert json.loads((memory / "manifest.json").read_text())["counts"]["widened"] > 0
            assert stats["tables_built"] == 8 and stats["tables_reused"] == 0
        else:
            assert stats["tables_built"] == 0 and stats["tables_reused"] == 8
    shards = list((cache / "embeddings").rglob("*.npy"))
    assert shards, "the ranks encoded through the shared embedding cache"


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_and_recomputes_a_corrupted_chunk(tiny_beir_dir, tmp_path, monkeypatch, caplog):
    cfg = base_cfg(tiny_beir_dir, tmp_path, teachers=[bm25()])
    memory = mine(cfg)
    streamed = dataclasses.replace(cfg, output_dir=str(tmp_path / "stream"), stream_chunk_queries=3)
    saved: list[tuple[str, int]] = []

    def stop_after_two(phase: str, chunk: int) -> None:
        saved.append((phase, chunk))
        if phase == "chunk" and chunk == 1:
            raise Interrupt

    monkeypatch.setattr(streaming, "chunk_saved", stop_after_two)
    with pytest.raises(Interrupt):
        mine(streamed)
    assert not Path(streamed.output_dir).exists()
    work = tmp_path / "cache" / "stream" / json.loads((memory / "manifest.json").read_text())["fingerprint"]
    assert sorted(p.name for p in work.glob("mined-*.jsonl")) == ["mined-000000.jsonl", "mined-000001.jsonl"]
    with open(work / "mined-000001.jsonl", "r+b") as fh:  # same size, other bytes
        fh.write(b"X")
    (table_dir,) = (tmp_path / "cache" / "tables").glob("*-chunks3")
    (table_dir / "chunk-000002.parquet").write_bytes(b"garbage")
    monkeypatch.setattr(streaming, "chunk_saved", lambda phase, chunk: saved.append((phase, chunk)))
    saved.clear()
    with caplog.at_level(logging.WARNING, logger="nvr.mining.streaming"):
        out = mine(streamed)
    compare_outputs(memory, out)
    stats = json.loads((out / "report.json").read_text())["stream"]
    assert stats["tables_reused"] == 3 and stats["tables_built"] == 1  # tables 0, 1, 3 reused; 2 rebuilt
    assert stats["chunks_reused"] == 1  # chunk 0
    assert saved == [("tables", 2), ("chunk", 1), ("chunk", 2), ("chunk", 3)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("chunk 1" in w and "mined-000001.jsonl" in w for w in warnings)
    assert any("chunk 2" in w and "chunk-000002.parquet" in w for w in warnings)


KILL_DRIVER = """
import os, signal, sys
from nvr.mining import streaming
from nvr.mining.pipeline import mine
from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig

def kill_after_two(phase, chunk):
    if phase == "chunk" and chunk == 1:
        os.kill(os.getpid(), signal.SIGKILL)

streaming.chunk_saved = kill_after_two
beir, out, cache, bert = sys.argv[1:5]
mine(MineConfig(data=DataSource(beir_dir=beir), output_dir=out, cache_dir=cache, depth=4, max_depth=40,
                teachers=[TeacherConfig(name="tiny", model_name_or_path=bert, device="cpu", batch_size=4,
                                        dtype="float32"), TeacherConfig(name="bm25", kind="bm25")],
                ensemble="intra_sample_nodedup", filter=FilterConfig(method="topk_percpos", perc=0.95),
                stream_chunk_queries=4))
"""


def test_kill9_mid_run_resumes_from_the_finished_chunks(tiny_beir_dir, tiny_bert_dir, tmp_path):
    cfg = base_cfg(tiny_beir_dir, tmp_path, teachers=[dense(tiny_bert_dir), bm25()],
                   ensemble="intra_sample_nodedup")
    out = tmp_path / "stream"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(tiny_beir_dir), str(out), cfg.cache_dir,
                           str(tiny_bert_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    (work,) = [p for p in (Path(cfg.cache_dir) / "stream").iterdir() if p.is_dir()]
    assert len(list(work.glob("mined-*.jsonl"))) == 2
    assert len(list((Path(cfg.cache_dir) / "tables").glob("*-chunks4/chunk-*.parquet"))) == 6
    resumed = mine(dataclasses.replace(cfg, output_dir=str(out), stream_chunk_queries=4))
    stats = json.loads((resumed / "report.json").read_text())["stream"]
    assert stats == {**stats, "chunks": 3, "tables_reused": 6, "tables_built": 0, "chunks_reused": 2}
    compare_outputs(mine(cfg), resumed)


def test_chunk_tables_have_the_width_of_the_whole_table(tiny_beir_dir, tmp_path):
    from nvr.teachers.bm25 import BM25Teacher

    ds = load_beir(tiny_beir_dir, "train")
    ids = list(ds.queries.ids)
    positives = {q: list(d) for q, d in ds.qrels.items()}
    positives[ids[0]] = positives[ids[0]] + [ds.corpus.ids[-1], ds.corpus.ids[-2]]  # one query with 4 positives
    teacher = BM25Teacher(bm25())
    full = build_candidate_table(teacher, ids, ds.queries.texts, positives, ds.corpus, 5)
    part = build_candidate_table(teacher, ids, ds.queries.texts, positives, ds.corpus, 5, rows=[1, 2])
    wide = build_candidate_table(teacher, ids, ds.queries.texts, positives, ds.corpus, 5, rows=[1, 2],
                                 positive_slots=4, cache_dir=tmp_path)
    assert full.depth == 9 and part.depth == 7 and wide.depth == 9
    np.testing.assert_array_equal(wide.cand_idx, full.cand_idx[1:3])
    np.testing.assert_array_equal(wide.cand_scores, full.cand_scores[1:3])
    narrow = build_candidate_table(teacher, ids, ds.queries.texts, positives, ds.corpus, 5, rows=[1, 2],
                                   cache_dir=tmp_path)
    assert len(list((tmp_path / "tables").iterdir())) == 2 and narrow.depth == 7  # the width is in the key
    with pytest.raises(ValueError, match="positive_slots"):
        build_candidate_table(teacher, ids, ds.queries.texts, positives, ds.corpus, 5, positive_slots=1)


def test_table_parquet_round_trip_and_corruption(tmp_path):
    table = CandidateTable(
        teacher="t", query_ids=["a", "b"], doc_ids=["x", "y", "z"], cand_idx=np.array([[0, -1], [2, 1]]),
        cand_scores=np.array([[0.5, np.nan], [0.25, 0.125]], np.float32),
        cand_is_positive=np.array([[True, False], [False, False]]), pos_idx=np.array([[0], [1]]),
        pos_scores=np.array([[0.5], [np.nan]], np.float32))
    path = tmp_path / "t.parquet"
    write_table_parquet(table, path)
    back = read_table_parquet(path, table.doc_ids)
    assert back.teacher == "t" and back.query_ids == ["a", "b"] and back.depth == 2
    for name in ("cand_idx", "cand_scores", "cand_is_positive", "pos_idx", "pos_scores"):
        np.testing.assert_array_equal(getattr(back, name), getattr(table, name))
        assert getattr(back, name).dtype == getattr(table, name).dtype
    positives = read_table_parquet(path, table.doc_ids, columns=["pos_idx", "pos_scores"])
    assert positives.cand_idx.shape == (2, 0) and positives.pos_idx.tolist() == [[0], [1]]
    with pytest.raises(ValueError, match="not an nvr candidate table"):
        table_from_arrow(pq.read_table(path).replace_schema_metadata({}), table.doc_ids)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptTableError, match="t.parquet"):
        read_table_parquet(path, table.doc_ids)


def test_shared_text_keys_flag_like_fresh_ones_and_hash_each_document_once(tiny_beir_dir, monkeypatch):
    from nvr.mining import build

    corpus = load_beir(tiny_beir_dir, "train").corpus
    cand, pos = np.array([[0, 1, 2, -1], [2, 3, 4, 5]]), np.array([[1, -1], [5, -1]])
    queries = [corpus.passage(2), corpus.texts[4]]  # row 0 asks doc 2's passage, row 1 doc 4's body
    shared = TextKeys(corpus)
    for rows in ([0], [1], [0, 1]):
        fresh = mark_positives(cand[rows], pos[rows], corpus, [queries[r] for r in rows])
        again = mark_positives(cand[rows], pos[rows], corpus, [queries[r] for r in rows], text_keys=shared)
        np.testing.assert_array_equal(fresh, again)
    assert again.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert int(shared.known.sum()) == 6
    hashed: list[str] = []
    monkeypatch.setattr(build, "text_key", lambda text: hashed.append(text) or "00" * 20)
    mark_positives(cand, pos, corpus, queries, text_keys=shared)
    assert hashed == queries  # the documents' keys came from the shared ones
