"""nvr mine vs sentence-transformers ``mine_hard_negatives`` on the same model, data and filter, in one run.

Each side runs in its own subprocess (own peak RSS), both cold (empty caches), same model, data, max length (256),
batch size (32) and fp32 on the same torch threads. "wall" is the whole child process, interpreter start and
imports included, because both tools pay them on every run. Prints wall-time and peak-RSS ratios (targets: wall
<= 0.5x, RSS <= 0.7x), the overlap of selected negatives, and a 10-config filter sweep, warm on both sides: nvr
re-filters its cached candidate table, ST re-runs ``mine_hard_negatives`` with the embedding cache of its cold run
(target: >= 50x faster). A missed target is printed as MISSED, not hidden.

    python benchmarks/mine_vs_st.py [--beir DIR] [--max_queries N] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import default_beir_dir, emit, run_role

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
NUM_NEG = 4
MAX_LEN = 256
# (label, nvr FilterConfig kwargs, ST mine_hard_negatives kwargs): the same rule expressed in both tools.
SWEEP = [
    ("naive_topk", {"method": "naive_topk"}, {}),
    ("shifted_5", {"method": "topk_shifted", "shift": 5}, {"range_min": 5}),
    ("shifted_10", {"method": "topk_shifted", "shift": 10}, {"range_min": 10}),
    ("abs_0.5", {"method": "topk_abs", "max_score": 0.5}, {"max_score": 0.5}),
    ("abs_0.7", {"method": "topk_abs", "max_score": 0.7}, {"max_score": 0.7}),
    ("marginpos_0.05", {"method": "topk_marginpos", "margin": 0.05}, {"absolute_margin": 0.05}),
    ("marginpos_0.1", {"method": "topk_marginpos", "margin": 0.1}, {"absolute_margin": 0.1}),
    ("percpos_0.9", {"method": "topk_percpos", "perc": 0.9}, {"relative_margin": 0.1}),
    ("percpos_0.95", {"method": "topk_percpos", "perc": 0.95}, {"relative_margin": 0.05}),
    ("percpos_0.98", {"method": "topk_percpos", "perc": 0.98}, {"relative_margin": 0.02}),
]


def load_pairs(beir_dir: str, max_queries: int | None):
    """(query ids, query texts, positive doc ids per query, corpus) from the BEIR train split."""
    from nvr.data.beir import load_beir, positives_from_qrels

    ds = load_beir(beir_dir, "train")
    positives = positives_from_qrels(ds.qrels, ds.queries, 1)
    positives = positives[0] if isinstance(positives, tuple) else positives
    qids = [q for q in ds.queries.ids if q in positives][: max_queries or None]
    return qids, [ds.queries.texts[ds.queries.index[q]] for q in qids], positives, ds.corpus


def role_st(args) -> None:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from nvr.utils.models import resolve_model_path

    t0 = time.perf_counter()
    qids, qtexts, positives, corpus = load_pairs(args.beir, args.max_queries)
    anchors, pos_texts = [], []
    for qid, qt in zip(qids, qtexts):
        for d in positives[qid]:
            anchors.append(qt)
            pos_texts.append(corpus.passage(corpus.index[d]))
    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.max_seq_length = MAX_LEN
    corpus_texts = corpus.passages(range(len(corpus)))
    configs = SWEEP if args.sweep else [s for s in SWEEP if s[0] == "percpos_0.95"]
    per_config, negatives = {}, {}
    for label, _, st_kwargs in configs:
        t1 = time.perf_counter()
        out = mine_hard_negatives(
            Dataset.from_dict({"anchor": anchors, "positive": pos_texts}), model, corpus=corpus_texts,
            num_negatives=NUM_NEG, sampling_strategy="top", output_format="n-tuple", batch_size=32, use_faiss=True,
            verbose=False, cache_folder=args.cache, **st_kwargs,
        )
        per_config[label] = round(time.perf_counter() - t1, 3)
        if label == "percpos_0.95":
            text_to_id = {corpus.passage(i): corpus.ids[i] for i in range(len(corpus))}
            for row in out:
                negs = [text_to_id[row[f"negative_{j}"]] for j in range(1, NUM_NEG + 1)]
                negatives[row["anchor"]] = negs
    Path(args.out).write_text(json.dumps(negatives))
    emit({"wall_s": round(time.perf_counter() - t0, 3), "per_config_s": per_config})


def role_nvr(args) -> None:
    from nvr.mining.config import DataSource, FilterConfig, MineConfig, TeacherConfig
    from nvr.mining.mined_set import load_mined
    from nvr.mining.pipeline import mine

    t0 = time.perf_counter()
    cfg = MineConfig(
        data=DataSource(beir_dir=args.beir, split="train", max_queries=args.max_queries),
        teachers=[TeacherConfig(name="minilm", model_name_or_path=MODEL, query_max_length=MAX_LEN,
                                passage_max_length=MAX_LEN, batch_size=32)],
        output_dir=str(Path(args.cache) / "mined"), num_negatives=NUM_NEG,
        filter=FilterConfig(method="topk_percpos", perc=0.95), cache_dir=args.cache, overwrite=True,
    )
    out = mine(cfg)
    wall = time.perf_counter() - t0
    negatives = {ex.query: list(ex.negative_ids) for ex in load_mined(out)}
    Path(args.out).write_text(json.dumps(negatives))
    emit({"wall_s": round(wall, 3)})


def role_nvr_sweep(args) -> None:
    """Re-filter the candidate table the ``nvr`` role cached: no encoding, no search."""
    from nvr.mining.config import FilterConfig, SamplerConfig
    from nvr.mining.filters import apply_filter
    from nvr.mining.samplers import select
    from nvr.mining.table import CandidateTable

    t0 = time.perf_counter()
    table_dir = next(p.parent for p in sorted(Path(args.cache).rglob("cand_idx.npy")))
    table = CandidateTable.load(table_dir)
    load_s = time.perf_counter() - t0
    per_config = {}
    for label, filt_kwargs, _ in SWEEP:
        t1 = time.perf_counter()
        result = apply_filter(table, FilterConfig(**filt_kwargs))
        select(result.keep, table.cand_scores, SamplerConfig(), NUM_NEG, 42, table.query_ids)
        per_config[label] = round(time.perf_counter() - t1, 5)
    emit({"wall_s": round(time.perf_counter() - t0, 4), "table_load_s": round(load_s, 4), "per_config_s": per_config})


def jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def run_once(args: argparse.Namespace, work: Path, sweep: bool) -> dict:
    """One cold ST run and one cold nvr run (and, when ``sweep``, the warm 10-config sweeps) in fresh folders."""
    common = ["--beir", args.beir] + (["--max_queries", str(args.max_queries)] if args.max_queries else [])
    script = Path(__file__)
    st = run_role(script, "st", *common, "--cache", str(work / "st"), "--out", str(work / "st.json"))
    nv = run_role(script, "nvr", *common, "--cache", str(work / "nvr"), "--out", str(work / "nvr.json"))
    st_neg, nv_neg = json.loads((work / "st.json").read_text()), json.loads((work / "nvr.json").read_text())
    common_q = sorted(set(st_neg) & set(nv_neg))
    row = {
        "st": st, "nvr": nv, "st_queries": len(st_neg), "nvr_queries": len(nv_neg), "common_queries": len(common_q),
        "jaccard": sum(jaccard(st_neg[q], nv_neg[q]) for q in common_q) / max(1, len(common_q)),
        "identical": sum(st_neg[q] == nv_neg[q] for q in common_q) / max(1, len(common_q)),
    }
    if sweep:  # ST reuses the embedding cache of its cold run, nvr the candidate table of its cold run
        row["st_sweep"] = run_role(script, "st", *common, "--sweep", "--cache", str(work / "st"),
                                   "--out", str(work / "st_sweep.json"))
        row["nvr_sweep"] = run_role(script, "nvr_sweep", *common, "--cache", str(work / "nvr"))
    return row


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_summary(rows: list[dict], beir: str) -> None:
    """Median over repeats of the cold comparison, then the sweep (from the first repeat)."""
    def med(values: list[float]) -> float:
        return float(sorted(values)[len(values) // 2])

    st_wall = med([r["st"]["process_wall_s"] for r in rows])
    nv_wall = med([r["nvr"]["process_wall_s"] for r in rows])
    st_rss = med([r["st"]["peak_rss_mb"] for r in rows])
    nv_rss = med([r["nvr"]["peak_rss_mb"] for r in rows])
    first = rows[0]
    print(f"\nmine: TopK-PercPos 0.95 (ST relative_margin 0.05), {NUM_NEG} negatives, max length {MAX_LEN}, "
          f"batch 32, {MODEL}, {beir}; median of {len(rows)} cold run(s)")
    print(f"{'':26}{'ST':>10}{'nvr':>10}{'nvr/ST':>9}  target")
    print(f"{'wall time, process (s)':26}{st_wall:>10.1f}{nv_wall:>10.1f}{nv_wall / st_wall:>9.2f}  <= 0.5 "
          f"{verdict(nv_wall <= 0.5 * st_wall)}")
    print(f"{'peak RSS (MB)':26}{st_rss:>10.0f}{nv_rss:>10.0f}{nv_rss / st_rss:>9.2f}  <= 0.7 "
          f"{verdict(nv_rss <= 0.7 * st_rss)}")
    for i, r in enumerate(rows):
        print(f"  run {i + 1}: wall ST {r['st']['process_wall_s']:.1f}s nvr {r['nvr']['process_wall_s']:.1f}s; "
              f"RSS ST {r['st']['peak_rss_mb']:.0f} nvr {r['nvr']['peak_rss_mb']:.0f} MB")
    if "st_sweep" in first:
        st_sweep_s = sum(first["st_sweep"]["per_config_s"].values())
        nv_sweep_s = first["nvr_sweep"]["wall_s"]
        speedup = st_sweep_s / nv_sweep_s
        print(f"{'10-config sweep, warm (s)':26}{st_sweep_s:>10.2f}{nv_sweep_s:>10.4f}{speedup:>8.0f}x  >= 50x "
              f"{verdict(speedup >= 50)}  (nvr table load {first['nvr_sweep']['table_load_s']:.3f}s included)")
    print(f"negatives: ST wrote {first['st_queries']} queries, nvr {first['nvr_queries']}; {first['common_queries']} "
          f"in both; mean Jaccard {first['jaccard']:.3f}; identical lists {first['identical']:.1%}")
    print("ST drops a query when fewer than num_negatives candidates survive in its top range_max (= 10 x negatives"
          " + positives); nvr re-searches such queries at max_depth first and keeps them (shortfall keep_short).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", default="main")
    p.add_argument("--beir", default=str(default_beir_dir()))
    p.add_argument("--max_queries", type=int, default=None)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="cold ST + nvr pairs to run (the median is reported)")
    p.add_argument("--no_sweep", action="store_true", help="skip the 10-config sweep")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    args = p.parse_args()
    roles = {"st": role_st, "nvr": role_nvr, "nvr_sweep": role_nvr_sweep}
    if args.role in roles:
        roles[args.role](args)
        return
    root = Path(tempfile.mkdtemp(prefix="nvr-bench-"))
    rows = []
    for i in range(args.repeats):
        rows.append(run_once(args, root / f"run{i}", sweep=(i == 0 and not args.no_sweep)))
        print(f"run {i + 1}/{args.repeats} done: {json.dumps(rows[-1])}", flush=True)
    print_summary(rows, args.beir)
    if args.json:
        from nvr.utils.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"beir": args.beir, "runs": rows}, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
