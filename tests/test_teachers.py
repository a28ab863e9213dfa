from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from nvr.teachers.cache import EmbeddingCache, embedding_key

TEXTS = [f"text number {i}" for i in range(10)]


class CountingEncoder:
    """Deterministic fake encoder that records each call and can crash after a number of calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_after = fail_after
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise RuntimeError("simulated crash")
            self.calls.append(texts)
        return np.array([[len(t), sum(map(ord, t)) % 97, i] for i, t in enumerate(texts)], dtype=np.float32)


def expected(texts: list[str], shard_size: int) -> np.ndarray:
    return np.concatenate([CountingEncoder()(texts[i : i + shard_size]) for i in range(0, len(texts), shard_size)])


def test_cache_resumes_after_crash_and_reuses(tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    key = embedding_key("model-a", "mean", "query: ", 64, "float32")
    crashing = CountingEncoder(fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.get_or_encode(key, TEXTS, crashing, shard_size=3)  # 4 shards, dies on the third
    folder = cache.folder(key, TEXTS)
    assert sorted(p.name for p in folder.glob("shard-*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    assert not list(folder.glob(".*tmp")), "no half-written temp files may remain"

    resumed = CountingEncoder()
    out = cache.get_or_encode(key, TEXTS, resumed, shard_size=3)
    assert resumed.calls == [TEXTS[6:9], TEXTS[9:]]  # only the missing shards
    np.testing.assert_array_equal(out, expected(TEXTS, 3))
    assert out.dtype == np.float32 and isinstance(out, np.memmap)

    again = CountingEncoder()
    np.testing.assert_array_equal(cache.get_or_encode(key, TEXTS, again, shard_size=3), out)
    assert again.calls == []


def test_cache_key_separates_settings_and_texts(tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    enc = CountingEncoder()
    cache.get_or_encode(embedding_key("m", "mean", "", 64, "float32"), TEXTS, enc, shard_size=5)
    cache.get_or_encode(embedding_key("m", "mean", "query: ", 64, "float32"), TEXTS, enc, shard_size=5)
    cache.get_or_encode(embedding_key("m", "mean", "", 64, "float32"), TEXTS[:-1] + ["changed"], enc, shard_size=5)
    assert len(enc.calls) == 6
    assert cache.get_or_encode("k", [], enc).shape == (0, 0)


def test_world_size_two_matches_world_size_one(tmp_path) -> None:
    texts = [f"passage {i}" for i in range(23)]
    single = EmbeddingCache(tmp_path / "one").get_or_encode("k", texts, CountingEncoder(), shard_size=4)

    cache = EmbeddingCache(tmp_path / "two", wait_timeout_s=30, poll_s=0.01)
    encoders = [CountingEncoder(), CountingEncoder()]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = cache.get_or_encode("k", texts, encoders[rank], shard_size=4, rank=rank, world_size=2)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert [c[0] for c in encoders[0].calls] == ["passage 0", "passage 8", "passage 16"]
    assert [c[0] for c in encoders[1].calls] == ["passage 4", "passage 12", "passage 20"]
    np.testing.assert_array_equal(results[0], single)
    np.testing.assert_array_equal(results[1], single)


def test_waiting_rank_times_out_with_clear_error(tmp_path) -> None:
    cache = EmbeddingCache(tmp_path, wait_timeout_s=0.2, poll_s=0.05)
    with pytest.raises(TimeoutError, match=r"rank 0: .*shard-00001.npy.*did a rank crash"):
        cache.get_or_encode("k", TEXTS, CountingEncoder(), shard_size=5, rank=0, world_size=2)


def test_shard_size_is_kept_out_of_the_key_and_a_resume_keeps_its_own(tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.get_or_encode("k", TEXTS, CountingEncoder(fail_after=2), shard_size=3)
    resumed = CountingEncoder()  # asks for shards of 4, but the folder was started with 3: its shards are reused
    out = cache.get_or_encode("k", TEXTS, resumed, shard_size=4)
    assert resumed.calls == [TEXTS[6:9], TEXTS[9:]]
    np.testing.assert_array_equal(out, expected(TEXTS, 3))
    finished = CountingEncoder()  # any shard size reuses the finished embeddings
    np.testing.assert_array_equal(cache.get_or_encode("k", TEXTS, finished, shard_size=10000), out)
    assert finished.calls == [] and len(list(tmp_path.iterdir())) == 1


def test_stale_temp_files_of_a_killed_run_are_removed_on_resume(tmp_path) -> None:
    import os

    from nvr.teachers import cache as cache_module

    cache = EmbeddingCache(tmp_path, wait_timeout_s=0.2, poll_s=0.05)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.get_or_encode("k", TEXTS, CountingEncoder(fail_after=1), shard_size=5)
    folder = cache.folder("k", TEXTS)
    stale, live = folder / ".shard-00001.npy.x1.tmp", folder / ".shard-00001.npy.x2.tmp"
    for tmp in (stale, live):
        tmp.write_bytes(b"half a shard")
    before = cache_module._PROCESS_START - 60
    os.utime(stale, (before, before))  # written before this process started: a killed run's leftover
    with pytest.raises(TimeoutError):  # 2 ranks: another rank may own any temp file, so none is touched
        cache.get_or_encode("k", TEXTS, CountingEncoder(), shard_size=5, rank=0, world_size=2)
    assert stale.exists() and live.exists()
    np.testing.assert_array_equal(cache.get_or_encode("k", TEXTS, CountingEncoder(), shard_size=5),
                                  expected(TEXTS, 5))
    assert not stale.exists()
    assert live.exists(), "a temp file written since this process started may belong to a live writer"


def test_teacher_shard_size_is_validated_and_reaches_the_cache(tiny_bert_dir, tmp_path) -> None:
    from nvr.config.mining import TeacherConfig
    from nvr.teachers.dense import DenseTeacher
    from nvr.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"teachers\[t\]\.shard_size.*must be > 0"):
        TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir), shard_size=0)
    cfg = TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir), shard_size=2, device="cpu")
    teacher = DenseTeacher(cfg, tmp_path)
    assert teacher.shard_size == 2 and DenseTeacher(cfg, tmp_path, shard_size=7).shard_size == 7
    calls: list[int] = []
    teacher.cache.get_or_encode = lambda key, texts, fn, shard_size, **kw: calls.append(shard_size)
    teacher._fingerprint = "fixed"  # no model load: only the shard size handed to the cache matters here
    teacher.encode_passages(["a", "b", "c"])
    assert calls == [2]


def test_encoder_with_wrong_shape_is_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="returned shape"):
        EmbeddingCache(tmp_path).get_or_encode("k", TEXTS, lambda t: np.zeros((1, 3)), shard_size=5)


def small_corpus():
    from nvr.data.beir import Corpus

    ids = ["d3", "d1", "d2", "d0", "a4"]
    titles = ["Wing lift", "", "Shock waves", "Heat", "Shock waves"]
    texts = [
        "lift and drag of a thin airfoil wing",
        "boundary layer heat transfer on a flat plate",
        "supersonic flow past a wedge produces an oblique shock",
        "",
        "supersonic flow past a wedge produces an oblique shock",
    ]
    return Corpus(ids, titles, texts)


def test_bm25_ranks_matching_doc_first_and_scores_pairs() -> None:
    from nvr.config.mining import TeacherConfig
    from nvr.teachers.bm25 import BM25Teacher

    corpus = small_corpus()
    teacher = BM25Teacher(TeacherConfig(name="bm25", kind="bm25"))
    with pytest.raises(RuntimeError, match="index"):
        _ = teacher.fingerprint
    teacher.index(corpus)
    queries = ["airfoil wing drag", "oblique shock supersonic", "unrelated zebra"]
    doc_order = np.argsort(np.argsort(corpus.ids))  # rank of each id in sorted order
    scores, idx = teacher.search(queries, 3, doc_order=doc_order)
    assert idx[0, 0] == 0 and scores[0, 0] > 0
    assert list(idx[0, 1:]) == [-1, -1] and np.isnan(scores[0, 1:]).all()  # no shared term: not a candidate
    assert list(idx[1, :2]) == [4, 2] and scores[1, 0] == scores[1, 1]  # tied duplicates: "a4" before "d2"
    assert (idx[2] == -1).all()
    pairs = teacher.score_pairs(queries, np.array([[0, 1], [4, -1], [0, -1]]))
    assert pairs[0, 0] == scores[0, 0] and pairs[0, 1] == 0.0 and pairs[1, 0] == scores[1, 1]
    assert np.isnan(pairs[1, 1]) and pairs[2, 0] == 0.0
    # the block size must not change results
    np.testing.assert_array_equal(teacher.search(queries, 3, doc_order, memory_mb=1e-5)[1], idx)
    fp = teacher.fingerprint
    corpus.append("d9", "", "another wing")
    teacher.index(corpus)
    assert teacher.fingerprint != fp


def test_dense_teacher_encodes_through_cache(tiny_bert_dir, tmp_path, monkeypatch) -> None:
    from nvr.config.mining import TeacherConfig
    from nvr.teachers.dense import DenseTeacher

    cfg = TeacherConfig(name="tiny", model_name_or_path=str(tiny_bert_dir), query_prefix="query :", batch_size=4,
                        query_max_length=16, passage_max_length=32, device="cpu", dtype="float32")
    teacher = DenseTeacher(cfg, tmp_path, shard_size=3)
    passages = ["wing lift drag", "heat transfer boundary layer", "shock wave", "rocket nozzle thrust", "wing"]
    docs = teacher.encode_passages(passages)
    assert docs.shape == (5, 32) and docs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, rtol=1e-5)
    queries = teacher.encode_queries(passages[:2])
    assert not np.allclose(queries, docs[:2]), "the query prefix must change the embedding"
    assert len(list((tmp_path / "embeddings").glob("*/embeddings.npy"))) == 2

    import nvr.modeling.encode as encode_mod
    import nvr.teachers.dense as dense_mod

    # an explicit dtype needs no device probe: ``dtype: auto`` + ``device: auto`` is the one case that imports torch
    auto = DenseTeacher(TeacherConfig(name="tiny", model_name_or_path=str(tiny_bert_dir), query_prefix="query :",
                                      query_max_length=16, passage_max_length=32, device="auto", dtype="float32"),
                        tmp_path, 3)
    monkeypatch.setattr(encode_mod, "encode_texts", lambda *a, **k: pytest.fail("cache miss"))
    monkeypatch.setattr(dense_mod, "pick_device", lambda d: pytest.fail("device resolved (imports torch)"))
    np.testing.assert_array_equal(auto.encode_passages(passages), docs)
    assert auto.fingerprint == teacher.fingerprint
    assert auto._embedder is None, "a cached re-run must not load the model"
    assert auto._device is None, "a cached re-run must not resolve the device (torch import)"
    on_cpu = DenseTeacher(dataclasses.replace(cfg, dtype="auto"), tmp_path, 3)
    assert on_cpu.dtype_label in ("float32", "autocast-bfloat16") and on_cpu._device is None
    monkeypatch.setattr(dense_mod, "pick_device", lambda d: "cpu")
    assert auto.device == "cpu"
    other = DenseTeacher(TeacherConfig(name="cls", model_name_or_path=str(tiny_bert_dir), pooling="cls"), tmp_path)
    assert other.fingerprint != teacher.fingerprint
