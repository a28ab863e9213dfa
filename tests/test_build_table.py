from __future__ import annotations

import numpy as np
import pytest

from nvr.config.mining import CrossEncoderConfig, TeacherConfig
from nvr.data.beir import Corpus, load_beir, positives_from_qrels
from nvr.mining.build import build_candidate_table, mark_positives
from nvr.search.exact import doc_id_order
from nvr.search.table import CandidateTable


class VectorTeacher:
    """Teacher over fixed embeddings (one per doc text / query text), counting its searches."""

    name = "vec"
    settings_fingerprint = "vec-v1"

    def __init__(self, doc_vecs: np.ndarray, query_vecs: dict[str, np.ndarray]) -> None:
        self.doc_vecs = doc_vecs
        self.query_vecs = query_vecs
        self.calls = 0

    def rank_corpus(self, query_texts, corpus, k, pair_idx, doc_order=None, memory_mb=1024):
        from nvr.search.exact import exact_topk, score_pairs

        self.calls += 1
        q = np.stack([self.query_vecs[t] for t in query_texts])
        s, i = exact_topk(q, self.doc_vecs, k, memory_mb=memory_mb, doc_order=doc_order)
        rows = np.broadcast_to(np.arange(len(q))[:, None], pair_idx.shape)
        return s, i, score_pairs(q, self.doc_vecs, rows, pair_idx)


def toy_setup():
    ids = ["p0", "dup", "n1", "n2", "n3", "n4", "p1"]
    texts = ["Wing  LIFT", "wing lift", "drag", "heat", "shock", "nozzle", "flutter"]
    corpus = Corpus(ids, [""] * len(ids), texts)
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(len(ids), 8)).astype(np.float32)
    docs[1] = docs[0] + 0.01 * docs[5]  # near-identical embedding of a near-identical text
    queries = {"qa": docs[4] + 0.5 * docs[0], "qb": docs[2] + docs[6]}
    return corpus, docs, queries


def test_flags_positives_and_duplicates_and_scores_positives(tmp_path) -> None:
    corpus, docs, queries = toy_setup()
    teacher = VectorTeacher(docs, queries)
    positives = {"qa": ["p0"], "qb": ["p1", "n1"]}
    table = build_candidate_table(teacher, ["qa", "qb"], ["qa", "qb"], positives, corpus, depth=3, cache_dir=tmp_path)
    assert table.depth == 3 + 2 and table.teacher == "vec"
    qa = dict(zip(table.cand_idx[0].tolist(), table.cand_is_positive[0].tolist()))
    assert qa[0] and qa[1], "the positive and its normalized-text duplicate are both flagged"
    assert sum(qa.values()) == 2
    qb_flags = {corpus.ids[d] for d, f in zip(table.cand_idx[1], table.cand_is_positive[1]) if f}
    assert qb_flags == {"p1", "n1"}
    assert (table.pos_idx == np.array([[0, -1], [6, 2]])).all()
    expected = np.array([[queries["qa"] @ docs[0], np.nan], [queries["qb"] @ docs[6], queries["qb"] @ docs[2]]])
    np.testing.assert_allclose(table.pos_scores, expected, rtol=1e-6)
    # candidate scores equal the explicit positive scores bit for bit
    where = table.cand_idx[0].tolist().index(0)
    assert table.cand_scores[0, where] == table.pos_scores[0, 0]
    assert (np.diff(table.cand_scores, axis=1) <= 0).all()

    again = build_candidate_table(teacher, ["qa", "qb"], ["qa", "qb"], positives, corpus, depth=3, cache_dir=tmp_path)
    assert teacher.calls == 1, "the second build must come from the table cache"
    np.testing.assert_array_equal(again.cand_idx, table.cand_idx)


def test_subset_rebuild_at_larger_depth(tmp_path) -> None:
    corpus, docs, queries = toy_setup()
    teacher = VectorTeacher(docs, queries)
    positives = {"qa": ["p0"], "qb": ["p1"]}
    full = build_candidate_table(teacher, ["qa", "qb"], ["qa", "qb"], positives, corpus, depth=2, cache_dir=tmp_path)
    wide = build_candidate_table(
        teacher, ["qa", "qb"], ["qa", "qb"], positives, corpus, depth=5, cache_dir=tmp_path, rows=[1]
    )
    assert wide.query_ids == ["qb"] and wide.depth == 6 and teacher.calls == 2
    np.testing.assert_array_equal(wide.cand_idx[0, : full.depth], full.cand_idx[1])
    assert (wide.cand_idx[0] >= 0).all() and len(set(wide.cand_idx[0].tolist())) == 6


def test_mark_positives_ignores_padding() -> None:
    corpus = Corpus(["a", "b", "c"], ["", "", ""], ["x", "X ", "y"])
    flags = mark_positives(np.array([[2, 1, -1]]), np.array([[0, -1]]), corpus)
    assert flags.tolist() == [[False, True, False]]


def test_unknown_positive_is_a_clear_error() -> None:
    corpus, docs, queries = toy_setup()
    with pytest.raises(ValueError, match="'nope' of query 'qa' is not in the corpus"):
        build_candidate_table(VectorTeacher(docs, queries), ["qa"], ["qa"], {"qa": ["nope"]}, corpus, depth=2)


