"""One rank of a real gloo run of ``nvr.search.sharded.sharded_topk`` (launched W times by tests/test_sharded_search).

    python sharded_search.py --rank R --world W --init FILE --data DIR --out DIR [--kill-after N]

Runs every case folder under ``--data`` in sorted order (``queries.npy``, ``docs.npy`` float32/float16 or
``docs_bf16.npy`` raw bfloat16 bits, optional ``order.npy``, ``params.json``), reading the corpus through a memmap,
and writes ``OUT/<case>/rank<R>.npz`` plus the chunk events. A case with ``"resume": true`` uses a work dir under
``--data``; with ``--kill-after N`` every rank SIGKILLs itself once chunk N of that case is final.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from nvr.search.sharded import sharded_topk
from nvr.teachers.cache import Bfloat16Rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kill-after", type=int, default=None)
    args = p.parse_args()
    dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=args.world)
    for case in sorted(d for d in Path(args.data).iterdir() if (d / "params.json").exists()):
        params = json.loads((case / "params.json").read_text())
        queries = np.load(case / "queries.npy")
        docs = Bfloat16Rows(np.load(case / "docs_bf16.npy", mmap_mode="r")) if (case / "docs_bf16.npy").exists() \
            else np.load(case / "docs.npy", mmap_mode="r")
        order = np.load(case / "order.npy") if (case / "order.npy").exists() else None
        events: list[list] = []

        def on_chunk(c: int, reused: bool, resume: bool = params.get("resume", False), events: list = events) -> None:
            events.append([c, reused])
            if resume and args.kill_after is not None and c == args.kill_after:
                dist.barrier()  # every rank has its copy of the gathered chunk, then all die at once
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGKILL)

        work_dir = case / "work" if params.get("resume") else None
        s, i = sharded_topk(queries, docs, params["k"], memory_mb=params["memory_mb"], doc_order=order,
                            use_gpu=False, work_dir=work_dir, chunk_queries=params["chunk"], on_chunk=on_chunk)
        out = Path(args.out) / case.name
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"rank{args.rank}.npz", scores=s, idx=i)
        (out / f"rank{args.rank}.json").write_text(json.dumps(events))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
