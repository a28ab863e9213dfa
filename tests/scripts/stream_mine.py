"""One torchrun-style rank (RANK / WORLD_SIZE / MASTER_* in the environment) of a streaming ``mine``: a dense and a
BM25 teacher, widening on, small chunks. Rank 0 writes OUT; every rank exits 0 when done.

    python stream_mine.py BEIR_DIR OUT_DIR CACHE_DIR MODEL_DIR CHUNK FILTER

``config`` is imported by the test too, so the in-memory reference mines exactly this config.
"""

from __future__ import annotations

import sys

from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig

FILTERS = {"marginpos": FilterConfig(method="topk_marginpos", margin=0.01),
           "percpos": FilterConfig(method="topk_percpos", perc=0.95)}


def config(beir: str, out: str, cache: str, model: str, chunk: int | None, filter_name: str) -> MineConfig:
    return MineConfig(
        data=DataSource(beir_dir=beir), output_dir=out, cache_dir=cache, depth=4, max_depth=40, num_negatives=4,
        teachers=[TeacherConfig(name="tiny", model_name_or_path=model, device="cpu", batch_size=4, dtype="float32",
                                shard_size=3),
                  TeacherConfig(name="bm25", kind="bm25")],
        ensemble="intra_sample_nodedup", filter=FILTERS[filter_name], stream_chunk_queries=chunk)


def main() -> None:
    import logging

    from nvr.mining.pipeline import mine

    logging.basicConfig(level=logging.INFO)  # the test reads each rank's search log line
    beir, out, cache, model, chunk, filter_name = sys.argv[1:7]
    mine(config(beir, out, cache, model, int(chunk), filter_name))


if __name__ == "__main__":
    main()
