from __future__ import annotations

import gzip
import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nvr.data.beir import Corpus, Queries, load_beir, load_corpus, load_qrels, load_queries, positives_from_qrels
from nvr.data.jsonl import iter_jsonl
from nvr.data.pairs import load_pairs
from nvr.data.text import normalize_text, passage_text, text_key


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_qrels(path: Path, rows: list[tuple[str, str, int]]) -> Path:
    path.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows), "utf-8")
    return path


@pytest.fixture
def small_corpus() -> Corpus:
    return Corpus(["d1", "d2", "d3"], ["Wing", "", "Jet"], ["lift and drag", "heat transfer", "mixing layer"])


# --- text ---------------------------------------------------------------------------------------------------------


def test_passage_text_joins_title_and_text_and_handles_empty_parts() -> None:
    assert passage_text(" Title ", " body ") == "Title body"
    assert passage_text("Only title", "") == "Only title"
    assert passage_text("", "only body") == "only body"
    assert passage_text(None, None) == ""


def test_normalize_text_and_text_key_ignore_case_width_and_whitespace() -> None:
    assert normalize_text("  Ｈｅｌｌｏ\t\nWORLD  ß ") == "hello world ss"
    assert text_key("Hello  world") == text_key("hello world\n")
    assert text_key("hello world") != text_key("hello worlds")
    assert len(text_key("x")) == 40


# --- jsonl --------------------------------------------------------------------------------------------------------


def test_iter_jsonl_skips_blank_lines_and_numbers_lines_from_one(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_iter_jsonl_reads_gzip_and_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write('\ufeff{"a": "é"}\n{"b": 2}')
    assert list(iter_jsonl(path)) == [(1, {"a": "é"}), (2, {"b": 2})]


# --- beir ---------------------------------------------------------------------------------------------------------


def test_load_corpus_converts_int_ids_and_keeps_title_only_docs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": 7, "title": "T", "text": "body"}, {"_id": "x", "title": "title only", "text": ""},
        {"_id": "y", "text": "no title key"},
    ])
    corpus = load_corpus(path)
    assert corpus.ids == ["7", "x", "y"]
    assert corpus.index == {"7": 0, "x": 1, "y": 2}
    assert corpus.passages([0, 1, 2]) == ["T body", "title only", "no title key"]
    assert corpus.passage(1) == "title only"
    assert len(corpus) == 3


def test_load_queries_ignores_extra_keys_and_converts_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "queries.jsonl", [
        {"_id": 3, "text": "what is lift", "metadata": {"x": 1}}, {"_id": "b", "text": "drag", "title": "ignored"},
    ])
    queries = load_queries(path)
    assert queries.ids == ["3", "b"] and queries.texts == ["what is lift", "drag"]
    assert queries.text("b") == "drag" and queries.index == {"3": 0, "b": 1}
    sub = queries.subset(["b"])
    assert sub.ids == ["b"] and sub.texts == ["drag"]


def test_corpus_fingerprint_changes_with_ids_titles_and_texts(small_corpus: Corpus) -> None:
    fp = small_corpus.fingerprint
    assert fp == Corpus(list(small_corpus.ids), list(small_corpus.titles), list(small_corpus.texts)).fingerprint
    assert len(fp) == 64
    assert Corpus(["d1", "d2", "dX"], small_corpus.titles, small_corpus.texts).fingerprint != fp
    assert Corpus(small_corpus.ids, ["Wing", "", "Jot"], small_corpus.texts).fingerprint != fp
    # boundaries matter: moving a character between title and text is a different corpus
    assert Corpus(["a"], ["ab"], ["c"]).fingerprint != Corpus(["a"], ["a"], ["bc"]).fingerprint
    copy = small_corpus.copy()
    copy.append("d4", "", "new")
    assert copy.fingerprint != fp and small_corpus.fingerprint == fp and len(small_corpus) == 3


def test_corpus_passages_accepts_numpy_indices(small_corpus: Corpus) -> None:
    np = pytest.importorskip("numpy")
    assert small_corpus.passages(np.array([2, 0])) == ["Jet mixing layer", "Wing lift and drag"]
    assert small_corpus.passages() == ["Wing lift and drag", "heat transfer", "Jet mixing layer"]


def test_load_beir_on_tiny_fixture(tiny_beir_dir: Path) -> None:
    ds = load_beir(tiny_beir_dir, "test")
    assert ds.name == tiny_beir_dir.name
    assert len(ds.corpus) == 60 and len(ds.queries) == 20
    assert len(ds.qrels) == 10 and all(len(d) == 2 for d in ds.qrels.values())
    assert all(set(v.values()) <= {1, 2} for v in ds.qrels.values())


