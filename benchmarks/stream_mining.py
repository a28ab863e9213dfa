"""Peak RSS of ``nvr mine`` in memory vs streaming (``stream_chunk_queries``) on a synthetic BEIR set.

    python benchmarks/stream_mining.py                         # 60k queries x depth 200, 120k docs, chunks of 5k
    python benchmarks/stream_mining.py --queries 20000 --docs 50000 --depth 100 --chunk 2000

The teacher is ``kind: random`` (a seeded draw of ``depth`` docs per query: no model, no search), so the run time
goes to what streaming changes: the (Q, depth) candidate tables, the filter masks, the selection and the mined
rows. Each mode runs in its own process (``VmHWM`` is its own peak); ``load`` only loads the data (queries,
positives, corpus texts), the floor both modes share. The mined.jsonl sha256 of both modes is printed: equal.
``sweep`` streams again over the ``stream`` run's cache with another filter (``topk_shifted``): every chunk table
comes from the chunked table cache, as in a filter sweep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_beir(folder: Path, n_docs: int, n_queries: int) -> Path:
    """Short generated passages and queries, 1-2 positives per query (train qrels)."""
    import numpy as np

    if (folder / "qrels" / "train.tsv").exists():
        return folder
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for d in range(n_docs):
            fh.write(json.dumps({"_id": f"d{d}", "title": "", "text": f"passage {d} about topic {d % 997}"}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as fh:
        for q in range(n_queries):
            fh.write(json.dumps({"_id": f"q{q}", "text": f"question {q} on topic {q % 997}"}) + "\n")
    with open(folder / "qrels" / "train.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q in range(n_queries):
            for d in sorted(set(rng.integers(0, n_docs, size=int(rng.integers(1, 3))).tolist())):
                fh.write(f"q{q}\td{d}\t1\n")
    return folder


def role(args: argparse.Namespace) -> None:
    from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig
    from nvr.mining.pipeline import load_data, mine

    cfg = MineConfig(data=DataSource(beir_dir=args.beir), teachers=[TeacherConfig(name="random", kind="random")],
                     output_dir=args.out, cache_dir=args.cache, depth=args.depth, max_depth=args.depth,
                     num_negatives=args.k, overwrite=True,
                     filter=FilterConfig(method="topk_shifted", shift=1) if args.role == "sweep" else
                     FilterConfig(method="naive_topk"),
                     stream_chunk_queries=args.chunk if args.role in ("stream", "sweep") else None)
    started = time.perf_counter()
    digest = None
    if args.role == "load":
        load_data(cfg.data)
    else:
        out = mine(cfg)
        digest = hashlib.sha256((out / "mined.jsonl").read_bytes()).hexdigest()[:16]
    print("RESULT " + json.dumps({"wall_s": round(time.perf_counter() - started, 1),
                                  "peak_rss_mb": round(peak_rss_mb(), 1), "mined_sha256": digest}), flush=True)


def run(mode: str, args: argparse.Namespace, beir: Path, work: Path) -> dict:
    cache = work / f"cache-{'stream' if mode == 'sweep' else mode}"  # the sweep reuses the stream run's tables
    cmd = [sys.executable, __file__, "--role", mode, "--beir", str(beir), "--out", str(work / mode),
           "--cache", str(cache), "--depth", str(args.depth), "--k", str(args.k), "--chunk", str(args.chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=60_000)
    parser.add_argument("--docs", type=int, default=120_000)
    parser.add_argument("--depth", type=int, default=200)
    parser.add_argument("--k", type=int, default=8, help="num_negatives")
    parser.add_argument("--chunk", type=int, default=5000, help="stream_chunk_queries")
    parser.add_argument("--role", choices=["load", "memory", "stream", "sweep"], default=None)
    parser.add_argument("--beir")
    parser.add_argument("--out")
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.role is not None:
        role(args)
        return
    with tempfile.TemporaryDirectory(prefix="nvr-stream-bench-") as tmp:
        work = Path(tmp)
        beir = write_beir(work / "beir", args.docs, args.queries)
        results = {mode: run(mode, args, beir, work) for mode in ("load", "memory", "stream", "sweep")}
    print(f"{args.queries} queries x depth {args.depth}, {args.docs} docs, k={args.k}, chunks of {args.chunk}")
    print(f"{'mode':<8}{'wall (s)':>10}{'peak RSS (MB)':>16}{'above load (MB)':>18}  mined sha256")
    floor = results["load"]["peak_rss_mb"]
    for mode, r in results.items():
        print(f"{mode:<8}{r['wall_s']:>10}{r['peak_rss_mb']:>16}{r['peak_rss_mb'] - floor:>18.1f}  "
              f"{r['mined_sha256'] or '-'}")
    mem, stream = results["memory"], results["stream"]
    print(f"peak RSS memory / stream: {mem['peak_rss_mb'] / stream['peak_rss_mb']:.2f}x; above the load floor: "
          f"{(mem['peak_rss_mb'] - floor) / max(stream['peak_rss_mb'] - floor, 1e-9):.1f}x; identical mined.jsonl: "
          f"{mem['mined_sha256'] == stream['mined_sha256']}")


if __name__ == "__main__":
    main()
