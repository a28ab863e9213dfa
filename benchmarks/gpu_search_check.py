"""GPU path of exact search, for a machine with CUDA: identical tables to the CPU path, the corpus crossing
host->device once, and wall times of both (prints one JSON line per check).

    python benchmarks/gpu_search_check.py --docs 1000000 --queries 20000 --dim 384 --k 100 --memory-mb 8192
    python benchmarks/gpu_search_check.py --docs 200000 --queries 2000 --k 3000      # k beyond faiss-gpu's 2048

The CPU reference runs on a query subset (``--cpu-queries``) so the check stays short; the GPU result on those
rows must be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scale_mining import unit_vectors  # run as a script from benchmarks/ (like _common)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--cpu-queries", type=int, default=500)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--memory-mb", type=float, default=8192)
    p.add_argument("--storage", choices=["float32", "float16"], default="float16")
    args = p.parse_args()

    import torch

    from nvr.search import exact as search
    from nvr.search.exact import TorchKnn, exact_topk

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    docs = unit_vectors(args.docs, args.dim, 0, "docs")
    if args.storage == "float16":
        docs = docs.astype(np.float16)
    queries = unit_vectors(args.queries, args.dim, 0, "queries")
    knn = TorchKnn("cuda")
    t0 = time.perf_counter()
    gpu_s, gpu_i = exact_topk(queries, docs, args.k, memory_mb=args.memory_mb, backend=knn)
    torch.cuda.synchronize()
    gpu_wall = time.perf_counter() - t0
    sub = slice(0, min(args.cpu_queries, args.queries))
    t0 = time.perf_counter()
    cpu_s, cpu_i = exact_topk(queries[sub], docs, args.k, memory_mb=1024, use_gpu=False)
    cpu_wall = time.perf_counter() - t0
    corpus_f32 = args.docs * args.dim * 4
    print(json.dumps({
        "docs": args.docs, "queries": args.queries, "dim": args.dim, "k": args.k, "storage": args.storage,
        "device": torch.cuda.get_device_name(), "gpu_wall_s": round(gpu_wall, 2),
        "gpu_pairs_per_s": args.queries * args.docs / gpu_wall,
        "cpu_wall_s_subset": round(cpu_wall, 2), "cpu_queries": sub.stop,
        "cpu_pairs_per_s": sub.stop * args.docs / cpu_wall,
        "identical_on_subset": bool(cpu_s.tobytes() == gpu_s[sub].tobytes()
                                    and cpu_i.tobytes() == gpu_i[sub].tobytes()),
        "doc_bytes_uploaded": knn.doc_bytes, "corpus_float32_bytes": corpus_f32,
        "corpus_crossings": knn.doc_bytes / corpus_f32, "h2d_bytes_total": knn.h2d_bytes,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        "auto_backend": type(search._coarse_backend(None)).__name__,
    }))


if __name__ == "__main__":
    main()
