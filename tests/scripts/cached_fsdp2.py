"""Cached InfoNCE under FSDP2 on 2 CPU processes (ModelParallelStrategy, gloo): one training step per run.

Run as a subprocess by tests/test_cached_infonce.py (the strategy re-launches this script for rank 1, which must
not happen inside pytest). Cross-device negatives and teacher false-negative masking are on, dropout too. For each
mini-batch limit in ``CASES`` two runs start from the same weights, seed and batches:

* ``reference_<case>``: the uncached loss (one graph, one ``backward``) over the cached path's mini-batch forwards
  (the same dropout masks), with every rank's passages gathered with gradients;
* ``cached_<case>``: ``mini_batch_size`` / ``mini_batch_num_tokens`` set (GradCache).

Each rank writes ``OUT/<run>_rank<k>.pt``: its step-0 loss, the number of mini-batches its passages took, whether
every trainable parameter was a DTensor, its teacher-masked negatives, the full (unsharded) parameter gradients
before the optimizer step and the full weights before and after it.

usage: python cached_fsdp2.py MODEL_DIR MINED_DIR OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CASES = {"rows": (2, None), "tokens": (None, 48)}
PERC = 0.8  # fake mined scores: positive 0.6, negatives 0.5 / 0.4 / 0.3 -> 0.5 >= 0.48 is masked


def module_class(limits: tuple[int | None, int | None] | None):
    """BiEncoderModule; with ``limits``, its uncached loss over the cached path's mini-batch forwards."""
    import torch

    from nvr.training.cached import plan_mini_batches, take_rows
    from nvr.training.module import BiEncoderModule

    if limits is None:
        return BiEncoderModule

    def encode_chunks(module, features: dict) -> torch.Tensor:
        plan = plan_mini_batches(features["attention_mask"].sum(1), *limits)
        out = torch.cat([module.encode(take_rows(features, rows)) for rows in plan])
        return torch.empty_like(out).index_copy(0, torch.cat(plan), out)

    class ChunkedReference(BiEncoderModule):
        def training_step(self, batch, batch_idx):
            size, group = batch["passage_ids"].shape
            queries = encode_chunks(self, batch["query"])
            passages = encode_chunks(self, batch["passages"]).reshape(size, group, -1)
            remote_emb, remote_ids = self._remote_passages(passages, batch["passage_ids"], batch)
            out = self._objective(queries, passages, batch, remote_emb, remote_ids)
            self._log_step(out, batch)
            return out.loss

    return ChunkedReference


def make_recorder(out_dir: Path, run: str, limits: tuple[int | None, int | None]):
    import lightning.pytorch as pl
    import torch
    from torch.distributed.tensor import DTensor

    from nvr.training.cached import plan_mini_batches

    def full(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()

    class Recorder(pl.Callback):
        """Step 0's loss, gradients (before the optimizer step) and the weights after it; collective gathers."""

        def __init__(self) -> None:
            self.record: dict = {}

        def on_train_start(self, trainer, pl_module) -> None:
            self.record["initial"] = {n: full(v) for n, v in pl_module.state_dict().items()}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            lengths = batch["passages"]["attention_mask"].sum(1).cpu()
            self.record["mini_batches"] = len(plan_mini_batches(lengths, *limits))
            self.record["teacher_masked"] = int(pl_module._teacher_mask(batch).sum())

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
            self.record["sharded"] = bool(params) and all(isinstance(p, DTensor) for _, p in params)
            self.record["grads"] = {n: full(p.grad) for n, p in params if p.grad is not None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.record["loss"] = float(outputs["loss"])

        def on_train_end(self, trainer, pl_module) -> None:
            self.record["weights"] = {n: full(v) for n, v in pl_module.state_dict().items()}
            self.record["world_size"] = trainer.world_size
            torch.save(self.record, out_dir / f"{run}_rank{trainer.global_rank}.pt")

    return Recorder()


def fit(model_dir: str, mined_dir: str, out_dir: Path, run: str, limits: tuple[int | None, int | None],
        cached: bool) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from nvr.modeling.config import EmbedderConfig
    from nvr.training.datamodule import MinedDataModule

    pl.seed_everything(0)
    cfg = EmbedderConfig(model_name_or_path=model_dir, pooling="mean")
    cached_args = dict(mini_batch_size=limits[0], mini_batch_num_tokens=limits[1]) if cached else {}
    module = module_class(None if cached else limits)(
        cfg, temperature=0.05, false_negative_perc=PERC, gather_across_devices=True, lr=1e-3, weight_decay=0.0,
        warmup_steps=0, scheduler="constant", seed=7, **cached_args)
    # 4 negatives per slot from 3 stored: one padding slot per example
    data = MinedDataModule(mined_dir=mined_dir, tokenizer=model_dir, query_max_length=16, passage_max_length=32,
                           num_negatives=4, batch_size=4, seed=3)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out_dir),
        callbacks=[make_recorder(out_dir, run, limits)],
    )
    trainer.fit(module, datamodule=data)


def main(argv: list[str]) -> None:
    import torch

    model_dir, mined_dir, out = argv[:3]
    torch.set_num_threads(1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case, limits in CASES.items():
        fit(model_dir, mined_dir, out_dir, f"reference_{case}", limits, cached=False)
        fit(model_dir, mined_dir, out_dir, f"cached_{case}", limits, cached=True)


if __name__ == "__main__":
    main(sys.argv[1:])
