"""Non-retrieval tasks as training examples (nvr.training.tasks): classification and STS rows from JSONL/parquet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nvr.training.tasks import load_classification, load_sts
from nvr.utils.errors import InputError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


CLS_ROWS = [{"text": "great movie", "label": "pos"}, {"text": "awful plot", "label": "neg"},
            {"text": "fine acting", "label": "neutral"}, {"text": "loved it", "label": "pos"}]


@pytest.mark.parametrize("writer", [_jsonl, _parquet], ids=["jsonl", "parquet"])
def test_classification_label_text_is_positive_and_other_labels_are_negatives(tmp_path, writer) -> None:
    path = writer(tmp_path / ("c.jsonl" if writer is _jsonl else "c.parquet"), CLS_ROWS)
    examples = load_classification(path)
    assert [ex.query for ex in examples] == [r["text"] for r in CLS_ROWS]
    assert [ex.query_id for ex in examples] == ["line:1", "line:2", "line:3", "line:4"]
    first = examples[0]
    assert first.positive_ids == ["label:pos"] and first.positive_texts == ["pos"]
    assert first.negative_ids == ["label:neg", "label:neutral"] and first.negative_texts == ["neg", "neutral"]
    assert first.negative_ranks == [0, 1] and all(math.isnan(s) for s in first.negative_scores)
    # examples of one label share its document id (the loss masks same-label passages by id)
    assert examples[3].positive_ids == first.positive_ids
    assert examples[1].negative_ids == ["label:neutral", "label:pos"]


def test_classification_label_descriptions_and_integer_labels(tmp_path) -> None:
    rows = [{"id": 7, "text": "stocks fell", "label": 0}, {"id": "b", "text": "team won", "label": 1}]
    texts = {"0": "business and finance news", "1": "sports news"}
    examples = load_classification(_jsonl(tmp_path / "c.jsonl", rows), texts)
    assert [ex.query_id for ex in examples] == ["7", "b"]
    assert examples[0].positive_texts == ["business and finance news"]
    assert examples[0].negative_texts == ["sports news"] and examples[0].positive_ids == ["label:0"]


@pytest.mark.parametrize("rows,texts,message,line", [
    ([{"text": "", "label": "a"}], None, "'text' must be a non-empty string", 1),
    ([{"text": "x", "label": "a"}, {"text": "y"}], None, "'label' must be", 2),
    ([{"text": "x", "label": True}], None, "'label' must be", 1),
    ([{"text": "x", "label": "a"}, {"text": "y", "label": "a"}], None, "at least 2 distinct labels", None),
    ([{"text": "x", "label": "a"}, {"text": "y", "label": "b"}], {"a": "A"}, "label 'b' has no entry", 2),
    ([{"id": 1, "text": "x", "label": "a"}, {"id": "1", "text": "y", "label": "b"}], None, "duplicate id '1'", 2),
    ([["not", "an", "object"]], None, "object", 1),
])
def test_classification_bad_rows_name_file_and_line(tmp_path, rows, texts, message, line) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError, match=message) as err:
        load_classification(path, texts)
    assert err.value.path == str(path) and err.value.line == line
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("writer", [_jsonl, _parquet], ids=["jsonl", "parquet"])
def test_sts_pairs_with_min_score_threshold(tmp_path, writer) -> None:
    rows = [{"sentence1": "a cat sits", "sentence2": "a cat is sitting", "score": 4.8},
            {"sentence1": "a dog runs", "sentence2": "stock prices", "score": 0.2},
            {"sentence1": "kids play", "sentence2": "Children  PLAY", "score": 3.0},
            {"sentence1": "children play", "sentence2": "children play", "score": 5.0}]
    path = writer(tmp_path / ("s.jsonl" if writer is _jsonl else "s.parquet"), rows)
    kept = load_sts(path, min_score=3.0)
    assert [ex.query for ex in kept] == ["a cat sits", "kids play", "children play"]
    assert [ex.query_id for ex in kept] == ["line:1", "line:3", "line:4"]
    assert kept[0].positive_texts == ["a cat is sitting"] and kept[0].negative_ids == []
    assert kept[1].positive_ids == kept[2].positive_ids  # equal normalized sentence-2 texts share an id
    assert kept[0].positive_scores == [None]  # a similarity label is not a teacher score
    assert len(load_sts(path)) == 4  # no threshold: every pair


@pytest.mark.parametrize("rows,min_score,message,line", [
    ([{"sentence1": "a", "sentence2": "b"}], 1.0, "no 'score'", 1),
    ([{"sentence1": "a", "sentence2": "b", "score": "high"}], None, "'score' must be a finite number", 1),
    ([{"sentence1": "a", "sentence2": "b"}, {"sentence1": "a"}], None, "'sentence2' must be", 2),
    ([{"sentence2": "b"}], None, "'sentence1' must be", 1),
])
def test_sts_bad_rows_name_file_and_line(tmp_path, rows, min_score, message, line) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError, match=message) as err:
        load_sts(path, min_score)
    assert err.value.path == str(path) and err.value.line == line


def test_parquet_errors_name_the_row_and_missing_files_the_path(tmp_path) -> None:
    path = _parquet(tmp_path / "c.parquet", [{"text": "x", "label": "a"}, {"text": "", "label": "b"}])
    with pytest.raises(InputError, match=r"c\.parquet:2: 'text'"):
        load_classification(path)
    with pytest.raises(InputError, match="file not found"):
        load_sts(tmp_path / "missing.jsonl")


def test_csv_scores_are_parsed_and_empty_cells_mean_no_score(tmp_path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("sentence1,sentence2,score\na cat,a kitten,4.5\na car,a tree,\"1\"\nsun,moon,\n", encoding="utf-8")
    assert [ex.query for ex in load_sts(path)] == ["a cat", "a car", "sun"]
    with pytest.raises(InputError, match=r"s\.csv:4: row has no 'score'"):
        load_sts(path, min_score=2.0)
    path.write_text("sentence1,sentence2,score\na,b,high\n", encoding="utf-8")
    with pytest.raises(InputError, match="'score' must be a finite number, got 'high'"):
        load_sts(path)
