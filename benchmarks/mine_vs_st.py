"""nvr mine vs sentence-transformers ``mine_hard_negatives`` on the same model, data and filter, in one run.

Each side runs in its own subprocess (own peak RSS), cold (empty caches), same model, data, max length (256),
batch size (32) and torch threads. "wall" is the whole child process, interpreter start and imports included,
because both tools pay them on every run. Rows:

* defaults: each tool as a user runs it out of the box: nvr's default teacher ``dtype`` (``auto``: bf16 autocast
  where the hardware runs bf16 fast, else fp32; the resolved dtype is read from the run's manifest), ST's
  ``mine_hard_negatives`` in fp32 (its only precision out of the box). Target: wall <= 0.6x ST.
* equal settings: the same precision in both (``--equal_precision``, fp32 by default: nvr ``dtype: float32``
  against the same ST run; ``bfloat16`` runs ST under ``torch.autocast`` bf16). Target: wall <= 1.0x ST.
* encode-only floor: one plain forward over the same texts (queries + corpus) in the same precision (bare HF
  ``AutoModel`` loop, length-sorted batches of 32, mean pooling), also a whole process: ``nvr / floor`` <= 1.10.

Also printed: peak-RSS ratios, the overlap of selected negatives (with ST, and nvr auto vs fp32), and a 10-config
filter sweep, warm on both sides: nvr re-filters its cached candidate table, ST re-runs ``mine_hard_negatives``
with the embedding cache of its cold run (target: >= 50x faster). A missed target is printed as MISSED.

    python benchmarks/mine_vs_st.py [--beir DIR] [--max_queries N] [--repeats 3] [--equal_precision bfloat16]
                                    [--no_sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import (
    default_beir_dir,
    emit,
    machine_info,
    print_machine,
    resolve_auto_precision,
    run_role,
    verdict,
)

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

PRECISIONS = ("float32", "bfloat16")


def load_pairs(beir_dir: str, max_queries: int | None):
    """(query ids, query texts, positive doc ids per query, corpus) from the BEIR train split."""
    from nvr.data.beir import load_beir, positives_from_qrels

    ds = load_beir(beir_dir, "train")
    positives = positives_from_qrels(ds.qrels, ds.queries, 1)
    positives = positives[0] if isinstance(positives, tuple) else positives
    qids = [q for q in ds.queries.ids if q in positives][: max_queries or None]
    return qids, [ds.queries.texts[ds.queries.index[q]] for q in qids], positives, ds.corpus


def autocast(precision: str):
    """bf16 autocast on CPU for ``bfloat16``, a no-op context for ``float32``."""
    import contextlib

    import torch

    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
        with autocast(args.precision):
            out = mine_hard_negatives(
                Dataset.from_dict({"anchor": anchors, "positive": pos_texts}), model, corpus=corpus_texts,
                num_negatives=NUM_NEG, sampling_strategy="top", output_format="n-tuple", batch_size=32,
                use_faiss=True, verbose=False, cache_folder=args.cache, **st_kwargs,
            )
        per_config[label] = round(time.perf_counter() - t1, 3)
        if label == "percpos_0.95":
            text_to_id = {corpus.passage(i): corpus.ids[i] for i in range(len(corpus))}
            for row in out:
                negs = [text_to_id[row[f"negative_{j}"]] for j in range(1, NUM_NEG + 1)]
                negatives[row["anchor"]] = negs
    Path(args.out).write_text(json.dumps(negatives))
    emit({"wall_s": round(time.perf_counter() - t0, 3), "per_config_s": per_config, "precision": args.precision})


def role_nvr(args) -> None:
    """``nvr mine``; ``--dtype default`` leaves the teacher dtype unset (what a user's config gets)."""
    from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig
    from nvr.mining.mined_set import load_mined
    from nvr.mining.pipeline import mine

    t0 = time.perf_counter()
    dtype = {} if args.dtype == "default" else {"dtype": args.dtype}
    cfg = MineConfig(
        data=DataSource(beir_dir=args.beir, split="train", max_queries=args.max_queries),
        teachers=[TeacherConfig(name="minilm", model_name_or_path=MODEL, query_max_length=MAX_LEN,
                                passage_max_length=MAX_LEN, batch_size=32, **dtype)],
        output_dir=str(Path(args.cache) / "mined"), num_negatives=NUM_NEG,
        filter=FilterConfig(method="topk_percpos", perc=0.95), cache_dir=args.cache, overwrite=True,
    )
    out = mine(cfg)
    wall = time.perf_counter() - t0
    negatives = {ex.query: list(ex.negative_ids) for ex in load_mined(out)}
    Path(args.out).write_text(json.dumps(negatives))
    emit({"wall_s": round(wall, 3), "config_dtype": cfg.teachers[0].dtype,
          "resolved_dtype": manifest_dtype(Path(out) / "manifest.json", cfg.teachers[0].dtype)})


def manifest_dtype(manifest: Path, configured: str) -> str:
    """The encoding dtype the run recorded for its teacher (``auto`` resolved), else the configured one."""
    try:
        teacher = json.loads(manifest.read_text(encoding="utf-8"))["teachers"][0]
    except (OSError, KeyError, IndexError, ValueError):
        return configured if configured != "auto" else resolve_auto_precision()
    found = [str(v) for k, v in _walk(teacher) if "dtype" in k and str(v) != "auto"]
    if any("bfloat16" in v for v in found):  # "autocast-bfloat16" (auto) or "bfloat16" (bf16 weights)
        return "bfloat16"
    if found:
        return "float16" if any("float16" in v for v in found) else "float32"
    return configured if configured != "auto" else resolve_auto_precision()


def _walk(obj, prefix: str = ""):
    """(dotted key, value) for every leaf of a JSON object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, obj


def role_floor(args) -> None:
    """Encode-only floor: import, load, tokenize and one plain forward over the queries and the corpus."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from nvr.utils.models import resolve_model_path

    t0 = time.perf_counter()
    _, qtexts, _, corpus = load_pairs(args.beir, args.max_queries)
    texts = list(qtexts) + corpus.passages(range(len(corpus)))
    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    t1 = time.perf_counter()
    with torch.inference_mode(), autocast(args.precision):
        for start in range(0, len(order), 32):
            idx = order[start:start + 32]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LEN,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            out[idx] = emb.numpy()
    forward_s = time.perf_counter() - t1
    emit({"wall_s": round(time.perf_counter() - t0, 3), "forward_s": round(forward_s, 3), "texts": len(texts),
          "precision": args.precision})


def role_nvr_sweep(args) -> None:
    """Re-filter the candidate table the ``nvr`` role cached: no encoding, no search."""
    from nvr.config.mining import FilterConfig, SamplerConfig
    from nvr.mining.filters import apply_filter
    from nvr.mining.samplers import select
    from nvr.search.table import CandidateTable

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


def overlap(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict:
    """Queries in both, mean Jaccard and share of identical negative lists."""
    common = sorted(set(a) & set(b))
    n = max(1, len(common))
    return {"a_queries": len(a), "b_queries": len(b), "common_queries": len(common),
            "jaccard": sum(jaccard(a[q], b[q]) for q in common) / n,
            "identical": sum(a[q] == b[q] for q in common) / n}


class Runner:
    """Runs the roles of one repeat in fresh folders under ``work`` and keeps their negatives."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.work = work
        self.common = ["--beir", args.beir] + (["--max_queries", str(args.max_queries)] if args.max_queries else [])
        self.script = Path(__file__)
        self.negatives: dict[str, dict] = {}

    def run(self, name: str, role: str, *extra: str) -> dict:
        out = self.work / f"{name}.json"
        result = run_role(self.script, role, *self.common, "--cache", str(self.work / name), "--out", str(out),
                          *extra)
        print(f"  {name}: {json.dumps(result)}", flush=True)
        if out.exists():
            self.negatives[name] = json.loads(out.read_text())
        return result


def run_once(args: argparse.Namespace, work: Path, sweep: bool) -> dict:
    """One repeat: cold ST, cold nvr (defaults, equal settings), the encode floors, and optionally the sweeps."""
    r = Runner(args, work)
    row: dict = {"st": r.run("st", "st", "--precision", "float32")}
    row["nvr_default"] = r.run("nvr_default", "nvr", "--dtype", "default")
    auto = row["nvr_default"]["resolved_dtype"]
    eq = args.equal_precision
    if eq == auto:
        row["nvr_equal"] = row["nvr_default"]
        r.negatives["nvr_equal"] = r.negatives["nvr_default"]
    else:
        # nvr's explicit ``bfloat16`` loads bf16 weights; ``auto`` is the bf16 autocast that ST and the floor run
        row["nvr_equal"] = r.run("nvr_equal", "nvr", "--dtype", "float32" if eq == "float32" else "auto")
        if row["nvr_equal"]["resolved_dtype"] != eq:
            raise SystemExit(f"nvr could not run the equal-settings precision {eq} here "
                             f"(resolved {row['nvr_equal']['resolved_dtype']})")
    if eq == "float32":
        row["st_equal"] = row["st"]
        r.negatives["st_equal"] = r.negatives["st"]
    else:
        row["st_equal"] = r.run("st_equal", "st", "--precision", eq)
    row["floor"] = {p: r.run(f"floor_{p}", "floor", "--precision", p) for p in dict.fromkeys([auto, eq])}
    neg = r.negatives
    row["overlap"] = {"default_vs_st": overlap(neg["st"], neg["nvr_default"]),
                      "equal_vs_st": overlap(neg["st_equal"], neg["nvr_equal"]),
                      "nvr_default_vs_nvr_equal": overlap(neg["nvr_equal"], neg["nvr_default"])}
    if sweep:  # ST reuses the embedding cache of its cold run, nvr the candidate table of its cold run
        row["st_sweep"] = run_role(r.script, "st", *r.common, "--sweep", "--precision", "float32",
                                   "--cache", str(work / "st"), "--out", str(work / "st_sweep.json"))
        row["nvr_sweep"] = run_role(r.script, "nvr_sweep", *r.common, "--cache", str(work / "nvr_default"))
    return row


def med(values: list[float]) -> float:
    return float(sorted(values)[len(values) // 2])


def print_summary(rows: list[dict], beir: str, equal_precision: str) -> dict:
    """Median over repeats of each cold row, then the sweep (from the first repeat); returns the verdicts."""
    first = rows[0]
    auto = first["nvr_default"]["resolved_dtype"]
    print(f"\nmine: TopK-PercPos 0.95 (ST relative_margin 0.05), {NUM_NEG} negatives, max length {MAX_LEN}, "
          f"batch 32, {MODEL}, {beir}; median of {len(rows)} cold run(s); wall = whole process")
    print(f"{'row':44}{'ST s':>8}{'nvr s':>8}{'nvr/ST':>8}  target      {'floor s':>8}{'nvr/floor':>10}  target")
    verdicts = {}
    for key, label, st_key, nv_key, prec, target in (
        ("defaults", f"defaults (nvr auto={auto}, ST float32)", "st", "nvr_default", auto, 0.6),
        ("equal", f"equal settings ({equal_precision} both)", "st_equal", "nvr_equal", equal_precision, 1.0),
    ):
        st_w = med([r[st_key]["process_wall_s"] for r in rows])
        nv_w = med([r[nv_key]["process_wall_s"] for r in rows])
        fl_w = med([r["floor"][prec]["process_wall_s"] for r in rows])
        ok_st, ok_fl = nv_w <= target * st_w, nv_w <= 1.10 * fl_w
        verdicts[key] = {"nvr_over_st": round(nv_w / st_w, 3), "target": target, "met": ok_st,
                         "nvr_over_floor": round(nv_w / fl_w, 3), "floor_met": ok_fl}
        print(f"{label:44}{st_w:>8.1f}{nv_w:>8.1f}{nv_w / st_w:>8.2f}  <= {target:<4} {verdict(ok_st):6}"
              f"{fl_w:>8.1f}{nv_w / fl_w:>10.2f}  <= 1.10 {verdict(ok_fl)}")
    for p, fl in first["floor"].items():
        print(f"  floor {p}: {fl['texts']} texts, forward loop {fl['forward_s']:.1f}s of {fl['process_wall_s']:.1f}s "
              f"process")
    st_rss, nv_rss = med([r["st"]["peak_rss_mb"] for r in rows]), med([r["nvr_default"]["peak_rss_mb"] for r in rows])
    eq_rss = med([r["nvr_equal"]["peak_rss_mb"] for r in rows])
    print(f"{'peak RSS (MB), defaults':44}{st_rss:>8.0f}{nv_rss:>8.0f}{nv_rss / st_rss:>8.2f}  <= 0.7  "
          f"{verdict(nv_rss <= 0.7 * st_rss)}")
    print(f"{'peak RSS (MB), equal settings':44}{med([r['st_equal']['peak_rss_mb'] for r in rows]):>8.0f}"
          f"{eq_rss:>8.0f}")
    for i, r in enumerate(rows):
        walls = " ".join(f"{k} {r[k]['process_wall_s']:.1f}s" for k in ("st", "nvr_default", "nvr_equal"))
        print(f"  run {i + 1}: wall {walls}; RSS st {r['st']['peak_rss_mb']:.0f} "
              f"nvr_default {r['nvr_default']['peak_rss_mb']:.0f} MB")
    if "st_sweep" in first:
        st_sweep_s = sum(first["st_sweep"]["per_config_s"].values())
        nv_sweep_s = first["nvr_sweep"]["wall_s"]
        speedup = st_sweep_s / nv_sweep_s
        proc = first["st_sweep"]["process_wall_s"] / first["nvr_sweep"]["process_wall_s"]
        verdicts["sweep"] = {"speedup": round(speedup, 1), "process_speedup": round(proc, 1), "met": speedup >= 50}
        print(f"{'10-config sweep, warm, timed calls (s)':44}{st_sweep_s:>8.2f}{nv_sweep_s:>8.4f}{speedup:>7.0f}x  "
              f">= 50x {verdict(speedup >= 50)}  (nvr table load {first['nvr_sweep']['table_load_s']:.3f}s included)")
        print(f"{'10-config sweep, whole process (s)':44}{first['st_sweep']['process_wall_s']:>8.1f}"
              f"{first['nvr_sweep']['process_wall_s']:>8.2f}{proc:>7.0f}x")
    for name, ov in first["overlap"].items():
        print(f"negatives {name}: {ov['a_queries']} vs {ov['b_queries']} queries, {ov['common_queries']} in both; "
              f"mean Jaccard {ov['jaccard']:.3f}; identical lists {ov['identical']:.1%}")
    print("ST drops a query when fewer than num_negatives candidates survive in its top range_max (= 10 x negatives"
          " + positives); nvr re-searches such queries at max_depth first and keeps them (shortfall keep_short).")
    return verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", default="main")
    p.add_argument("--beir", default=str(default_beir_dir()))
    p.add_argument("--max_queries", type=int, default=None)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--precision", choices=PRECISIONS, default="float32", help="st / floor roles")
    p.add_argument("--dtype", choices=("default", "auto", *PRECISIONS), default="default", help="nvr role")
    p.add_argument("--equal_precision", choices=PRECISIONS, default="float32",
                   help="precision of the equal-settings row (bfloat16: ST under torch.autocast)")
    p.add_argument("--repeats", type=int, default=1, help="cold runs of every row (the median is reported)")
    p.add_argument("--no_sweep", action="store_true", help="skip the 10-config sweep")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    args = p.parse_args()
    roles = {"st": role_st, "nvr": role_nvr, "nvr_sweep": role_nvr_sweep, "floor": role_floor}
    if args.role in roles:
        roles[args.role](args)
        return
    info = machine_info()
    print_machine(info)
    root = Path(tempfile.mkdtemp(prefix="nvr-bench-"))
    rows = []
    for i in range(args.repeats):
        rows.append(run_once(args, root / f"run{i}", sweep=(i == 0 and not args.no_sweep)))
        print(f"run {i + 1}/{args.repeats} done", flush=True)
    verdicts = print_summary(rows, args.beir, args.equal_precision)
    info["load_avg_end"] = machine_info()["load_avg"]
    print(f"load average at the end {info['load_avg_end']}")
    if args.json:
        from nvr.utils.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"beir": args.beir, "machine": info, "verdicts": verdicts,
                                                 "runs": rows}, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
