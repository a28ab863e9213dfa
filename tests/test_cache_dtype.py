"""Half-precision embedding storage (``cache_dtype``): stored and returned in that dtype, part of every key, the
search exact over the stored values, bad values refused with the key named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nvr.config.mining import TeacherConfig
from nvr.teachers.cache import (
    Bfloat16Rows,
    EmbeddingCache,
    bfloat16_to_float32,
    embedding_key,
    float32_to_bfloat16,
)
from nvr.utils.errors import ConfigError

TEXTS = [f"text number {i}" for i in range(11)]


def encoder(calls: list[int] | None = None, scale: float = 1.0):
    def encode(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(len(texts))
        rng = np.random.default_rng(abs(hash(tuple(texts))) % 2**32)
        return (scale * rng.standard_normal((len(texts), 8))).astype(np.float32)

    return encode


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stored_in_the_half_dtype_and_resumed(tmp_path, dtype: str) -> None:
    cache = EmbeddingCache(tmp_path)
    full = np.concatenate([encoder()(TEXTS[a : a + 4]) for a in range(0, len(TEXTS), 4)])
    out = cache.get_or_encode("k", TEXTS, encoder(), shard_size=4, dtype=dtype)
    if dtype == "float16":
        assert isinstance(out, np.memmap) and out.dtype == np.float16
        np.testing.assert_array_equal(out, full.astype(np.float16))
    else:
        assert isinstance(out, Bfloat16Rows) and out.bits.dtype == np.uint16 and out.shape == full.shape
        np.testing.assert_array_equal(out[:], bfloat16_to_float32(float32_to_bfloat16(full)))
    folder = cache.folder("k", TEXTS, dtype)
    assert folder != cache.folder("k", TEXTS), "the storage dtype is part of the folder identity"
    assert np.load(folder / "embeddings.npy", mmap_mode="r").itemsize == 2
    calls: list[int] = []
    again = cache.get_or_encode("k", TEXTS, encoder(calls), shard_size=4, dtype=dtype)
    assert calls == [] and np.array_equal(np.asarray(again[:], np.float32), np.asarray(out[:], np.float32))
    assert cache.get("k", TEXTS, dtype) is not None and cache.get("k", TEXTS) is None  # float32 never encoded


def test_a_shard_of_another_dtype_is_recomputed(tmp_path) -> None:
    """A float32 shard where float16 ones belong (a different cache version or a manual copy) is not used."""
    from nvr.utils.checksum import checksummed_file

    cache = EmbeddingCache(tmp_path)
    folder = cache.folder("k", TEXTS, "float16")
    folder.mkdir(parents=True)
    with checksummed_file(folder / "shard-00000.npy") as fh:
        np.save(fh, np.zeros((4, 8), np.float32))
    calls: list[int] = []
    out = cache.get_or_encode("k", TEXTS, encoder(calls), shard_size=4, dtype="float16")
    assert calls == [4, 4, 3] and out.dtype == np.float16 and np.abs(np.asarray(out[:4])).sum() > 0


def test_bfloat16_rounds_like_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 10000),
                        np.array([0.0, -0.0, 1.0, 3.0e38, -1.5e-39], np.float32)]).astype(np.float32)
    ours = bfloat16_to_float32(float32_to_bfloat16(x))
    theirs = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert ours.tobytes() == theirs.tobytes()


def test_bad_dtype_and_overflow_are_refused(tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(ValueError, match="cache dtype must be one of"):
        cache.get_or_encode("k", TEXTS, encoder(), dtype="int8")
    with pytest.raises(ValueError, match="overflow cache_dtype float16"):
        cache.get_or_encode("k", TEXTS, encoder(scale=1e6), dtype="float16")
    with pytest.raises(ConfigError, match=r"teachers\[t\]\.cache_dtype"):
        TeacherConfig(name="t", model_name_or_path="m", cache_dtype="float8")  # type: ignore[arg-type]


def test_dense_keys_cover_the_storage_dtype(tiny_bert_dir, tmp_path) -> None:
    from nvr.teachers.dense import DenseTeacher, dense_embedding_key

    base = TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir), device="cpu", dtype="float32")
    assert dense_embedding_key("m", base, "", 8, "float32") == embedding_key("m", "mean", "", 8, "float32"), \
        "float32 keys must stay what they were (existing caches stay valid)"
    keys = {d: dense_embedding_key("m", TeacherConfig(name="t", model_name_or_path="m", cache_dtype=d), "", 8,
                                   "float32") for d in ("float32", "float16", "bfloat16")}
    assert len(set(keys.values())) == 3
    prints = set()
    for d in ("float32", "float16", "bfloat16"):
        teacher = DenseTeacher(TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir), device="cpu",
                                             dtype="float32", cache_dtype=d), tmp_path)
        teacher._fingerprint = "fixed"
        prints.add(teacher.settings_fingerprint)
    assert len(prints) == 3, "the candidate-table key must change with the storage dtype"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dense_teacher_ranks_exactly_over_the_stored_vectors(tiny_bert_dir, tmp_path, dtype: str) -> None:
    from nvr.data.beir import Corpus
    from nvr.search.exact import doc_id_order, exact_topk
    from nvr.teachers.dense import DenseTeacher

    passages = ["wing lift drag", "heat transfer boundary layer", "shock wave", "rocket nozzle thrust", "wing",
                "lift of a thin wing", "supersonic shock", "nozzle flow"]
    corpus = Corpus(ids=[f"d{i}" for i in range(len(passages))], titles=[""] * len(passages), texts=passages)
    cfg = TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir), device="cpu", dtype="float32",
                        cache_dtype=dtype, passage_max_length=16, query_max_length=16)
    teacher = DenseTeacher(cfg, tmp_path)
    queries = ["wing lift", "shock nozzle"]
    order = doc_id_order(corpus.ids)
    scores, idx, pair = teacher.rank_corpus(queries, corpus, 5, np.array([[0], [2]]), order)
    stored = teacher.encode_passages(corpus.passages())
    values = np.asarray(stored[:], dtype=np.float32)
    ref = exact_topk(teacher.encode_queries(queries), values, 5, doc_order=order)
    assert scores.tobytes() == ref[0].tobytes() and idx.tobytes() == ref[1].tobytes()
    assert not (tmp_path / "search").exists() or not any((tmp_path / "search").iterdir()), "resume chunks removed"
    assert np.isfinite(pair).all()


@pytest.mark.slow
def test_mine_end_to_end_with_half_storage_and_hnsw(tiny_beir_dir, tiny_bert_dir, tmp_path) -> None:
    """``nvr mine`` with a float16 cache: a different mined-set address from float32, rows valid; the HNSW option
    on this tiny corpus (ef >= corpus) finds exactly what exact search finds."""
    from nvr.config.mining import DataSource, FilterConfig, MineConfig
    from nvr.mining.mined_set import load_mined
    from nvr.mining.pipeline import mine

    def run(name: str, **teacher_kw):
        teacher = TeacherConfig(name="tiny", model_name_or_path=str(tiny_bert_dir), device="cpu", batch_size=16,
                                dtype="float32", **teacher_kw)
        cfg = MineConfig(data=DataSource(beir_dir=str(tiny_beir_dir)), teachers=[teacher],
                         output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), depth=8, max_depth=40,
                         filter=FilterConfig(method="topk_percpos", perc=0.99))
        out = mine(cfg)
        return out, [(e.query_id, e.negative_ids) for e in load_mined(out)]

    out32, rows32 = run("f32")
    out16, rows16 = run("f16", cache_dtype="float16")
    outh, rowsh = run("hnsw", search="hnsw", search_params={"ef_search": 512})
    m32, m16, mh = (json.loads((o / "manifest.json").read_text()) for o in (out32, out16, outh))
    assert len({m32["fingerprint"], m16["fingerprint"], mh["fingerprint"]}) == 3
    assert [q for q, _ in rows16] == [q for q, _ in rows32] and any(n for _, n in rows16)
    assert rowsh == rows32, "HNSW searching the whole tiny corpus must give the exact mined set"
    assert not any((tmp_path / "cache" / "search").glob("*/chunk-*"))
