"""How exact_topk scales: wall time and peak RSS against embedding bytes, one fresh process per corpus size.

    python benchmarks/scale_mining.py                                   # quick: 20k and 50k docs, 2k queries
    python benchmarks/scale_mining.py --docs 100000 300000 1000000 --queries 100000 --memory-mb 1024

Random unit vectors (seeded) stand in for embeddings; exact search cost does not depend on what they encode.
Each size runs in a child process so its peak RSS is its own. "search RSS" is the peak growth during the search
on top of the embeddings themselves, which the memory_mb budget is meant to bound.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from nvr.utils.seeding import rng_for


def unit_vectors(n: int, dim: int, seed: int, key: str, chunk: int = 65536) -> np.ndarray:
    """``[n, dim]`` float32 unit vectors, generated in chunks so the peak stays near the array's own size."""
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        block = rng_for(seed, key, a).standard_normal((min(chunk, n - a), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[a : a + len(block)] = block
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(n_docs: int, n_queries: int, dim: int, k: int, memory_mb: float, gpu: bool | None, seed: int) -> dict:
    from nvr.mining.search import exact_topk

    rss_start = peak_rss_mb()
    docs = unit_vectors(n_docs, dim, seed, "docs")
    queries = unit_vectors(n_queries, dim, seed, "queries")
    rss_data = peak_rss_mb()
    started = time.perf_counter()
    scores, idx = exact_topk(queries, docs, k, memory_mb=memory_mb, use_gpu=gpu)
    wall = time.perf_counter() - started
    assert idx.shape == (n_queries, k) and (idx >= 0).all() and np.isfinite(scores).all()
    emb_mb = (docs.nbytes + queries.nbytes) / 2**20
    return {
        "docs": n_docs, "queries": n_queries, "dim": dim, "k": k, "memory_mb": memory_mb, "emb_mb": emb_mb,
        "wall_s": wall, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": rss_start,
        "search_rss_mb": peak_rss_mb() - rss_data, "qps": n_queries / wall,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[20000, 50000], help="corpus sizes to run")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--memory-mb", type=float, default=1024)
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="faiss-gpu: auto-detect / force")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    if args.child:
        row = run_one(args.docs[0], args.queries, args.dim, args.k, args.memory_mb, gpu, args.seed)
        print(json.dumps(row))
        return
    rows = []
    for n_docs in args.docs:
        cmd = [sys.executable, __file__, "--child", "--docs", str(n_docs), "--queries", str(args.queries),
               "--dim", str(args.dim), "--k", str(args.k), "--memory-mb", str(args.memory_mb), "--gpu", args.gpu,
               "--seed", str(args.seed)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print_table(rows)
    if args.json:
        from nvr.utils.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=2))


def print_table(rows: list[dict]) -> None:
    head = f"{'docs':>9} {'queries':>8} {'emb MB':>8} {'wall s':>8} {'x time':>7} {'q/s':>8} {'peak RSS':>9} " \
           f"{'search RSS':>10} {'RSS/emb':>8}"
    print("\n" + head)
    for i, r in enumerate(rows):
        growth = f"{r['wall_s'] / rows[i - 1]['wall_s']:.2f}" if i else "-"
        print(f"{r['docs']:>9} {r['queries']:>8} {r['emb_mb']:>8.0f} {r['wall_s']:>8.2f} {growth:>7} "
              f"{r['qps']:>8.0f} {r['peak_rss_mb']:>9.0f} {r['search_rss_mb']:>10.0f} "
              f"{r['peak_rss_mb'] / r['emb_mb']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