def test_dense_teacher_table_on_tiny_beir(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    from nvr.teachers.dense import DenseTeacher

    data = load_beir(tiny_beir_dir, "train")
    positives = positives_from_qrels(data.qrels, data.queries)
    qids = list(positives)
    texts = [data.queries.text(q) for q in qids]
    cfg = TeacherConfig(name="tiny", model_name_or_path=str(tiny_bert_dir), device="cpu", batch_size=16,
                        query_max_length=16, passage_max_length=32)
    teacher = DenseTeacher(cfg, tmp_path)
    table = build_candidate_table(teacher, qids, texts, positives, data.corpus, depth=8, memory_mb=0.01,
                                  cache_dir=tmp_path)
    q = teacher.encode_queries(texts)
    d = teacher.encode_passages(data.corpus.passages())
    full = q.astype(np.float64) @ d.astype(np.float64).T
    ref = np.lexsort((np.broadcast_to(doc_id_order(data.corpus.ids), full.shape), -full.astype(np.float32)))
    np.testing.assert_array_equal(table.cand_idx, ref[:, : table.depth])
    rows = np.arange(len(qids))[:, None]
    valid = table.pos_idx >= 0
    np.testing.assert_allclose(table.pos_scores[valid], np.broadcast_to(full[rows, np.maximum(table.pos_idx, 0)],
                                                                         valid.shape)[valid], rtol=1e-5)
    for r, qid in enumerate(qids):
        flagged = {data.corpus.ids[i] for i, f in zip(table.cand_idx[r], table.cand_is_positive[r]) if f}
        assert flagged <= set(positives[qid]) | duplicates_of(data.corpus, positives[qid])
        assert {p for p in positives[qid] if data.corpus.index[p] in table.cand_idx[r]} <= flagged


def duplicates_of(corpus: Corpus, doc_ids: list[str]) -> set[str]:
    from nvr.data.text import text_key

    keys = {text_key(corpus.passage(corpus.index[d])) for d in doc_ids}
    return {corpus.ids[i] for i in range(len(corpus)) if text_key(corpus.passage(i)) in keys}


@pytest.fixture(scope="module")
def tiny_cross_encoder_dir(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from nvr.testing import make_tiny_tokenizer, vocabulary

    out = tmp_path_factory.mktemp("tiny_ce")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocabulary()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    make_tiny_tokenizer(out, "bert")
    return out


def test_cross_encoder_rescoring_resorts_rows(tiny_cross_encoder_dir) -> None:
    from nvr.teachers.cross_encoder import CrossEncoderRescorer

    ids = ["d0", "d1", "d2", "d3", "d4"]
    texts = ["wing lift drag", "heat transfer", "shock wave supersonic", "rocket nozzle thrust", "wing lift drag"]
    corpus = Corpus(ids, [""] * 5, texts)
    table = CandidateTable(
        teacher="vec", query_ids=["q0", "q1"], doc_ids=ids,
        cand_idx=np.array([[1, 2, 3, 0], [3, 0, 4, -1]]), cand_scores=np.array([[4, 3, 2, 1], [3, 2, 1, np.nan]],
                                                                              dtype=np.float32),
        cand_is_positive=np.array([[False, False, False, True], [False, True, True, False]]),
        pos_idx=np.array([[0, -1], [0, 2]]), pos_scores=np.ones((2, 2), dtype=np.float32),
    )
    rescorer = CrossEncoderRescorer(CrossEncoderConfig(model_name_or_path=str(tiny_cross_encoder_dir),
                                                       batch_size=3, device="cpu"))
    seen: list[int] = []
    real_score = rescorer.score

    def spy(queries, passages):
        seen.append(len(set(queries)))
        return real_score(queries, passages)

    rescorer.score = spy
    query_texts = ["wing lift", "rocket thrust"]
    out = rescorer.rescore(table, query_texts, corpus)
    assert seen == [2], "all pairs of all queries go through one batched scoring pass"
    assert out.teacher == "vec+ce"
    direct = real_score([query_texts[0]] * 4, corpus.passages([1, 2, 3, 0]))
    row0 = dict(zip(out.cand_idx[0].tolist(), out.cand_scores[0].tolist()))
    np.testing.assert_allclose([row0[d] for d in [1, 2, 3, 0]], direct, rtol=1e-5)
    assert (np.diff(out.cand_scores[:, :3], axis=1) <= 0).all() and (np.diff(out.cand_scores[0]) <= 0).all()
    assert out.cand_idx[1, 3] == -1 and np.isnan(out.cand_scores[1, 3])
    # flags travel with their documents; positives are rescored with the same pair scores
    for r in range(2):
        before = dict(zip(table.cand_idx[r].tolist(), table.cand_is_positive[r].tolist()))
        assert all(before[d] == f for d, f in zip(out.cand_idx[r].tolist(), out.cand_is_positive[r].tolist()))
    assert out.pos_scores[0, 0] == row0[0] and np.isnan(out.pos_scores[0, 1])
    # d0 and d4 have identical text: equal scores, tie broken by doc id (d0 first)
    row1 = out.cand_idx[1].tolist()
    assert row1.index(0) < row1.index(4)
    assert out.pos_scores[1, 0] == out.cand_scores[1, row1.index(0)]
    assert np.isfinite(out.pos_scores[1, 1]), "a positive outside the candidate list is still scored"
    assert out.cand_idx[0].tolist() != table.cand_idx[0].tolist(), "the fixture should exercise a re-sort"