def test_load_beir_reads_gzipped_files(tmp_path: Path) -> None:
    for name, rows in (("corpus", [{"_id": "d", "text": "doc"}]), ("queries", [{"_id": "q", "text": "query"}])):
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "qrels").mkdir()
    write_qrels(tmp_path / "qrels" / "dev.tsv", [("q", "d", 1)])
    ds = load_beir(tmp_path, "dev")
    assert ds.qrels == {"q": {"d": 1}} and ds.corpus.ids == ["d"] and ds.queries.texts == ["query"]


def test_load_qrels_keeps_file_order_graded_scores_and_tolerates_exact_repeats(tmp_path: Path) -> None:
    path = write_qrels(tmp_path / "q.tsv", [("q1", "b", 2), ("q1", "a", 0), ("q2", "a", -1), ("q1", "b", 2)])
    qrels = load_qrels(path)
    assert qrels == {"q1": {"b": 2, "a": 0}, "q2": {"a": -1}}
    assert list(qrels["q1"]) == ["b", "a"]


def test_positives_from_qrels_orders_filters_and_counts_skipped(caplog: pytest.LogCaptureFixture) -> None:
    qrels = {"q2": {"c": 1, "a": 2, "b": 0}, "q1": {"a": 0}, "q3": {"a": 3, "b": 1}}
    queries = Queries(["q1", "q2", "q3", "q4"], ["one", "two", "three", "four"])
    with caplog.at_level(logging.WARNING):
        pos = positives_from_qrels(qrels, queries)
    assert list(pos.items()) == [("q2", ["c", "a"]), ("q3", ["a", "b"])]
    assert pos.skipped == 1 and pos.skipped_ids == ["q1"]
    assert "1 of 3 queries" in caplog.text
    strict = positives_from_qrels(qrels, queries, min_relevance=2)
    assert dict(strict) == {"q2": ["a"], "q3": ["a"]} and strict.skipped == 1
    assert list(positives_from_qrels(qrels)) == ["q2", "q3"]  # qrels order without queries
    with pytest.raises(ValueError, match="not among the queries"):
        positives_from_qrels({"zz": {"a": 1}}, queries)


def test_positives_from_qrels_drops_empty_documents_when_given_the_corpus() -> None:
    corpus = Corpus(["a", "b"], ["", "t"], ["", "x"])
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"a": 2}}
    pos = positives_from_qrels(qrels, None, corpus=corpus)
    assert dict(pos) == {"q1": ["b"]} and pos.skipped_ids == ["q2"]


@pytest.mark.real_data
def test_cranfield_counts_and_speed(cranfield_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        train = load_beir(cranfield_dir, "train")
    elapsed = time.perf_counter() - start
    assert len(train.corpus) == 1400 and len(train.queries) == 225
    assert len(train.qrels) == 150
    assert elapsed < 1.0, f"loading cranfield took {elapsed:.2f}s"
    assert "2 documents have an empty title and text (lines [471, 995])" in caplog.text
    test = load_beir(cranfield_dir, "test")
    assert len(test.qrels) == 75
    assert set(train.qrels).isdisjoint(test.qrels)
    assert all(int(q) % 3 == 0 for q in test.qrels)
    pos = positives_from_qrels(train.qrels, train.queries)
    assert len(pos) == 150 and pos.skipped == 0
    assert sum(len(v) for v in train.qrels.values()) == sum(len(v) for v in pos.values())


# --- pairs --------------------------------------------------------------------------------------------------------


def test_load_pairs_matches_texts_appends_new_ones_and_merges_queries(tmp_path: Path, small_corpus: Corpus) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"query": "What is lift?", "positive": "wing  LIFT and drag"},  # passage match (normalized)
        {"query": "what is  LIFT?", "positives": ["heat transfer", "brand new passage"]},  # same query text
        {"query_id": "q9", "query": "jets", "positive_ids": ["d3"], "positive": "Mixing layer"},  # body match, dedup
    ])
    fp = small_corpus.fingerprint
    queries, positives, corpus = load_pairs(path, small_corpus)
    new_id = "pos:" + text_key("brand new passage")[:16]
    qid = "q:" + text_key("What is lift?")[:16]
    assert queries.ids == [qid, "q9"] and queries.texts == ["What is lift?", "jets"]
    assert positives == {qid: ["d1", "d2", new_id], "q9": ["d3"]}
    assert corpus.ids[-1] == new_id and corpus.passage(len(corpus) - 1) == "brand new passage"
    assert len(small_corpus) == 3 and small_corpus.fingerprint == fp  # the input corpus is untouched


