"""Every bad input names its file and 1-based line (or the expected path) in an InputError."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from nvr.data.beir import Corpus, Queries, load_beir, load_corpus, load_qrels, load_queries
from nvr.data.jsonl import iter_jsonl
from nvr.data.pairs import load_pairs
from nvr.utils.errors import ConfigError, InputError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def expect_error(fn, path: Path, line: int | None, match: str) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        fn()
    assert info.value.path == str(path)
    assert info.value.line == line
    return info.value


# --- jsonl --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "line", "match"),
    [
        (['{"a": 1}', "", '{"a": 2,}'], 3, "malformed JSON"),
        (['{"a": 1}', "[1, 2]"], 2, "expected a JSON object, got list"),
        (['"just a string"'], 1, "got str"),
        (['{"a": 1}', '{"a": "unterminated'], 2, "malformed JSON"),
    ],
)
def test_iter_jsonl_bad_lines(tmp_path: Path, lines: list[str], line: int, match: str) -> None:
    path = write_lines(tmp_path / "x.jsonl", lines)
    expect_error(lambda: list(iter_jsonl(path)), path, line, match)


def test_iter_jsonl_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    expect_error(lambda: list(iter_jsonl(path)), path, 2, "not valid UTF-8")


def test_iter_jsonl_missing_and_corrupt_gzip(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    expect_error(lambda: list(iter_jsonl(missing)), missing, None, "file not found")
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(InputError, match="corrupt gzip") as info:
        list(iter_jsonl(bad))
    assert info.value.path == str(bad)
    truncated = tmp_path / "trunc.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-30])
    with pytest.raises(InputError, match="corrupt gzip"):
        list(iter_jsonl(truncated))


# --- corpus / queries ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "line", "match"),
    [
        (['{"_id": "a", "text": "x"}', '{"title": "t", "text": "y"}'], 2, "missing '_id'"),
        (['{"_id": "", "text": "x"}'], 1, "'_id' is empty"),
        (['{"_id": "  ", "text": "x"}'], 1, "'_id' is empty"),
        (['{"_id": 1.5, "text": "x"}'], 1, "must be a string or an integer, got float"),
        (['{"_id": true, "text": "x"}'], 1, "got bool"),
        (['{"_id": null, "text": "x"}'], 1, "got NoneType"),
        (['{"_id": "a", "text": 3}'], 1, "'text' must be a string"),
        (['{"_id": "a", "title": ["t"], "text": "x"}'], 1, "'title' must be a string"),
    ],
)
def test_corpus_bad_rows(tmp_path: Path, rows: list[str], line: int, match: str) -> None:
    path = write_lines(tmp_path / "corpus.jsonl", rows)
    expect_error(lambda: load_corpus(path), path, line, match)


def test_corpus_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "corpus.jsonl", ['{"_id": 5, "text": "x"}', "", '{"_id": "5", "text": "y"}'])
    err = expect_error(lambda: load_corpus(path), path, 3, "duplicate _id '5'")
    assert "first seen on line 1" in str(err)


def test_corpus_empty_document_is_an_error_when_strict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = ['{"_id": "a", "text": "x"}', '{"_id": "b", "title": " ", "text": ""}']
    path = write_lines(tmp_path / "corpus.jsonl", rows)
    expect_error(lambda: load_corpus(path, empty_docs="error"), path, 2, "empty title and an empty text")
    corpus = load_corpus(path)  # default: kept, with a warning naming the line
    assert corpus.ids == ["a", "b"] and "(lines [2])" in caplog.text
    with pytest.raises(ConfigError, match="empty_docs"):
        load_corpus(path, empty_docs="skip")  # type: ignore[arg-type]


def test_corpus_without_documents(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "corpus.jsonl", [""])
    expect_error(lambda: load_corpus(path), path, None, "no documents")


@pytest.mark.parametrize(
    ("rows", "line", "match"),
    [
        (['{"_id": "q1", "text": "ok"}', '{"_id": "q2", "text": "  "}'], 2, "query 'q2' has an empty text"),
        (['{"_id": "q1"}'], 1, "query 'q1' has an empty text"),
        (['{"text": "who"}'], 1, "missing '_id'"),
        (['{"_id": "q1", "text": "a"}', '{"_id": "q1", "text": "b"}'], 2, "duplicate _id 'q1'.*line 1"),
    ],
)
def test_queries_bad_rows(tmp_path: Path, rows: list[str], line: int, match: str) -> None:
    path = write_lines(tmp_path / "queries.jsonl", rows)
    expect_error(lambda: load_queries(path), path, line, match)


# --- qrels --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "line", "match"),
    [
        (["q1\td1\t1", "q1\td2\t0"], 1, "missing header"),
        (["qid\tdocid\trel", "q1\td1\t1"], 1, "bad header"),
        ([], 1, "empty qrels file"),
        (["query-id\tcorpus-id\tscore", "q1\td1"], 2, "expected 3 tab-separated columns.*got 2"),
        (["query-id\tcorpus-id\tscore", "q1 d1 1"], 2, "got 1"),
        (["query-id\tcorpus-id\tscore", "q1\td1\t1\textra"], 2, "got 4"),
        (["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td2\t0.5"], 3, "score must be an integer, got '0.5'"),
        (["query-id\tcorpus-id\tscore", "q1\td1\thigh"], 2, "score must be an integer"),
        (["query-id\tcorpus-id\tscore", "\td1\t1"], 2, "empty query-id"),
        (["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td1\t2"], 3, r"judged 2 here and 1 on line 2"),
    ],
)
def test_qrels_bad_lines(tmp_path: Path, lines: list[str], line: int, match: str) -> None:
    path = tmp_path / "q.tsv"
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    expect_error(lambda: load_qrels(path), path, line, match)


@pytest.mark.parametrize("score", ["+1", " 1", "1 ", "1_0", "\u0661", "\uff11", "0x1", "1.0", "--1", ""])
def test_qrels_score_must_be_a_plain_decimal(tmp_path: Path, score: str) -> None:
    """``int()`` accepts '+1', ' 1', '1_0', Arabic-Indic and full-width digits: a qrels grade is ASCII digits."""
    path = tmp_path / "q.tsv"
    path.write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t{score}\n", encoding="utf-8")
    expect_error(lambda: load_qrels(path), path, 3, "score must be an integer")


def test_qrels_negative_grades_stay_accepted(tmp_path: Path) -> None:
    path = tmp_path / "q.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t-1\nq1\td2\t10\n", encoding="utf-8")
    assert load_qrels(path) == {"q1": {"d1": -1, "d2": 10}}


@pytest.mark.parametrize(("row", "what"), [("q1\td1 \t1", "corpus-id 'd1 '"), ("q1\t d1\t1", "corpus-id ' d1'"),
                                           (" q1\td1\t1", "query-id ' q1'"), ("q1\u00a0\td1\t1", "query-id")])
def test_qrels_ids_with_surrounding_whitespace_are_errors(tmp_path: Path, row: str, what: str) -> None:
    """An id is compared exactly: 'd1 ' must not silently resolve to 'd1' (nor to any other document)."""
    corpus = Corpus(["d1"], [""], ["a"])  # today's strip() makes 'd1 ' resolve to this document
    path = tmp_path / "q.tsv"
    path.write_text(f"query-id\tcorpus-id\tscore\n{row}\n", encoding="utf-8")
    err = expect_error(lambda: load_qrels(path, corpus=corpus), path, 2, "leading or trailing whitespace")
    assert what in str(err)


@pytest.mark.parametrize("raw_id", [" d1", "d1 ", "d1\t", "\u3000d1", "d\n1", "d\x001"])
@pytest.mark.parametrize("loader", ["corpus", "queries"])
def test_jsonl_ids_with_whitespace_or_control_characters(tmp_path: Path, raw_id: str, loader: str) -> None:
    path = tmp_path / f"{loader}.jsonl"
    write_lines(path, ['{"_id": "ok", "text": "x"}', json.dumps({"_id": raw_id, "text": "y"})])
    fn = load_corpus if loader == "corpus" else load_queries
    expect_error(lambda: fn(path), path, 2, "whitespace|control character")


@pytest.mark.parametrize("row", [{"query": "a", "query_id": "q1 ", "positive": "x"},
                                 {"query": "a", "positive_ids": ["d1 "]}, {"query": "a", "positive_ids": [" d1"]}])
def test_pairs_ids_with_surrounding_whitespace(tmp_path: Path, row: dict) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    expect_error(lambda: load_pairs(path, Corpus(["d1"], [""], ["doc one"])), path, 1, "leading or trailing")


def test_qrels_header_variants_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "q.tsv"
    path.write_bytes(b"query_id\tCorpus-Id\tscore\r\nq1\td1\t2\r\n")
    assert load_qrels(path) == {"q1": {"d1": 2}}


def test_qrels_unknown_query_or_doc(tmp_path: Path) -> None:
    corpus = Corpus(["d1"], [""], ["text"])
    queries = Queries(["q1"], ["query"])
    path = tmp_path / "q.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n", encoding="utf-8")
    expect_error(lambda: load_qrels(path, corpus=corpus, queries=queries), path, 3, "unknown corpus id 'd9'")
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq7\td1\t1\n", encoding="utf-8")
    expect_error(lambda: load_qrels(path, corpus=corpus, queries=queries), path, 3, "unknown query id 'q7'")
    assert load_qrels(path) == {"q1": {"d1": 1}, "q7": {"d1": 1}}  # no cross-check without corpus/queries


# --- missing files ------------------------------------------------------------------------------------------------


def test_load_beir_names_the_missing_path(tmp_path: Path) -> None:
    expect_error(lambda: load_beir(tmp_path / "absent"), tmp_path / "absent", None, "BEIR folder not found")
    expect_error(lambda: load_beir(tmp_path), tmp_path / "corpus.jsonl", None, "corpus file not found")
    write_lines(tmp_path / "corpus.jsonl", ['{"_id": "d1", "text": "x"}'])
    expect_error(lambda: load_beir(tmp_path), tmp_path / "queries.jsonl", None, "queries file not found")
    write_lines(tmp_path / "queries.jsonl", ['{"_id": "q1", "text": "x"}'])
    (tmp_path / "qrels").mkdir()
    write_lines(tmp_path / "qrels" / "train.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1"])
    err = expect_error(lambda: load_beir(tmp_path, "test"), tmp_path / "qrels" / "test.tsv", None, "split 'test'")
    assert "['train']" in str(err)
    expect_error(lambda: load_qrels(tmp_path / "x.tsv"), tmp_path / "x.tsv", None, "qrels file not found")


def test_load_beir_cross_checks_qrels_ids(tmp_path: Path) -> None:
    write_lines(tmp_path / "corpus.jsonl", ['{"_id": "d1", "text": "x"}'])
    write_lines(tmp_path / "queries.jsonl", ['{"_id": "q1", "text": "x"}'])
    (tmp_path / "qrels").mkdir()
    qrels = write_lines(tmp_path / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td2\t1"])
    expect_error(lambda: load_beir(tmp_path), qrels, 2, "unknown corpus id 'd2'")


# --- pairs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "line", "match"),
    [
        ([{"query": "a", "positive": "x"}, {"query": "b", "positive_ids": ["d1", "zz"]}], 2,
         "unknown positive id 'zz'"),
        ([{"query": "a"}], 1, "row has no positive: 'positive', 'positives' or 'positive_ids' are all missing"),
        ([{"query": "", "positive": "x"}], 1, "'query' must be a non-empty string"),
        ([{"positive": "x"}], 1, "'query' must be a non-empty string"),
        ([{"query": "a", "positives": "x"}], 1, "'positives' must be a list"),
        ([{"query": "a", "positives": ["x", 3]}], 1, "a positive must be a non-empty string"),
        ([{"query": "a", "positive": "  "}], 1, "a positive must be a non-empty string"),
        ([{"query": "a", "positive_ids": "d1"}], 1, "'positive_ids' must be a list"),
        ([{"query": "a", "positive_ids": [None]}], 1, "positive id must be a string or integer"),
        ([{"query": "a", "query_id": 1.5, "positive": "x"}], 1, "'query_id' must be"),
        ([{"query_id": "q", "query": "a", "positive": "x"}, {"query_id": "q", "query": "b", "positive": "y"}], 2,
         "query_id 'q' was used for a different query text on line 1"),
    ],
)
def test_pairs_bad_rows(tmp_path: Path, rows: list[dict], line: int, match: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    corpus = Corpus(["d1"], [""], ["doc one"])
    expect_error(lambda: load_pairs(path, corpus), path, line, match)


def test_pairs_empty_and_missing_files(tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    expect_error(lambda: load_pairs(empty), empty, None, "no training pairs")
    missing = tmp_path / "missing.parquet"
    expect_error(lambda: load_pairs(missing), missing, None, "file not found")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    expect_error(lambda: load_pairs(broken), broken, None, "cannot read parquet")
