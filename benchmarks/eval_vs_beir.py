"""``nvr eval`` against the reference BEIR toolkit on the same model and BEIR folder, in one process.

Peer: ``beir`` (EvaluateRetrieval + DenseRetrievalExactSearch over sentence-transformers, metrics by pytrec_eval).
Both sides use the model's own settings (MiniLM: mean pooling, normalized, 256 tokens) and the same batch size.
BEIR's exact search silently drops a document whose id equals the query id; Cranfield's query and doc ids overlap
(1..225 vs 1..1400), so the BEIR side gets query ids prefixed with ``q:`` to compare like with like.

Prints NDCG@10 of both (target |diff| <= 1e-4), NDCG@10 of nvr's metric code on BEIR's own run (isolates metric
differences from embedding differences), and wall times: nvr with a cold embedding cache, nvr again with the cache
warm, and BEIR (target nvr/BEIR <= 0.8).

usage: python benchmarks/eval_vs_beir.py [--model HF_ID_OR_DIR] [--beir ../shared/data/cranfield]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_BEIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cranfield"


def run_nvr(model: str, folder: str, batch_size: int, cache_dir: str) -> tuple[dict, float]:
    from nvr.evaluation.evaluate import evaluate_model

    start = time.perf_counter()
    result = evaluate_model(model, [folder], batch_size=batch_size, cache_dir=cache_dir, k_values=(10, 100))
    return result, time.perf_counter() - start


def run_beir(model: str, folder: str, batch_size: int) -> tuple[dict, dict, float, dict]:
    from beir.datasets.data_loader import GenericDataLoader
    from beir.retrieval import models
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    from nvr.utils.models import resolve_model_path

    start = time.perf_counter()
    corpus, queries, qrels = GenericDataLoader(data_folder=folder).load(split="test")
    queries = {f"q:{qid}": text for qid, text in queries.items()}
    qrels = {f"q:{qid}": rel for qid, rel in qrels.items()}
    searcher = DenseRetrievalExactSearch(models.SentenceBERT(resolve_model_path(model)), batch_size=batch_size,
                                         show_progress_bar=False)
    retriever = EvaluateRetrieval(searcher, score_function="dot", k_values=[10, 100])
    results = retriever.retrieve(corpus, queries)
    ndcg, _map, recall, _precision = retriever.evaluate(qrels, results, [10, 100], ignore_identical_ids=False)
    mrr = retriever.evaluate_custom(qrels, results, [10], metric="mrr")
    elapsed = time.perf_counter() - start
    return {"ndcg@10": ndcg["NDCG@10"], "recall@100": recall["Recall@100"], "mrr@10": mrr["MRR@10"]}, results, \
        elapsed, qrels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--beir", default=str(DEFAULT_BEIR))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default=None, help="optional JSON with all numbers")
    args = parser.parse_args()

    from nvr.evaluation.metrics import evaluate_run

    name = Path(args.beir).resolve().name
    with tempfile.TemporaryDirectory(prefix="nvr-eval-bench-") as cache_dir:
        nvr_cold, t_cold = run_nvr(args.model, args.beir, args.batch_size, cache_dir)
        nvr_warm, t_warm = run_nvr(args.model, args.beir, args.batch_size, cache_dir)
    beir_metrics, beir_run, t_beir, beir_qrels = run_beir(args.model, args.beir, args.batch_size)
    nvr_metrics = nvr_cold["datasets"][name]
    on_beir_run = evaluate_run(beir_run, beir_qrels, k_values=(10,), metrics=("ndcg",))["ndcg@10"]
    report = {
        "model": args.model, "dataset": name,
        "nvr": {k: nvr_metrics[k] for k in ("ndcg@10", "recall@100", "mrr@10")}, "beir": beir_metrics,
        "ndcg@10_diff": nvr_metrics["ndcg@10"] - beir_metrics["ndcg@10"],
        "nvr_metric_on_beir_run_ndcg@10": on_beir_run,
        "wall_s": {"nvr_cold_cache": t_cold, "nvr_warm_cache": t_warm, "beir": t_beir},
        "time_ratio": {"cold": t_cold / t_beir, "warm": t_warm / t_beir},
        "same_metrics_warm": nvr_warm["datasets"][name] == nvr_metrics,
    }
    print(f"model {args.model}  dataset {name}")
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        print(f"  {metric:<11} nvr {nvr_metrics[metric]:.6f}   beir {beir_metrics[metric]:.6f}")
    print(f"  NDCG@10 diff {report['ndcg@10_diff']:+.2e} (BEIR rounds to 5 decimals; target |diff| <= 1e-4)")
    print(f"  nvr metric code on BEIR's run: NDCG@10 {on_beir_run:.6f}")
    print(f"  wall: nvr cold {t_cold:.1f}s, nvr warm cache {t_warm:.1f}s, beir {t_beir:.1f}s "
          f"-> ratio cold {t_cold / t_beir:.2f}x, warm {t_warm / t_beir:.2f}x (target <= 0.8x)")
    if args.output:
        from nvr.utils.atomic import write_text_atomic

        write_text_atomic(args.output, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
