"""Run ``trainer.validate`` with the RetrievalEvaluator and write each rank's metrics to ``OUT/rank<k>.json``.

Used by tests/test_eval_distributed.py as a subprocess (``strategy="ddp"`` and ModelParallelStrategy re-launch
this script for the other ranks, which must not happen inside pytest).

usage: python eval_validate.py MODEL_DIR BEIR_DIR OUT_DIR {single,ddp,fsdp2} [MAX_QUERIES MAX_DOCS]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str]) -> None:
    import lightning.pytorch as pl
    import torch

    from nvr.evaluation.callback import RetrievalEvaluator
    from nvr.evaluation.data import EvalSetConfig, build_eval_dataloaders, load_eval_sets
    from nvr.modeling.config import EmbedderConfig
    from nvr.training.module import BiEncoderModule

    model_dir, beir_dir, out_dir, mode = argv[:4]
    max_queries = int(argv[4]) if len(argv) > 4 else None
    max_docs = int(argv[5]) if len(argv) > 5 else None
    torch.set_num_threads(1)
    module = BiEncoderModule(EmbedderConfig(model_dir, pooling="mean", normalize=True))
    sets = load_eval_sets([EvalSetConfig("tiny", beir_dir, max_queries=max_queries, max_docs=max_docs)])
    loaders = build_eval_dataloaders(sets, module.embedder.tokenizer, batch_size=4)
    if mode == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        devices = 2
    else:
        strategy, devices = ("ddp", 2) if mode == "ddp" else ("auto", 1)
    evaluator = RetrievalEvaluator(k_values=(10, 100))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluator],
    )
    trainer.validate(module, dataloaders=loaders, verbose=False)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in module.parameters())
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "metrics": evaluator.last_metrics,
              "logged": logged, "sharded": sharded}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
