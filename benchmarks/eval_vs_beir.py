"""``nvr eval`` against the reference BEIR toolkit on the same model and BEIR folder, side by side in one run.

Peer: ``beir`` as shipped (EvaluateRetrieval + DenseRetrievalExactSearch over sentence-transformers in fp32,
metrics by pytrec_eval). Both sides use the model's own settings (MiniLM: mean pooling, normalized, 256 tokens) and
the same batch size. BEIR's exact search silently drops a document whose id equals the query id; Cranfield's query
and doc ids overlap (1..225 vs 1..1400), so the BEIR side gets query ids prefixed with ``q:`` to compare like with
like. Every side runs in its own subprocess; "wall" is the whole process (imports, model load, encode, search,
metrics), as a user pays it.

Rows: defaults (nvr's default ``dtype: auto``, bf16 autocast where the CPU/GPU runs bf16 fast; target cold wall
<= 0.6x BEIR, NDCG@10 within 0.002 of BEIR), equal settings (nvr ``dtype: float32``; target |NDCG@10 diff| <= 1e-4,
wall <= 0.8x), and nvr again with the defaults' embedding cache warm. Also prints NDCG@10 of nvr's metric code on
BEIR's own run (isolates metric differences from embedding differences). A missed target is printed as MISSED.

usage: python benchmarks/eval_vs_beir.py [--model HF_ID_OR_DIR] [--beir ../shared/data/cranfield] [--output x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import default_beir_dir, emit, machine_info, print_machine, run_role, verdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def role_nvr(args: argparse.Namespace) -> None:
    """``nvr eval`` (library call); ``--dtype default`` leaves dtype unset, as a user's command line does."""
    start = time.perf_counter()
    from nvr.evaluation.evaluate import evaluate_model

    dtype = {} if args.dtype == "default" else {"dtype": args.dtype}
    result = evaluate_model(args.model, [args.beir], batch_size=args.batch_size, cache_dir=args.cache,
                            k_values=(10, 100), **dtype)
    metrics = next(iter(result["datasets"].values()))
    emit({"wall_s": round(time.perf_counter() - start, 3), "metrics": {k: metrics[k] for k in METRICS},
          "dtype": result["settings"].get("dtype", args.dtype)})


def role_beir(args: argparse.Namespace) -> None:
    """The ``beir`` package as shipped; writes its run and qrels for the metric cross-check."""
    start = time.perf_counter()
    from beir.datasets.data_loader import GenericDataLoader
    from beir.retrieval import models
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    from nvr.utils.models import resolve_model_path

    corpus, queries, qrels = GenericDataLoader(data_folder=args.beir).load(split="test")
    queries = {f"q:{qid}": text for qid, text in queries.items()}
    qrels = {f"q:{qid}": rel for qid, rel in qrels.items()}
    searcher = DenseRetrievalExactSearch(models.SentenceBERT(resolve_model_path(args.model)),
                                         batch_size=args.batch_size, show_progress_bar=False)
    retriever = EvaluateRetrieval(searcher, score_function="dot", k_values=[10, 100])
    results = retriever.retrieve(corpus, queries)
    ndcg, _map, recall, _precision = retriever.evaluate(qrels, results, [10, 100], ignore_identical_ids=False)
    mrr = retriever.evaluate_custom(qrels, results, [10], metric="mrr")
    wall = time.perf_counter() - start
    Path(args.out).write_text(json.dumps({"run": results, "qrels": qrels}))
    emit({"wall_s": round(wall, 3),
          "metrics": {"ndcg@10": ndcg["NDCG@10"], "recall@100": recall["Recall@100"], "mrr@10": mrr["MRR@10"]}})


def run_all(args: argparse.Namespace, work: Path) -> dict:
    """BEIR, nvr defaults cold + warm, nvr fp32 cold; each in its own process with its own (empty) cache."""
    script = Path(__file__).resolve()
    common = ["--model", args.model, "--beir", args.beir, "--batch_size", str(args.batch_size)]
    runs = {"beir": run_role(script, "beir", *common, "--out", str(work / "beir.json"))}
    print(f"  beir: {json.dumps(runs['beir'])}", flush=True)
    for name, dtype, cache in (("nvr_default_cold", "default", "default"), ("nvr_default_warm", "default", "default"),
                               ("nvr_float32_cold", "float32", "float32")):
        runs[name] = run_role(script, "nvr", *common, "--dtype", dtype, "--cache", str(work / f"cache_{cache}"))
        print(f"  {name}: {json.dumps(runs[name])}", flush=True)
    return runs


