"""Random teacher (paper Table 1 "random" row) and the dense-teacher switches add_eos / bidirectional /
trust_remote_code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig
from nvr.data.beir import load_beir, positives_from_qrels
from nvr.mining.build import build_candidate_table
from nvr.mining.mined_set import load_mined
from nvr.mining.pipeline import make_teacher, mine
from nvr.teachers.random import RandomTeacher, random_scores, sample_docs
from nvr.utils.errors import ConfigError

RANDOM = TeacherConfig(name="random", kind="random")


# ------------------------------------------------------------------------------------------------ sampling
def test_sample_docs_is_deterministic_distinct_and_prefix_stable() -> None:
    a = sample_docs(7, "q1", 1000, 40)
    np.testing.assert_array_equal(a, sample_docs(7, "q1", 1000, 40))
    assert len(set(a.tolist())) == 40 and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, sample_docs(7, "q2", 1000, 40)), "each query has its own draw"
    assert not np.array_equal(a, sample_docs(8, "q1", 1000, 40)), "the seed changes the draw"
    np.testing.assert_array_equal(sample_docs(7, "q1", 1000, 400)[:40], a)  # widening only adds candidates
    whole = sample_docs(7, "q1", 30, 30)  # more than half the corpus: one permutation
    assert sorted(whole.tolist()) == list(range(30))
    np.testing.assert_array_equal(sample_docs(7, "q1", 30, 20), whole[:20])
    with pytest.raises(ValueError, match="cannot draw"):
        sample_docs(7, "q1", 5, 6)


def test_sample_docs_is_uniform_over_docs_and_draw_positions() -> None:
    """Chi-square sanity over 3000 queries: every doc equally likely overall and as the first draw."""
    num_docs, n, queries = 50, 5, 3000
    draws = np.stack([sample_docs(0, f"q{i}", num_docs, n) for i in range(queries)])
    for counts in (np.bincount(draws.ravel(), minlength=num_docs), np.bincount(draws[:, 0], minlength=num_docs)):
        expected = counts.sum() / num_docs
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 100.0, f"chi2={chi2:.1f} with 49 dof (mean 49, sd 9.9): not uniform"


def test_random_scores_are_sorted_uniform_values() -> None:
    s = random_scores(3, "q", 2000)
    assert s.dtype == np.float32 and np.all(np.diff(s) <= 0) and 0 <= s.min() and s.max() < 1
    assert abs(float(s.mean()) - 0.5) < 0.03
    np.testing.assert_array_equal(s, random_scores(3, "q", 2000))


# ---------------------------------------------------------------------------------------- candidate tables
@pytest.fixture(scope="module")
def beir(tiny_beir_dir):
    ds = load_beir(tiny_beir_dir, "train")
    positives = positives_from_qrels(ds.qrels, ds.queries, 1, corpus=ds.corpus)
    queries = ds.queries.subset(q for q in ds.queries.ids if q in positives)
    return queries, {q: list(positives[q]) for q in queries.ids}, ds.corpus


def test_rank_corpus_pads_past_the_corpus_and_leaves_positives_unscored(beir) -> None:
    queries, _, corpus = beir
    teacher = RandomTeacher(RANDOM, seed=1)
    k = len(corpus) + 3
    pair_idx = np.array([[0, 5]] * 2)
    scores, idx, pair_scores = teacher.rank_corpus(queries.texts[:2], corpus, k, pair_idx,
                                                   query_ids=queries.ids[:2])
    assert idx.shape == scores.shape == (2, k)
    assert sorted(idx[0, : len(corpus)].tolist()) == list(range(len(corpus)))
    assert (idx[:, len(corpus) :] == -1).all() and np.isnan(scores[:, len(corpus) :]).all()
    assert np.isnan(pair_scores).all() and pair_scores.shape == (2, 2)
    with pytest.raises(ValueError, match="needs query_ids"):
        teacher.rank_corpus(queries.texts[:2], corpus, 4, pair_idx)


def test_table_flags_positives_and_rows_do_not_depend_on_other_queries(beir, tmp_path) -> None:
    queries, positives, corpus = beir
    teacher = RandomTeacher(RANDOM, seed=5)
    table = build_candidate_table(teacher, queries.ids, queries.texts, positives, corpus, depth=20,
                                  cache_dir=tmp_path)
    assert table.cand_idx.shape == (len(queries), 22)
    for row, qid in enumerate(table.query_ids):
        pos_rows = {corpus.index[d] for d in positives[qid]}
        flagged = set(table.cand_idx[row][table.cand_is_positive[row]].tolist())
        assert flagged == pos_rows & set(table.cand_idx[row].tolist())
    assert np.isnan(table.pos_scores[table.pos_idx >= 0]).all()
    # a subset in another order gets the same rows: draws are keyed by query id, not by position
    rows = [3, 0]
    sub = build_candidate_table(teacher, queries.ids, queries.texts, positives, corpus, depth=20, rows=rows)
    np.testing.assert_array_equal(sub.cand_idx, table.cand_idx[rows])
    # the seed is part of the cache key: another seed is not served the cached table
    other = build_candidate_table(RandomTeacher(RANDOM, seed=6), queries.ids, queries.texts, positives, corpus,
                                  depth=20, cache_dir=tmp_path)
    assert not np.array_equal(other.cand_idx, table.cand_idx)
    assert len(list((tmp_path / "tables").iterdir())) == 2
    assert teacher.fingerprint != RandomTeacher(RANDOM, seed=6).settings_fingerprint


def test_make_teacher_needs_the_seed_for_random() -> None:
    assert isinstance(make_teacher(RANDOM, "unused", seed=3), RandomTeacher)
    with pytest.raises(ValueError, match="mining seed"):
        make_teacher(RANDOM, "unused")


# ------------------------------------------------------------------------------------------------- mining
def random_cfg(beir_dir: Path, out: Path, cache: Path, **kw) -> MineConfig:
    base = dict(data=DataSource(beir_dir=str(beir_dir)), teachers=[RANDOM], output_dir=str(out),
                cache_dir=str(cache), depth=10, max_depth=40, filter=FilterConfig(method="naive_topk"), seed=11)
    return MineConfig(**{**base, **kw})


def test_mine_random_negatives_excludes_positives_and_is_reproducible(tiny_beir_dir, tmp_path) -> None:
    out = mine(random_cfg(tiny_beir_dir, tmp_path / "a", tmp_path / "cache"))
    examples = load_mined(out)
    assert len(examples) == 10
    for ex in examples:
        assert len(ex.negative_ids) == 4 and not set(ex.negative_ids) & set(ex.positive_ids)
        assert set(ex.negative_teachers) == {"random"}
    again = mine(random_cfg(tiny_beir_dir, tmp_path / "b", tmp_path / "fresh_cache"))
    assert (out / "mined.jsonl").read_bytes() == (again / "mined.jsonl").read_bytes()
    reseeded = load_mined(mine(random_cfg(tiny_beir_dir, tmp_path / "c", tmp_path / "cache", seed=12)))
    assert [e.negative_ids for e in reseeded] != [e.negative_ids for e in examples]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teachers"][0]["kind"] == "random"


def test_positive_aware_filter_with_random_teacher_is_a_config_error(tiny_beir_dir, tmp_path) -> None:
    cfg = random_cfg(tiny_beir_dir, tmp_path / "out", tmp_path / "cache", filter=FilterConfig(method="topk_percpos"))
    with pytest.raises(ConfigError, match="naive_topk") as err:
        mine(cfg)
    assert err.value.key == "filter.method"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ dense-teacher switches
def test_add_eos_bidirectional_and_remote_code_change_embeddings_and_fingerprint(tiny_mistral_dir, tmp_path) -> None:
    from nvr.teachers.dense import DenseTeacher

    def teacher(**kw) -> DenseTeacher:
        cfg = TeacherConfig(name="m", model_name_or_path=str(tiny_mistral_dir), pooling="last_token",
                            device="cpu", query_max_length=16, passage_max_length=16, **kw)
        return DenseTeacher(cfg, tmp_path)

    texts = ["wing lift drag", "heat transfer boundary layer"]
    plain, eos, bidir = teacher(), teacher(add_eos=True), teacher(bidirectional=True)
    assert eos.embedder.config.add_eos and bidir.embedder.config.bidirectional
    base = plain.encode_passages(texts)
    assert not np.allclose(base, eos.encode_passages(texts)), "the appended EOS must be the pooled token"
    assert not np.allclose(base, bidir.encode_passages(texts))
    fingerprints = {plain.fingerprint, eos.fingerprint, bidir.fingerprint, teacher(trust_remote_code=True).fingerprint}
    assert len(fingerprints) == 4
    # memoized fingerprints are keyed by these settings too: fresh teachers read back their own value
    assert teacher(add_eos=True).fingerprint == eos.fingerprint
    assert teacher().fingerprint == plain.fingerprint
    batch = eos.embedder.tokenize(texts, 16)
    eos_id = eos.embedder.tokenizer.eos_token_id
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][np.arange(2), lengths - 1] == eos_id).all()
