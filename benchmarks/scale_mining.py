"""How exact search scales: one process per corpus size, and sharded search over W gloo processes vs 1.

    python benchmarks/scale_mining.py                                   # quick: 20k and 50k docs, 2k queries
    python benchmarks/scale_mining.py --docs 100000 300000 --queries 10000 --memory-mb 1024
    # sharded: W gloo processes on a memmapped corpus vs 1, identical tables, peak RSS per rank vs its target
    python benchmarks/scale_mining.py --world 1 2 --docs 1000000 --queries 100000
    # streaming: a float16 memmap corpus larger than the RSS budget, one process
    python benchmarks/scale_mining.py --world 1 --docs 10000000 --queries 10000 --storage float16 --memory-mb 256
    # ANN: recall@k of faiss IVF-Flat / HNSW against exact search (same vectors), with their wall times
    python benchmarks/scale_mining.py --ann --docs 20000 --queries 500 [--ann-data random]

Random unit vectors (seeded) stand in for embeddings; exact search cost does not depend on what they encode.
Each run is a child process so its peak RSS is its own. In ``--world`` mode the corpus is written once to a
``.npy`` file (in ``--storage`` dtype) and every rank opens it read-only with ``mmap_mode="r"``: rank r reads only
its rows. The per-rank RSS target is the issue's: its doc shard (float32 bytes) + the queries + 0.5 GiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nvr.utils.seeding import rng_for


def unit_vectors(n: int, dim: int, seed: int, key: str, chunk: int = 65536) -> np.ndarray:
    """``[n, dim]`` float32 unit vectors, generated in chunks so the peak stays near the array's own size."""
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        out[a : a + min(chunk, n - a)] = _unit_block(n, dim, seed, key, a, chunk)
    return out


def _unit_block(n: int, dim: int, seed: int, key: str, a: int, chunk: int) -> np.ndarray:
    block = rng_for(seed, key, a).standard_normal((min(chunk, n - a), dim), dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    return block


def write_vectors(path: Path, n: int, dim: int, seed: int, key: str, storage: str, chunk: int = 65536) -> Path:
    """The same vectors as :func:`unit_vectors`, written chunk by chunk to a ``.npy`` in ``storage`` dtype (cached by
    name, so the W runs of one invocation share the file)."""
    from nvr.teachers.cache import STORAGE_DTYPES, to_storage

    if path.exists():
        return path
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORAGE_DTYPES[storage], shape=(n, dim))
    for a in range(0, n, chunk):
        out[a : a + min(chunk, n - a)] = to_storage(_unit_block(n, dim, seed, key, a, chunk), storage)
    out.flush()
    del out
    os.replace(tmp, path)
    return path


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (its own address space; ``ru_maxrss`` would include the parent's RSS at
    fork, which Linux carries across exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(n_docs: int, n_queries: int, dim: int, k: int, memory_mb: float, gpu: bool | None, seed: int) -> dict:
    from nvr.search.exact import exact_topk

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


# ---------------------------------------------------------------------------------------------------- sharded


def run_rank(args: argparse.Namespace) -> dict:
    """One rank of a sharded run: gloo group from a file, memmapped corpus, ``sharded_topk``; rank 0 saves the table."""
    import torch.distributed as dist

    from nvr.search.sharded import shard_bounds, sharded_topk
    from nvr.teachers.cache import from_storage

    rank, world = args.child_rank, args.child_world
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=rank, world_size=world)
    data = Path(args.data)
    docs = from_storage(np.load(data / "docs.npy", mmap_mode="r"), args.storage)
    queries = np.load(data / "queries.npy")
    rss_start = peak_rss_mb()
    started = time.perf_counter()
    scores, idx = sharded_topk(queries, docs, args.k, memory_mb=args.memory_mb, use_gpu=None,
                               chunk_queries=args.chunk_queries, rank_world=None if world > 1 else (0, 1))
    wall = time.perf_counter() - started
    lo, hi = shard_bounds(docs.shape[0], rank, world)
    digest = hashlib.sha256(scores.tobytes() + idx.tobytes()).hexdigest()[:16]
    if world > 1:
        dist.destroy_process_group()
    shard_mb = (hi - lo) * docs.shape[1] * 4 / 2**20
    return {"world": world, "rank": rank, "docs": docs.shape[0], "queries": queries.shape[0], "dim": docs.shape[1],
            "k": args.k, "storage": args.storage, "memory_mb": args.memory_mb, "wall_s": wall,
            "pairs_per_s": queries.shape[0] * (hi - lo) / wall, "base_rss_mb": rss_start,
            "peak_rss_mb": peak_rss_mb(), "target_rss_mb": shard_mb + queries.nbytes / 2**20 + 512,
            "shard_file_mb": (hi - lo) * docs.shape[1] * np.dtype(docs.bits.dtype if hasattr(docs, "bits")
                                                                  else docs.dtype).itemsize / 2**20,
            "table_sha256": digest}


