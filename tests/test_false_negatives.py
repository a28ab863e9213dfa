"""Mining never creates the false negatives it exists to remove (issue 9, items 10-13).

Each test mines a hand-made BEIR folder with a BM25 teacher (no model, well under a second) and checks that the
documents that are relevant to a query (by a same-text query's qrels, by equal text, by a low relevance grade)
never appear among its negatives, and that the run counts them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nvr.config.mining import DataSource, FilterConfig, MineConfig, SamplerConfig, TeacherConfig
from nvr.data.beir import Corpus
from nvr.mining.build import exclusion_reasons, mark_positives
from nvr.mining.filters import Reason, apply_filter
from nvr.mining.pipeline import load_data, mined_rows, run_mining
from nvr.search.table import CandidateTable

WORDS = "apple river stone cloud forest engine silver garden winter candle".split()


def write_beir(folder: Path, docs: dict[str, str], queries: dict[str, str], qrels: list[tuple[str, str, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                                 for d, t in docs.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return folder


def filler_docs(n: int, seed: int = 0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {f"f{i}": " ".join(rng.choice(WORDS, size=6)) for i in range(n)}


def bm25_cfg(beir: Path, tmp_path: Path, **kw) -> MineConfig:
    defaults = dict(num_negatives=3, depth=50, max_depth=50, filter=FilterConfig(method="naive_topk"))
    source = DataSource(beir_dir=str(beir), split="train", min_relevance=kw.pop("min_relevance", 1),
                        exclude_judged=kw.pop("exclude_judged", True))
    return MineConfig(data=source,
                      teachers=[TeacherConfig(name="bm25", kind="bm25")], output_dir=str(tmp_path / "out"),
                      cache_dir=str(tmp_path / "cache"), **{**defaults, **kw})


def negatives_of(res) -> dict[str, list[str]]:
    return {row["query_id"]: [n["id"] for n in row["negatives"]] for row in mined_rows(res)}


def test_duplicate_query_texts_share_positives(tmp_path):
    docs = {"d1": "apple river stone", "d2": "apple river cloud", **filler_docs(12)}
    queries = {"q1": "Apple river?", "q2": "  apple   RIVER? ", "q3": "winter candle"}
    beir = write_beir(tmp_path / "b", docs, queries, [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "f0", 1)])
    data = load_data(DataSource(beir_dir=str(beir), split="train"))
    assert data.positives == {"q1": ["d1", "d2"], "q2": ["d2", "d1"], "q3": ["f0"]}  # own positives first
    res = run_mining(bm25_cfg(beir, tmp_path))
    negs = negatives_of(res)
    assert "d2" not in negs["q1"] and "d1" not in negs["q2"]
    assert res.counts["merged_duplicate_text_queries"] == 2
    assert {p["id"] for p in mined_rows(res)[0]["positives"]} == {"d1", "d2"}


def test_duplicate_text_of_an_unmined_query_is_not_pulled_in(tmp_path):
    """Only queries of the split are merged: a test query with the same text does not leak into training."""
    docs = {"d1": "apple river stone", **filler_docs(8)}
    beir = write_beir(tmp_path / "b", docs, {"q1": "apple river", "t1": "apple river"}, [("q1", "d1", 1)])
    data = load_data(DataSource(beir_dir=str(beir), split="train"))
    assert list(data.positives) == ["q1"] and data.merged_queries == 0


def test_document_equal_to_the_query_is_never_a_negative(tmp_path):
    docs = {"d1": "apple stone", "same": "Apple  RIVER cloud", "title_same": "", **filler_docs(12)}
    beir = write_beir(tmp_path / "b", docs, {"q1": "apple river cloud"}, [("q1", "d1", 1)])
    (beir / "corpus.jsonl").write_text((beir / "corpus.jsonl").read_text().replace(
        '"_id": "title_same", "title": "", "text": ""', '"_id": "title_same", "title": "apple river", "text": "CLOUD"'))
    res = run_mining(bm25_cfg(beir, tmp_path))
    negs = negatives_of(res)["q1"]
    assert "same" not in negs and "title_same" not in negs and len(negs) == 3
    assert res.counts["excluded_query_text_candidates"] == 2
    assert int((res.results[0].reason == Reason.QUERY_TEXT).sum()) == 2
    report = run_report(res)
    assert report["bm25"]["rule_counts"]["query_text"] == 2 and report["bm25"]["rule_counts"]["positive"] == 1


def run_report(res) -> dict:
    from nvr.mining.report import build_report

    return build_report(res.tables, res.results, res.selection, res.per_teacher)["teachers"]


@pytest.mark.parametrize("grades", [(2, 1), (3, 1), (2, 2)])
def test_documents_judged_relevant_below_min_relevance_are_not_negatives(tmp_path, grades):
    pos_grade, low_grade = grades
    docs = {"d1": "apple river stone", "low": "apple river cloud", "zero": "apple river forest", **filler_docs(10)}
    qrels = [("q1", "d1", pos_grade), ("q1", "low", low_grade), ("q1", "zero", 0)]
    beir = write_beir(tmp_path / "b", docs, {"q1": "apple river"}, qrels)
    res = run_mining(bm25_cfg(beir, tmp_path, min_relevance=2))
    negs = negatives_of(res)["q1"]
    assert "low" not in negs and "zero" in negs  # grade 0 is "judged not relevant": a fine negative
    if low_grade < 2:
        assert res.counts["judged_relevant_excluded"] == 1 and res.counts["excluded_judged_candidates"] == 1
        assert run_report(res)["bm25"]["rule_counts"]["judged_relevant"] == 1
    else:  # graded high enough: a positive, not an exclusion
        assert res.counts["judged_relevant_excluded"] == 0
        assert {p["id"] for p in mined_rows(res)[0]["positives"]} == {"d1", "low"}


def test_judgements_of_a_same_text_query_are_excluded_too(tmp_path):
    docs = {"d1": "apple river stone", "low": "apple river cloud", **filler_docs(10)}
    qrels = [("q1", "d1", 2), ("q2", "low", 1), ("q2", "d1", 2)]
    beir = write_beir(tmp_path / "b", docs, {"q1": "apple river", "q2": "Apple River"}, qrels)
    data = load_data(DataSource(beir_dir=str(beir), split="train", min_relevance=2))
    assert data.excluded == {"q1": ["low"], "q2": ["low"]}


def test_excluded_candidates_change_the_table_cache_key(tmp_path):
    """A table cached before an exclusion existed must not be served after it (the flags live in the table)."""
    docs = {"d1": "apple river stone", "low": "apple river cloud", **filler_docs(10)}
    beir = write_beir(tmp_path / "b", docs, {"q1": "apple river"}, [("q1", "d1", 2), ("q1", "low", 1)])
    first = run_mining(bm25_cfg(beir, tmp_path, min_relevance=1))
    assert "low" not in negatives_of(first)["q1"]
    second = run_mining(bm25_cfg(beir, tmp_path, min_relevance=2))  # same cache dir, "low" is now excluded
    assert "low" not in negatives_of(second)["q1"] and second.counts["excluded_judged_candidates"] == 1


def test_mark_positives_flags_every_cause_and_reasons_tell_them_apart():
    corpus = Corpus(["p", "dup", "q", "judged", "free"], ["", "", "", "", ""],
                    ["pos text", "POS  text", "the query", "other", "free text"])
    cand = np.array([[4, 1, 2, 3, 0, -1]])
    pos = np.array([[0]])
    flags = mark_positives(cand, pos, corpus, ["The Query"], np.array([[3]]))
    assert flags.tolist() == [[False, True, True, True, True, False]]
    table = CandidateTable("t", ["q1"], corpus.ids, cand, np.array([[5, 4, 3, 2, 1, np.nan]], np.float32), flags,
                           pos, np.array([[9.0]], np.float32))
    labels = exclusion_reasons(table, ["The Query"], corpus, {"q1": ["judged"]})
    result = apply_filter(table, FilterConfig(method="naive_topk"), labels)
    assert result.reason.tolist() == [[Reason.KEPT, Reason.POSITIVE, Reason.QUERY_TEXT, Reason.JUDGED_RELEVANT,
                                       Reason.POSITIVE, Reason.PADDING]]
    assert result.keep.tolist() == apply_filter(table, FilterConfig(method="naive_topk")).keep.tolist()


@pytest.mark.parametrize("method", ["sampled_topk", "top1_sampled"])
def test_widening_fills_the_sampling_window(tmp_path, method):
    """Rows with K <= survivors < window at a small depth are widened: mining at depth 4 (max_depth 60) equals
    mining directly at depth 60, row for row (today 3-4 survivors < window 8 sample from a truncated window)."""
    docs = filler_docs(60, seed=3)
    queries = {f"q{i}": " ".join(WORDS[i : i + 2]) for i in range(8)}
    qrels = [(q, f"f{i}", 1) for i, q in enumerate(queries)]
    beir = write_beir(tmp_path / "b", docs, queries, qrels)
    sampler = SamplerConfig(method=method, window=8)
    shallow = run_mining(bm25_cfg(beir, tmp_path, num_negatives=3, depth=4, max_depth=60, sampler=sampler))
    deep = run_mining(bm25_cfg(beir, tmp_path, num_negatives=3, depth=60, max_depth=60, sampler=sampler))
    assert negatives_of(shallow) == negatives_of(deep)
    assert shallow.selection.widened.sum() > 0


def test_intra_sample_marks_rows_where_a_teacher_ran_out():
    """intra_sample fills a row from the other teacher when one runs out: that row could change with a deeper list,
    so it is starved (widened), though it has K negatives; a row where both teachers suffice is not."""
    from nvr.mining.ensembles import intra_sample

    def table(name: str, keep_cols: int) -> tuple[CandidateTable, object]:
        cand = np.array([[10, 11, 12, 13], [20, 21, 22, 23]]) + (0 if name == "A" else 100)
        t = CandidateTable(name, ["q1", "q2"], [str(i) for i in range(200)], cand,
                           np.tile(np.array([4, 3, 2, 1], np.float32), (2, 1)), np.zeros((2, 4), bool),
                           np.zeros((2, 1), np.int64), np.ones((2, 1), np.float32))
        keep = np.zeros((2, 4), bool)
        keep[0, :keep_cols] = True
        keep[1, :] = True
        return t, type("R", (), {"keep": keep})()

    (ta, ra), (tb, rb) = table("A", 4), table("B", 1)
    sel = intra_sample([ta, tb], [ra, rb], k=4, dedup=False)
    assert sel.n_selected.tolist() == [4, 4]
    assert sel.starved.tolist() == [True, False]


def test_exclude_judged_false_lets_low_graded_documents_be_negatives(tmp_path):
    docs = {"d1": "apple river stone", "low": "apple river cloud", **filler_docs(10)}
    beir = write_beir(tmp_path / "b", docs, {"q1": "apple river"}, [("q1", "d1", 2), ("q1", "low", 1)])
    data = load_data(DataSource(beir_dir=str(beir), split="train", min_relevance=2, exclude_judged=False))
    assert data.excluded == {}
    assert "low" in negatives_of(run_mining(bm25_cfg(beir, tmp_path, min_relevance=2, exclude_judged=False)))["q1"]


def test_document_whose_body_equals_the_query_is_excluded_despite_its_title(tmp_path):
    docs = {"d1": "apple stone", "body_same": "", **filler_docs(12)}
    beir = write_beir(tmp_path / "b", docs, {"q1": "apple river cloud"}, [("q1", "d1", 1)])
    (beir / "corpus.jsonl").write_text((beir / "corpus.jsonl").read_text().replace(
        '"_id": "body_same", "title": "", "text": ""',
        '"_id": "body_same", "title": "Weather report", "text": "Apple river  CLOUD"'))
    res = run_mining(bm25_cfg(beir, tmp_path))
    assert "body_same" not in negatives_of(res)["q1"]
    assert res.counts["excluded_query_text_candidates"] == 1
    assert int((res.results[0].reason == Reason.QUERY_TEXT).sum()) == 1
