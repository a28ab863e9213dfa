"""Test helper: C1-layout batches (extra positives, dataset name, per-dataset in-batch switch) from the plain
MinedDataModule, independent of how the data side builds them: hard-negative column 1 is relabelled as an
extra-positive slot (absent, i.e. padding, on every other example) with its teacher score as the extra score."""

from __future__ import annotations

from typing import Any

import torch

from nvr.training.datamodule import MinedDataModule
from nvr.training.loss import PAD_ID


def relabel_c1(batch: dict[str, Any], dataset: str = "toy", use_in_batch_negatives: bool | None = None,
               drop_every_other: bool = True) -> dict[str, Any]:
    """A copy of ``batch`` with ``num_extra_positives = 1`` (column 1), ``negative_scores`` on the rest."""
    out = dict(batch)
    ids = batch["passage_ids"].clone()
    if drop_every_other:
        ids[1::2, 1] = PAD_ID
    out["passage_ids"] = ids
    out["num_extra_positives"] = 1
    extra_scores = batch["negative_scores"][:, :1].clone()
    extra_scores[ids[:, 1] == PAD_ID] = float("nan")
    out["extra_positive_scores"] = extra_scores
    out["negative_scores"] = batch["negative_scores"][:, 1:].clone()
    out["dataset"] = dataset
    if use_in_batch_negatives is not None:
        out["use_in_batch_negatives"] = use_in_batch_negatives
    return out


class RelabelCollate:
    def __init__(self, collate, **kwargs) -> None:
        self.collate = collate
        self.kwargs = kwargs

    def __call__(self, items):
        return relabel_c1(self.collate(items), **self.kwargs)


class C1DataModule(MinedDataModule):
    """MinedDataModule whose training batches come in the C1 layout (module level so ``ddp_spawn`` pickles it)."""

    c1_kwargs: dict[str, Any] = {}

    def train_dataloader(self):
        loader = super().train_dataloader()
        loader.collate_fn = RelabelCollate(loader.collate_fn, **self.c1_kwargs)
        return loader


def with_scores(batch: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Distinct random teacher scores (the fake mined set has the same ones on every row)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(batch)
    out["positive_scores"] = 0.5 + 0.5 * torch.rand(batch["positive_scores"].shape, generator=gen)
    out["negative_scores"] = torch.rand(batch["negative_scores"].shape, generator=gen) * 0.6
    return out