def run_world(args: argparse.Namespace, world: int, data: Path) -> list[dict]:
    init = data / f"init-{world}-{time.time_ns()}"
    cmd = [sys.executable, __file__, "--child-rank", "0", "--child-world", str(world), "--init", str(init),
           "--data", str(data), "--storage", args.storage, "--k", str(args.k), "--memory-mb", str(args.memory_mb),
           "--chunk-queries", str(args.chunk_queries)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    started = time.perf_counter()
    procs = []
    for r in range(world):
        cmd[3] = str(r)
        procs.append(subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    rows = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"rank failed ({p.returncode}):\n{err[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for r in rows:
        r["launch_wall_s"] = time.perf_counter() - started
    return rows


def sharded_main(args: argparse.Namespace) -> list[dict]:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="nvr-scale-"))
    rows: list[dict] = []
    for n_docs in args.docs:
        data = root / f"d{n_docs}-q{args.queries}-h{args.dim}-{args.storage}-s{args.seed}"
        data.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_vectors(data / "docs.npy", n_docs, args.dim, args.seed, "docs", args.storage)
        if not (data / "queries.npy").exists():
            np.save(data / "queries.npy", unit_vectors(args.queries, args.dim, args.seed, "queries"))
        print(f"data ready in {time.perf_counter() - t0:.0f}s: {data}", flush=True)
        for world in args.world:
            rows += run_world(args, world, data)
            print_sharded(rows)
    return rows


def print_sharded(rows: list[dict]) -> None:
    print(f"\n{'docs':>9} {'queries':>8} {'store':>8} {'W':>2} {'rank':>4} {'wall s':>8} {'vs W=1':>7} "
          f"{'Mpairs/s':>9} {'peak RSS':>9} {'target':>8} {'shard MB':>9} {'table':>17}")
    for r in rows:
        one = [x for x in rows if x["docs"] == r["docs"] and x["world"] == 1]
        speed = f"{one[0]['wall_s'] / r['wall_s']:.2f}" if one else "-"
        same = "" if not one else (" same" if one[0]["table_sha256"] == r["table_sha256"] else " DIFF")
        print(f"{r['docs']:>9} {r['queries']:>8} {r['storage']:>8} {r['world']:>2} {r['rank']:>4} "
              f"{r['wall_s']:>8.1f} {speed:>7} {r['pairs_per_s'] / 1e6:>9.1f} {r['peak_rss_mb']:>9.0f} "
              f"{r['target_rss_mb']:>8.0f} {r['shard_file_mb']:>9.0f} {r['table_sha256']}{same}", flush=True)


# ------------------------------------------------------------------------------------------------------- ANN


def ann_main(args: argparse.Namespace) -> list[dict]:
    """recall@k of ``nvr.search.ann.ann_topk`` (faiss IVF-Flat / HNSW, what ``search: ivf|hnsw`` runs) against
    exact search over the same vectors: random unit vectors (no structure: the worst case for any ANN index) or a
    clustered mixture (closer to real embeddings)."""
    from nvr.search.ann import ann_topk
    from nvr.search.exact import exact_topk

    rows = []
    for n_docs in args.docs:
        docs, queries = _ann_data(n_docs, args)
        t0 = time.perf_counter()
        _, exact = exact_topk(queries, docs, args.k, memory_mb=args.memory_mb)
        rows.append({"docs": n_docs, "data": args.ann_data, "method": "exact", "wall_s": time.perf_counter() - t0,
                     "recall": 1.0})
        for method, params in (("ivf", {"nprobe": 32}), ("ivf", {"nprobe": 128}), ("hnsw", {"ef_search": 256})):
            t0 = time.perf_counter()
            _, got = ann_topk(queries, docs, args.k, method, params)
            label = f"{method} " + ",".join(f"{k}={v}" for k, v in params.items())
            rows.append({"docs": n_docs, "data": args.ann_data, "method": label, "wall_s": time.perf_counter() - t0,
                         "recall": _recall(got, exact)})
        for r in rows:
            print(f"{r['docs']:>9} {r['data']:>9} {r['method']:>20} wall {r['wall_s']:>7.1f}s (incl. build)  "
                  f"recall@{args.k} {r['recall']:.4f}", flush=True)
    return rows


def _ann_data(n_docs: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    if args.ann_data == "random":
        return unit_vectors(n_docs, args.dim, args.seed, "docs"), unit_vectors(args.queries, args.dim, args.seed,
                                                                               "queries")
    rng = rng_for(args.seed, "clusters")
    centers = unit_vectors(max(8, n_docs // 500), args.dim, args.seed, "centers")

    def around(n: int) -> np.ndarray:
        x = centers[rng.integers(0, len(centers), n)] + 0.05 * rng.standard_normal((n, args.dim), dtype=np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return around(n_docs), around(args.queries)


def _recall(got: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(g[g >= 0].tolist()) & set(e.tolist())) for g, e in zip(got, exact))
    return hits / exact.size


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[20000, 50000], help="corpus sizes to run")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--memory-mb", type=float, default=1024)
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="CUDA backend: auto-detect / force")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=int, nargs="+", default=None, help="sharded mode: world sizes to compare")
    p.add_argument("--storage", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--chunk-queries", type=int, default=8192)
    p.add_argument("--workdir", default=None, help="where --world mode writes the corpus files (default: a temp dir)")
    p.add_argument("--ann", action="store_true", help="recall@k of faiss IVF-Flat / HNSW vs exact")
    p.add_argument("--ann-data", choices=["clustered", "random"], default="clustered")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--init", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    if args.child_rank is not None:
        print(json.dumps(run_rank(args)))
        return
    if args.child:
        row = run_one(args.docs[0], args.queries, args.dim, args.k, args.memory_mb, gpu, args.seed)
        print(json.dumps(row))
        return
    if args.world:
        rows = sharded_main(args)
    elif args.ann:
        rows = ann_main(args)
    else:
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
