"""Quality guard of ``dtype: auto`` (bf16 autocast on bf16 hardware) vs ``float32`` with the real MiniLM.

For each dataset: ``nvr eval`` (test split, NDCG@10) and ``nvr mine`` (train split, TopK-PercPos 0.95, 4 negatives)
share one cache per dtype, so the corpus is encoded once per dtype. Printed per dataset: resolved dtype, corpus
encode time, mean / min cosine of corpus embeddings auto vs fp32, share of queries with identical mined negative
lists (target >= 97%), NDCG@10 of both and the difference (target <= 0.002). Missed targets print MISSED.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bf16_quality.py [--datasets cranfield scifact]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = [REPO.parent / "shared" / "data", Path("/work/shared/data")]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DATASETS = {"cranfield": [*(d / "cranfield" for d in SHARED), REPO / "nvr" / "resources" / "cranfield"],
            "scifact": [d / "scifact" for d in SHARED]}
TARGET_OVERLAP = 0.97
TARGET_NDCG_DIFF = 0.002


def run_dtype(data: Path, dtype: str, cache: Path, passage_max_length: int) -> dict:
    """Evaluate + mine with one dtype in one cache; returns metrics, timings, corpus embeddings, mined negatives."""
    from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig
    from nvr.data.beir import load_beir
    from nvr.evaluation.evaluate import evaluate_model
    from nvr.mining.mined_set import load_mined
    from nvr.mining.pipeline import mine
    from nvr.teachers.dense import DenseTeacher

    t0 = time.perf_counter()
    result = evaluate_model(MODEL, [str(data)], max_length=passage_max_length, query_max_length=64, dtype=dtype,
                            cache_dir=str(cache), device="cpu", batch_size=64)
    eval_s = time.perf_counter() - t0
    teacher = TeacherConfig(name="minilm", model_name_or_path=MODEL, query_max_length=64,
                            passage_max_length=passage_max_length, batch_size=64, dtype=dtype, device="cpu")
    t0 = time.perf_counter()
    out = mine(MineConfig(data=DataSource(beir_dir=str(data), split="train"), teachers=[teacher], num_negatives=4,
                          filter=FilterConfig(method="topk_percpos", perc=0.95), cache_dir=str(cache),
                          output_dir=str(cache.parent / f"mined-{dtype}"), overwrite=True))
    mine_s = time.perf_counter() - t0
    corpus = load_beir(str(data), "train").corpus
    dense = DenseTeacher(teacher, cache)
    docs = np.array(dense.encode_passages(corpus.passages()))  # served from the cache eval + mining wrote
    negatives = {ex.query_id: list(ex.negative_ids) for ex in load_mined(out)}
    return {"label": dense.dtype_label, "ndcg": next(iter(result["datasets"].values()))["ndcg@10"],
            "eval_s": eval_s, "mine_s": mine_s, "docs": docs, "negatives": negatives}


def compare(name: str, data: Path, passage_max_length: int, work_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bf16-{name}-") as tmp:
        root = Path(work_dir) / name if work_dir else Path(tmp)
        runs = {d: run_dtype(data, d, root / d / "cache", passage_max_length) for d in ("float32", "auto")}
    fp32, auto = runs["float32"], runs["auto"]
    cos = (fp32["docs"] * auto["docs"]).sum(1) / (
        np.linalg.norm(fp32["docs"], axis=1) * np.linalg.norm(auto["docs"], axis=1))
    qids = sorted(set(fp32["negatives"]) | set(auto["negatives"]))
    same = sum(fp32["negatives"].get(q) == auto["negatives"].get(q) for q in qids) / max(1, len(qids))
    same_set = sum(set(fp32["negatives"].get(q, [])) == set(auto["negatives"].get(q, [])) for q in qids)
    shared = [len(set(fp32["negatives"].get(q, [])) & set(auto["negatives"].get(q, [])))
              / max(1, len(fp32["negatives"].get(q, [])), len(auto["negatives"].get(q, []))) for q in qids]
    return {
        "dataset": name, "docs": len(cos), "queries_mined": len(qids), "passage_max_length": passage_max_length,
        "auto_resolves_to": auto["label"], "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
        "identical_negative_lists": same, "identical_negative_sets": same_set / max(1, len(qids)),
        "negatives_in_common": float(np.mean(shared)) if shared else 1.0,
        "ndcg@10_fp32": fp32["ndcg"], "ndcg@10_auto": auto["ndcg"], "ndcg@10_diff": auto["ndcg"] - fp32["ndcg"],
        "eval_s_fp32": round(fp32["eval_s"], 1), "eval_s_auto": round(auto["eval_s"], 1),
        "mine_s_fp32": round(fp32["mine_s"], 1), "mine_s_auto": round(auto["mine_s"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--passage_max_length", type=int, default=256)
    p.add_argument("--output", default=None, help="also write the rows as JSON here")
    p.add_argument("--work_dir", default=None, help="keep the caches and mined sets here (default: a temp folder)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in args.datasets:
        data = next((d for d in DATASETS[name] if (d / "corpus.jsonl").exists()), None)
        if data is None:
            print(f"{name}: not found in {[str(d) for d in DATASETS[name]]}; skipped")
            continue
        row = compare(name, data, args.passage_max_length, args.work_dir)
        rows.append(row)
        overlap_ok = row["identical_negative_lists"] >= TARGET_OVERLAP
        ndcg_ok = abs(row["ndcg@10_diff"]) <= TARGET_NDCG_DIFF
        print(f"{name}: {row['docs']} docs, auto -> {row['auto_resolves_to']}, passage max length "
              f"{row['passage_max_length']}")
        print(f"  cosine auto vs fp32: mean {row['mean_cosine']:.6f}, min {row['min_cosine']:.6f}")
        print(f"  identical mined negative lists: {row['identical_negative_lists']:.2%} of {row['queries_mined']} "
              f"queries (sets {row['identical_negative_sets']:.2%}, negatives in common "
              f"{row['negatives_in_common']:.2%}){'' if overlap_ok else '  MISSED (>= 97%)'}")
        print(f"  NDCG@10 fp32 {row['ndcg@10_fp32']:.4f}, auto {row['ndcg@10_auto']:.4f}, diff "
              f"{row['ndcg@10_diff']:+.4f}{'' if ndcg_ok else '  MISSED (<= 0.002)'}")
        print(f"  eval s fp32 {row['eval_s_fp32']} / auto {row['eval_s_auto']}; mine s (corpus cached by eval) "
              f"fp32 {row['mine_s_fp32']} / auto {row['mine_s_auto']}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
