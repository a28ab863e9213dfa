"""One torchrun-style rank (RANK / WORLD_SIZE / MASTER_* in the environment) of DenseTeacher.rank_corpus: the
process group is created by the teacher itself (as under ``torchrun nvr mine``); writes OUT/rank<R>.npz.

    python dense_sharded.py MODEL_DIR CACHE_DIR OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from nvr.config.mining import TeacherConfig
from nvr.data.beir import Corpus
from nvr.search.exact import doc_id_order
from nvr.teachers.dense import DenseTeacher

PASSAGES = [f"passage {i} about {w}" for i, w in enumerate(("wing lift drag heat shock nozzle flow boundary layer "
                                                           "thrust rocket supersonic wave thin plate").split() * 3)]
QUERIES = ["wing lift", "shock wave", "rocket thrust", "boundary layer heat", "plate flow"]


def main() -> None:
    model, cache, out = sys.argv[1:4]
    corpus = Corpus(ids=[f"d{i:03d}" for i in range(len(PASSAGES))][::-1], titles=[""] * len(PASSAGES),
                    texts=PASSAGES)
    cfg = TeacherConfig(name="t", model_name_or_path=model, device="cpu", dtype="float32", shard_size=7,
                        cache_dtype=os.environ.get("CACHE_DTYPE", "float32"), passage_max_length=16,
                        query_max_length=16)
    s, i, p = DenseTeacher(cfg, cache).rank_corpus(QUERIES, corpus, 12, np.array([[0]] * len(QUERIES)),
                                                   doc_id_order(corpus.ids), memory_mb=0.002)
    from nvr.utils.distributed import world_info

    Path(out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(out) / f"rank{os.environ.get('RANK', '0')}.npz", scores=s, idx=i, pairs=p,
             world=np.array(world_info()[1]))


if __name__ == "__main__":
    main()
