from __future__ import annotations

import math

import numpy as np
import pytest

from nvr.evaluation.metrics import evaluate_run, evaluate_run_per_query, rank_documents
from nvr.utils.seeding import rng_for

ALL = ("ndcg", "recall", "mrr", "map", "precision")


def log2(x: float) -> float:
    return math.log2(x)


def random_case(seed: int, n_queries: int = 120, round_to: float | None = None) -> tuple[dict, dict]:
    """Graded qrels (-1..3, some queries with nothing relevant) and runs that miss some judged docs."""
    rng = rng_for(seed, "metrics")
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(n_queries):
        qid = f"q{q}"
        docs = [f"d{j}" for j in rng.choice(400, 40, replace=False)]
        qrels[qid] = {d: int(rng.integers(-1, 4)) for d in docs[: int(rng.integers(1, 9))]}
        scores = rng.random(40)
        if round_to is not None:
            scores = np.round(scores / round_to) * round_to
        start = int(rng.integers(0, 4))
        run[qid] = {d: float(s) for d, s in zip(docs[start:], scores[start:])}
    return run, qrels


# --- hand-computed ------------------------------------------------------------------------------------------------


def test_hand_computed_example() -> None:
    qrels = {"q": {"a": 3, "b": 1, "c": 2, "x": 0}}
    run = {"q": {"b": 0.9, "x": 0.8, "a": 0.7, "e": 0.6}}  # c (grade 2) never retrieved
    m = evaluate_run_per_query(run, qrels, (1, 3, 10), ALL)["q"]
    dcg3 = 1 / log2(2) + 0 + 3 / log2(4)
    idcg3 = 3 / log2(2) + 2 / log2(3) + 1 / log2(4)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx(dcg3 / idcg3)
    assert m["ndcg@10"] == pytest.approx(dcg3 / idcg3)
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@3"] == pytest.approx(2 / 3)
    assert m["mrr@1"] == 1.0 and m["mrr@10"] == 1.0
    assert m["map@3"] == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert m["precision@3"] == pytest.approx(2 / 3) and m["precision@10"] == pytest.approx(2 / 10)


def test_mrr_cutoff_and_negative_grades() -> None:
    qrels = {"q": {"a": -1, "b": 2}}
    run = {"q": {"a": 0.9, "z": 0.8, "b": 0.1}}
    m = evaluate_run_per_query(run, qrels, (2, 3), ALL)["q"]
    assert m["mrr@2"] == 0.0 and m["mrr@3"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx((2 / log2(4)) / 2)  # the -1 grade gains nothing (not negative)
    assert m["recall@3"] == 1.0 and m["recall@2"] == 0.0


def test_ties_break_by_doc_id_descending() -> None:
    scores = {"a": 1.0, "m": 1.0, "z": 1.0, "b": 2.0}
    assert rank_documents(scores, 10) == ["b", "z", "m", "a"]
    qrels = {"q": {"m": 1}}
    assert evaluate_run({"q": scores}, qrels, (10,), ("mrr",))["mrr@10"] == pytest.approx(1 / 3)
    assert rank_documents({"d10": 0.5, "d9": 0.5, "d100": 0.5}, 2) == ["d9", "d100"]  # string order, not numeric


def test_queries_without_relevant_docs_count_as_zero() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"a": 0, "b": -1}}
    run = {"q1": {"a": 1.0}, "q2": {"a": 1.0, "b": 0.5}}
    per_query = evaluate_run_per_query(run, qrels, (10,), ALL)
    assert all(v == 0.0 for v in per_query["q2"].values())
    assert evaluate_run(run, qrels, (10,), ALL) == {f"{m}@10": pytest.approx(0.5) for m in ALL} | {
        "precision@10": pytest.approx(0.05)
    }


def test_missing_and_extra_queries() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"a": 1}, "q3": {"b": 1}}
    run = {"q1": {"a": 1.0}, "q3": {}, "q9": {"a": 1.0}}  # q2 not run, q3 empty ranking, q9 not judged
    per_query = evaluate_run_per_query(run, qrels, (10,))
    assert list(per_query) == ["q1", "q3"]
    assert per_query["q3"]["ndcg@10"] == 0.0
    assert evaluate_run(run, qrels, (10,))["ndcg@10"] == pytest.approx(1 / 2)
    assert evaluate_run(run, qrels, (10,), complete=True)["ndcg@10"] == pytest.approx(1 / 3)
    assert evaluate_run({}, qrels, (10,)) == {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0, "map@10": 0.0}


def test_metric_names_and_bad_arguments() -> None:
    out = evaluate_run({"q": {"a": 1.0}}, {"q": {"a": 1}}, (10, 100), ("ndcg", "recall"))
    assert list(out) == ["ndcg@10", "ndcg@100", "recall@10", "recall@100"]
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate_run({}, {}, (10,), ("ndgc",))
    with pytest.raises(ValueError, match="k_values"):
        evaluate_run({}, {}, (0,))
    with pytest.raises(ValueError, match="not finite"):
        evaluate_run({"q": {"a": float("nan")}}, {"q": {"a": 1}}, (10,))


# --- against pytrec_eval ------------------------------------------------------------------------------------------


def pytrec_reference(run: dict, qrels: dict, ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """pytrec_eval's per-query values renamed to ours; mrr@k is recip_rank on the run cut at k in trec order."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    cut = ",".join(map(str, ks))
    measures = {f"ndcg_cut.{cut}", f"recall.{cut}", f"map_cut.{cut}", f"P.{cut}"}
    raw = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    ref = {q: {} for q in raw}
    for q, values in raw.items():
        for k in ks:
            ref[q] |= {f"ndcg@{k}": values[f"ndcg_cut_{k}"], f"recall@{k}": values[f"recall_{k}"],
                       f"map@{k}": values[f"map_cut_{k}"], f"precision@{k}": values[f"P_{k}"]}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    for k in ks:
        truncated = {q: {d: run[q][d] for d in rank_documents(run[q], k)} for q in run}
        for q, values in rr.evaluate(truncated).items():
            ref[q][f"mrr@{k}"] = values["recip_rank"]
    return ref


@pytest.mark.parametrize(("seed", "round_to"), [(0, None), (1, None), (2, 0.1), (3, 0.25)])
def test_matches_pytrec_eval(seed: int, round_to: float | None) -> None:
    run, qrels = random_case(seed, round_to=round_to)
    run["q_unjudged"] = {"d1": 1.0}
    qrels["q_not_run"] = {"d1": 1}
    ks = (1, 3, 10, 30)
    ref = pytrec_reference(run, qrels, ks)
    mine = evaluate_run_per_query(run, qrels, ks, ALL)
    assert set(mine) == set(ref)
    worst = max(abs(mine[q][name] - ref[q][name]) for q in ref for name in ref[q])
    assert worst < 1e-6
    mean = evaluate_run(run, qrels, ks, ALL)
    for name in mean:
        assert mean[name] == pytest.approx(np.mean([ref[q][name] for q in ref]), abs=1e-9)
    # the cases are not degenerate: some ranks, ties and empty queries really occur
    assert 0.05 < mean["ndcg@10"] < 0.95
    assert any(all(g < 1 for g in judged.values()) for judged in qrels.values())
