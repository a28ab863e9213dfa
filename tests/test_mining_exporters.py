"""Exporters never write a file the target trainer crashes on or misreads (issue 9, item 15).

Mined folders are written by hand (``mined.jsonl`` + ``manifest.json``) so each case is exact and fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvr.mining.export import to_flagembedding, to_sentence_transformers
from nvr.utils.errors import InputError


def pos(pid: str, score: float | None, teacher_scores: dict | None = None) -> dict:
    p = {"id": pid, "text": f"text {pid}", "score": score}
    if teacher_scores is not None:
        p["teacher_scores"] = teacher_scores
    return p


def neg(nid: str, score: float, teacher: str) -> dict:
    return {"id": nid, "text": f"text {nid}", "score": score, "teacher": teacher, "rank": 0}


def write_mined(folder: Path, rows: list[dict], teachers: list[str], k: int = 2) -> Path:
    folder.mkdir(parents=True)
    (folder / "mined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"num_negatives": k, "teachers": [{"name": t} for t in teachers]}
    (folder / "manifest.json").write_text(json.dumps({"config": config}))
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flagembedding_drops_rows_without_negatives(tmp_path):
    rows = [
        {"query_id": "a", "query": "qa", "positives": [pos("p1", 0.9)], "negatives": [neg("n1", 0.5, "t")]},
        {"query_id": "b", "query": "qb", "positives": [pos("p2", 0.8)], "negatives": []},
    ]
    out = write_mined(tmp_path / "m", rows, ["t"])
    summary = to_flagembedding(out, tmp_path / "fe.jsonl")
    fe = read_jsonl(tmp_path / "fe.jsonl")
    assert [r["query"] for r in fe] == ["qa"] and all(r["neg"] for r in fe)
    assert summary["rows"] == 1 and summary["dropped_without_negatives"] == 1 and summary["with_scores"]
    assert fe[0]["pos_scores"] == [0.9] and fe[0]["neg_scores"] == [0.5]


def test_flagembedding_scores_use_the_negatives_teacher_scale(tmp_path):
    """cross_sample: row b's negatives come from teacher B, so its positive score must be B's, not A's."""
    rows = [
        {"query_id": "a", "query": "qa", "positives": [pos("p1", 0.9, {"A": 0.9, "B": 31.0})],
         "negatives": [neg("n1", 0.5, "A"), neg("n2", 0.4, "A")]},
        {"query_id": "b", "query": "qb", "positives": [pos("p2", 0.8, {"A": 0.8, "B": 27.0})],
         "negatives": [neg("n3", 12.0, "B"), neg("n4", 11.0, "B")]},
    ]
    out = write_mined(tmp_path / "m", rows, ["A", "B"])
    to_flagembedding(out, tmp_path / "fe.jsonl")
    fe = read_jsonl(tmp_path / "fe.jsonl")
    assert fe[0]["pos_scores"] == [0.9] and fe[0]["neg_scores"] == [0.5, 0.4]
    assert fe[1]["pos_scores"] == [27.0] and fe[1]["neg_scores"] == [12.0, 11.0]


@pytest.mark.parametrize("case", ["mixed_teachers", "unscored_positive", "no_teacher_scores"])
def test_flagembedding_writes_no_incomparable_scores(tmp_path, case):
    a = {"query_id": "a", "query": "qa", "positives": [pos("p1", 0.9, {"A": 0.9, "B": 30.0})],
         "negatives": [neg("n1", 0.5, "A")]}
    b = {"query_id": "b", "query": "qb", "positives": [pos("p2", 0.8, {"A": 0.8, "B": 27.0})],
         "negatives": [neg("n3", 12.0, "B"), neg("n4", 0.3, "A")]}  # intra_sample: two scales in one row
    if case == "unscored_positive":  # random teacher: no positive score (it used to be written as 0.0)
        b = {"query_id": "b", "query": "qb", "positives": [pos("p2", None)], "negatives": [neg("n3", 0.7, "A")]}
    if case == "no_teacher_scores":  # older mined set: only the first teacher's positive score is known
        b = {"query_id": "b", "query": "qb", "positives": [pos("p2", 0.8)], "negatives": [neg("n3", 12.0, "B")]}
    out = write_mined(tmp_path / "m", [a, b], ["A", "B"])
    summary = to_flagembedding(out, tmp_path / "fe.jsonl")
    fe = read_jsonl(tmp_path / "fe.jsonl")
    assert not summary["with_scores"] and summary["rows_without_comparable_scores"] == 1
    assert all("pos_scores" not in r and "neg_scores" not in r for r in fe) and len(fe) == 2


@pytest.mark.parametrize("exporter", ["st", "flag"])
def test_export_with_no_row_fails_clearly(tmp_path, exporter):
    negatives = [] if exporter == "flag" else [neg("n1", 0.5, "t")]  # st: 1 negative < k = 2
    rows = [{"query_id": "a", "query": "qa", "positives": [pos("p1", 0.9)], "negatives": negatives}]
    out = write_mined(tmp_path / "m", rows, ["t"], k=2)
    target = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match="nothing to export") as err:
        (to_sentence_transformers if exporter == "st" else to_flagembedding)(out, target)
    assert str(out / "mined.jsonl") in str(err.value)
    assert not target.exists()