def test_load_pairs_positive_ids_accept_int_ids(tmp_path: Path) -> None:
    corpus = Corpus(["1", "2"], ["", ""], ["alpha", "beta"])
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "positive_ids": [2, "1"]}])
    queries, positives, out = load_pairs(path, corpus)
    assert list(positives.values()) == [["2", "1"]] and out is corpus


def test_load_pairs_from_parquet_without_corpus(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    table = pa.table({"query": ["a query", "b query", "a query"], "positive": ["text one", "text two", "text one"]})
    pq.write_table(table, path)
    queries, positives, corpus = load_pairs(path)
    assert len(queries) == 2 and len(corpus) == 2
    assert [corpus.passages([corpus.index[d] for d in v]) for v in positives.values()] == [["text one"], ["text two"]]
    assert all(d.startswith("pos:") for d in corpus.ids)


def test_load_pairs_same_text_with_other_query_id_merges_into_the_first(tmp_path: Path) -> None:
    corpus = Corpus(["d1", "d2"], ["", ""], ["alpha", "beta"])
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"query_id": "a", "query": "Lift?", "positive": "new text"},
        {"query_id": "b", "query": "lift?", "positive_ids": ["d2"]},
        {"query_id": "b", "query": "LIFT?", "positive_ids": ["pos:" + text_key("new text")[:16], "d1"]},
    ])
    queries, positives, out = load_pairs(path, corpus)
    new_id = "pos:" + text_key("new text")[:16]
    assert queries.ids == ["a"] and positives == {"a": [new_id, "d2", "d1"]}
    assert out.ids == ["d1", "d2", new_id] and corpus.ids == ["d1", "d2"]


# --- columns and formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("roles", ["PAIR_ROLES", "CORPUS_ROLES"])
def test_no_column_name_feeds_two_fields(roles: str) -> None:
    from nvr.data import columns

    names = [n for r in getattr(columns, roles) for n in (*r.native, *r.aliases)]
    assert len(names) == len(set(names))


def test_nvr_names_win_over_sentence_transformers_names(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("anchor,query,positive,text\ndecoy,real query,real positive,decoy text\n", encoding="utf-8")
    queries, positives, corpus = load_pairs(path)
    assert queries.texts == ["real query"] and corpus.texts == ["real positive"]


def test_numbered_and_named_negatives_are_all_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from nvr.data.pairs import read_pairs

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"anchor": ["q"], "positive": ["p"], "negative": ["n0"], "negative_1": ["n1"],
                             "negative_2": [None], "label": [1]}), path)
    with caplog.at_level(logging.WARNING):
        pairs = read_pairs(path)
    assert "column 'label' is ignored: every row is read as a relevant (query, positive) pair" in caplog.text
    assert pairs.corpus.texts == ["p", "n0", "n1"] and pairs.given_negatives == 2
    assert pairs.corpus.ids[1] == "neg:" + text_key("n0")[:16]


def test_csv_with_bom_crlf_scalar_id_columns_and_empty_cells(tmp_path: Path) -> None:
    corpus = Corpus(["d1", "d2"], ["", ""], ["alpha", "beta"])
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffquery_id,query,positive,positive_ids\r\n,first,,d2\r\n7,second,gamma,\r\n".encode())
    queries, positives, out = load_pairs(path, corpus)
    assert queries.ids == ["q:" + text_key("first")[:16], "7"]
    assert list(positives.values()) == [["d2"], ["pos:" + text_key("gamma")[:16]]]


def test_text_corpus_ids_are_content_hashes_stable_under_reordering(tmp_path: Path) -> None:
    from nvr.data.corpus_file import content_id, load_corpus_file

    a = tmp_path / "a.txt"
    a.write_text("alpha\nbeta\n", encoding="utf-8")
    b = tmp_path / "b.txt.gz"
    with gzip.open(b, "wt", encoding="utf-8") as fh:
        fh.write("\ufeffbeta\r\n\r\nalpha\r\n")
    ca, cb = load_corpus_file(a), load_corpus_file(b)
    assert ca.ids == [content_id("alpha"), content_id("beta")] and cb.ids == ca.ids[::-1]
    assert cb.texts == ["beta", "alpha"]
