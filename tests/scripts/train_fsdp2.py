"""FSDP2 training on 2 CPU processes (ModelParallelStrategy, gloo): fit, sharded checkpoint, resume.

Run as a subprocess by tests/test_training_distributed.py (the strategy re-launches this script for rank 1, which
must not happen inside pytest). Three fits in one launch, with cross-device negatives on:

* ``straight``: ``TOTAL`` steps without interruption;
* ``first``: ``SPLIT`` steps, a distributed checkpoint at step ``SPLIT`` (``OUT/ckpt/*.ckpt/`` folders);
* ``resumed``: ``fit(ckpt_path=...)`` from that checkpoint up to ``TOTAL`` steps.

Each rank writes ``OUT/<run>_rank<k>.json`` (per-step losses, whether every trainable parameter was a DTensor
during training, the global step the run started at); rank 0 also writes ``OUT/<run>_embeddings.pt``: the
model's embeddings of fixed probe texts after the run (eval mode), to compare with an export of the checkpoint.

usage: python train_fsdp2.py MODEL_DIR MINED_DIR OUT_DIR {bert,mistral_lora}
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPLIT, TOTAL = 2, 4
PROBE_TEXTS = ["wing lift drag airfoil", "heat transfer boundary layer study", "shock wave", "rocket nozzle thrust"]


def build(model_dir: str, mined_dir: str, kind: str):
    from nvr.modeling.config import EmbedderConfig, LoraSettings
    from nvr.training.datamodule import MinedDataModule
    from nvr.training.module import BiEncoderModule

    lora = LoraSettings(r=4, alpha=8, dropout=0.0) if kind == "mistral_lora" else None
    pooling = "latent_attention" if kind == "mistral_lora" else "mean"
    cfg = EmbedderConfig(model_name_or_path=model_dir, pooling=pooling, bidirectional=kind == "mistral_lora",
                         lora=lora)
    module = BiEncoderModule(cfg, temperature=0.05, gather_across_devices=True, lr=1e-3, weight_decay=0.0,
                             warmup_steps=0, scheduler="constant", seed=7)
    data = MinedDataModule(mined_dir=mined_dir, tokenizer=model_dir, query_max_length=16, passage_max_length=32,
                           num_negatives=2, batch_size=4, seed=3)
    return module, data


def make_probe(out_dir: Path, run: str):
    import lightning.pytorch as pl
    import torch
    from torch.distributed.tensor import DTensor

    class Probe(pl.Callback):
        """Per-step losses, sharding of the trainable parameters (at the start, after each step), probe losses."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.sharded: list[bool] = []
            self.start_step = -1

        def on_train_start(self, trainer, pl_module) -> None:
            self.start_step = trainer.global_step
            self.sharded.append(all_sharded(pl_module))
            self.probe_before = probe_loss(pl_module, trainer.datamodule)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # after backward + optimizer step (an eval-mode forward leaves FSDP2's root unsharded until the next one)
            self.sharded.append(all_sharded(pl_module))
            self.losses.append(float(outputs["loss"]))

        def on_train_end(self, trainer, pl_module) -> None:
            record = {"losses": self.losses, "sharded": self.sharded, "start_step": self.start_step,
                      "world_size": trainer.world_size, "global_step": trainer.global_step,
                      "probe_loss_before": self.probe_before,
                      "probe_loss_after": probe_loss(pl_module, trainer.datamodule)}
            (out_dir / f"{run}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
            embeddings = probe_embeddings(pl_module)  # collective: every rank runs the sharded forward
            if trainer.global_rank == 0:
                torch.save(embeddings, out_dir / f"{run}_embeddings.pt")

    def all_sharded(pl_module) -> bool:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        return bool(params) and all(isinstance(p, DTensor) for p in params)

    return Probe()


def probe_loss(module, data) -> float:
    """In-batch InfoNCE of the first 8 training queries vs their positives: the same fixed batch before and after
    training (collective under FSDP2, like every forward)."""
    import torch

    from nvr.modeling.tokenization import tokenize
    from nvr.training.loss import info_nce

    examples = data.train_dataset.examples[:8]
    queries = tokenize(module.embedder.tokenizer, [ex.query for ex in examples], 16)
    positives = tokenize(module.embedder.tokenizer, [ex.positive_texts[0] for ex in examples], 32)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        loss = info_nce(module.encode(queries), module.encode(positives).unsqueeze(1), module.hparams.temperature)
    module.train(was_training)
    return float(loss)


def probe_embeddings(module):
    import torch

    from nvr.modeling.tokenization import tokenize

    features = tokenize(module.embedder.tokenizer, PROBE_TEXTS, 16)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        embeddings = module.encode(features).float().cpu()
    module.train(was_training)
    return embeddings


def fit(model_dir: str, mined_dir: str, kind: str, out_dir: Path, run: str, max_steps: int,
        ckpt_path: str | None = None) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(0)  # same LoRA init on every rank (FSDP2 does not broadcast) and in every run
    module, data = build(model_dir, mined_dir, kind)
    callbacks = [make_probe(out_dir, run)]
    if run == "first":
        callbacks.append(ModelCheckpoint(dirpath=str(out_dir / "ckpt"), every_n_train_steps=SPLIT, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps, logger=False, enable_checkpointing=run == "first", enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out_dir),
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)


def main(argv: list[str]) -> None:
    import torch

    model_dir, mined_dir, out, kind = argv[:4]
    torch.set_num_threads(1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit(model_dir, mined_dir, kind, out_dir, "straight", TOTAL)
    fit(model_dir, mined_dir, kind, out_dir, "first", SPLIT)
    checkpoints = sorted((out_dir / "ckpt").glob("*.ckpt"))
    if len(checkpoints) != 1:
        raise SystemExit(f"expected one checkpoint, found {checkpoints}")
    fit(model_dir, mined_dir, kind, out_dir, "resumed", TOTAL, ckpt_path=str(checkpoints[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