def summarize(runs: dict, work: Path) -> dict:
    """Print the comparison table (targets and verdicts) and return it as a dict."""
    from nvr.evaluation.metrics import evaluate_run

    saved = json.loads((work / "beir.json").read_text())
    on_beir_run = evaluate_run(saved["run"], saved["qrels"], k_values=(10,), metrics=("ndcg",))["ndcg@10"]
    beir = runs["beir"]
    for metric in METRICS:
        print(f"  {metric:<11} beir {beir['metrics'][metric]:.6f}   nvr default "
              f"{runs['nvr_default_cold']['metrics'][metric]:.6f}   nvr float32 "
              f"{runs['nvr_float32_cold']['metrics'][metric]:.6f}")
    print(f"  nvr metric code on BEIR's run: NDCG@10 {on_beir_run:.6f}")
    rows = {}
    print(f"{'row':42}{'wall s':>8}{'/beir':>7}  target        NDCG@10 diff  target")
    print(f"{'beir as shipped (fp32)':42}{beir['process_wall_s']:>8.1f}")
    for name, label, wall_target, diff_target in (
        ("nvr_default_cold", f"nvr defaults ({runs['nvr_default_cold']['dtype']}), cold", 0.6, 2e-3),
        ("nvr_float32_cold", "nvr equal settings (float32), cold", 0.8, 1e-4),
        ("nvr_default_warm", "nvr defaults, warm embedding cache", None, 2e-3),
    ):
        run = runs[name]
        ratio = run["process_wall_s"] / beir["process_wall_s"]
        diff = run["metrics"]["ndcg@10"] - beir["metrics"]["ndcg@10"]
        wall_ok = None if wall_target is None else ratio <= wall_target
        diff_ok = abs(diff) <= diff_target
        rows[name] = {"wall_ratio": round(ratio, 3), "wall_target": wall_target, "wall_met": wall_ok,
                      "ndcg@10_diff": diff, "diff_target": diff_target, "diff_met": diff_ok}
        wall_txt = "" if wall_target is None else f"<= {wall_target:<4} {verdict(wall_ok)}"
        print(f"{label:42}{run['process_wall_s']:>8.1f}{ratio:>7.2f}  {wall_txt:12}{diff:>+14.2e}  "
              f"<= {diff_target:.0e} {verdict(diff_ok)}")
    print("  (BEIR rounds its metrics to 5 decimals; RSS MB: " + ", ".join(
        f"{k} {v['peak_rss_mb']:.0f}" for k, v in runs.items()) + ")")
    return {"rows": rows, "nvr_metric_on_beir_run_ndcg@10": on_beir_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["driver", "nvr", "beir"], default="driver")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--beir", default=str(default_beir_dir()))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", default="default", help="nvr role: default (unset), auto, float32, bfloat16")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--output", default=None, help="optional JSON with all numbers")
    args = parser.parse_args()
    if args.role != "driver":
        {"nvr": role_nvr, "beir": role_beir}[args.role](args)
        return
    info = machine_info()
    print_machine(info)
    print(f"model {args.model}  dataset {Path(args.beir).resolve().name}")
    with tempfile.TemporaryDirectory(prefix="nvr-eval-bench-") as tmp:
        runs = run_all(args, Path(tmp))
        summary = summarize(runs, Path(tmp))
    info["load_avg_end"] = machine_info()["load_avg"]
    print(f"load average at the end {info['load_avg_end']}")
    if args.output:
        from nvr.utils.atomic import write_text_atomic

        write_text_atomic(args.output, json.dumps({"machine": info, "model": args.model, "beir": args.beir,
                                                   "runs": runs, **summary}, indent=2))


if __name__ == "__main__":
    main()
