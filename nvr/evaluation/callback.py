"""Full-corpus BEIR validation inside Lightning's validation loop, correct under 1 process, DDP and FSDP2.

Each rank embeds its DistributedSampler shard of every queries/corpus loader (same number of forward calls on
all ranks, which FSDP needs). At epoch end the embeddings are all-gathered padded to the largest shard (gloo
aborts on unequal shapes), de-duplicated by sample index (the sampler pads by repeating samples), searched
exactly, and scored with ``evaluate_run`` on rank 0; the scores are broadcast so every rank logs identical
values and ``ModelCheckpoint(monitor="val/ndcg@10")`` behaves the same everywhere.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from nvr.evaluation.data import KINDS, EvalSet, EvalTextDataset
from nvr.evaluation.retrieval import evaluate_embeddings, mean_over_datasets, metric_names
from nvr.utils.errors import NvrError

# Rows gathered per collective call: bounds the device memory of one gather to world * rows * dim floats.
GATHER_CHUNK_ROWS = 8192


class IncompleteEvaluationError(NvrError, RuntimeError):
    """Validation did not embed every query/document exactly once (e.g. ``limit_val_batches`` < 1.0)."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows (counts may differ, a rank may have none): gather shapes, pad to the
    longest, gather in chunks, trim. Returns the concatenation in rank order on the CPU."""
    rank, world = _world()
    if world == 1:
        return local.cpu()
    shape = torch.tensor(list(local.shape), dtype=torch.long, device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    counts = [int(s[0].item()) for s in shapes]
    trailing = tuple(int(x) for x in torch.stack(shapes).max(dim=0).values[1:].tolist())
    if local.shape[0] == 0:
        local = local.reshape(0, *trailing)
    longest = max(counts)
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, longest, GATHER_CHUNK_ROWS):
        stop = min(start + GATHER_CHUNK_ROWS, longest)
        chunk = torch.zeros((stop - start, *trailing), dtype=local.dtype, device=device)
        mine = local[start:stop]
        chunk[: mine.shape[0]] = mine.to(device)
        gathered = [torch.empty_like(chunk) for _ in range(world)]
        dist.all_gather(gathered, chunk)
        for r, g in enumerate(gathered):
            valid = max(0, min(counts[r], stop) - start)
            parts[r].append(g[:valid].cpu())
    flat = [p for rank_parts in parts for p in rank_parts]
    return torch.cat(flat, dim=0) if flat else local.cpu()


def deduplicate(embeddings: torch.Tensor, index: torch.Tensor, expected: int, what: str) -> np.ndarray:
    """Order rows by sample index, keeping the first copy of repeated samples; every index 0..expected-1 must
    be present, else :class:`IncompleteEvaluationError`."""
    idx = index.numpy()
    unique, first = np.unique(idx, return_index=True)
    if len(unique) != expected or (expected and (unique[0] != 0 or unique[-1] != expected - 1)):
        missing = np.setdiff1d(np.arange(expected), unique)[:5].tolist()
        raise IncompleteEvaluationError(
            f"validation embedded {len(unique)} of {expected} {what} (missing positions e.g. {missing}); "
            "run the full validation loaders (limit_val_batches=1.0) and return 'index' from validation_step"
        )
    return embeddings.numpy()[first]


class RetrievalEvaluator(Callback):
    """Logs ``<log_prefix>/<dataset>/<metric>@k`` for every eval set and the mean ``<log_prefix>/<main_metric>``.

    The eval sets are found through the validation dataloaders (``loader.dataset.eval_set``, as built by
    :func:`nvr.evaluation.data.build_eval_dataloaders`), so ``trainer.validate(model, dataloaders=...)`` works
    without a datamodule. ``validation_step`` must return ``{"embeddings": Tensor[B, H], "index": LongTensor[B]}``
    for these batches.
    """

    def __init__(
        self,
        k_values: Sequence[int] = (10, 100),
        search_memory_mb: int = 512,
        log_prefix: str = "val",
        main_metric: str = "ndcg@10",
    ) -> None:
        if not k_values or min(k_values) <= 0:
            raise ValueError(f"k_values must be positive, got {tuple(k_values)}")
        self.k_values = tuple(sorted(set(int(k) for k in k_values)))
        if main_metric not in metric_names(self.k_values):
            raise ValueError(f"main_metric {main_metric!r} is not computed; choose from {metric_names(self.k_values)}")
        self.search_memory_mb = search_memory_mb
        self.log_prefix = log_prefix
        self.main_metric = main_metric
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._buffers: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    # -- collection (validation and test loops share it; test metrics are logged under ``test/``) ---------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffers.clear()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffers.clear()

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(outputs, batch)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(outputs, batch)

    def _collect(self, outputs, batch) -> None:
        if not isinstance(batch, dict) or "kind" not in batch or "dataset" not in batch:
            return
        if not isinstance(outputs, dict) or "embeddings" not in outputs:
            raise ValueError("validation_step must return {'embeddings': Tensor[B, H], 'index': LongTensor[B]} "
                             "for retrieval evaluation batches")
        emb = outputs["embeddings"].detach().float().cpu()
        index = outputs.get("index", batch["index"])
        index = index.detach().long().cpu()
        if emb.shape[0] != index.shape[0]:
            raise ValueError(f"validation_step returned {emb.shape[0]} embeddings for {index.shape[0]} indices")
        self._buffers[(batch["dataset"], batch["kind"])].append((emb, index))

    # -- epoch end ---------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._buffers.clear()
            return
        self._finish(trainer, pl_module, trainer.val_dataloaders, self.log_prefix)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, trainer.test_dataloaders, "test")

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders, prefix: str) -> None:
        try:
            eval_sets = self._eval_sets(loaders)
            if not eval_sets:
                return
            per_dataset = self._evaluate(eval_sets, trainer.strategy.root_device)
        finally:
            self._buffers.clear()
        self.last_metrics = per_dataset
        with warnings.catch_warnings():
            # Lightning suggests sync_dist=True for epoch-level logs; the values are already identical everywhere.
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            for name, metrics in per_dataset.items():
                for metric, value in metrics.items():
                    pl_module.log(f"{prefix}/{name}/{metric}", value, sync_dist=False)
            for metric, value in mean_over_datasets(per_dataset).items():
                pl_module.log(f"{prefix}/{metric}", value, sync_dist=False, prog_bar=metric == self.main_metric)

    @staticmethod
    def _eval_sets(loaders) -> dict[str, EvalSet]:
        if loaders is None:
            return {}
        if not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        sets: dict[str, EvalSet] = {}
        for loader in loaders:
            dataset = getattr(loader, "dataset", None)
            if isinstance(dataset, EvalTextDataset):
                sets.setdefault(dataset.eval_set.name, dataset.eval_set)
        return sets

    def _evaluate(self, eval_sets: dict[str, EvalSet], device: torch.device) -> dict[str, dict[str, float]]:
        """Gather one eval set at a time (all ranks, same order), score it on rank 0, broadcast the scores at the
        end: identical metrics on every rank, and only one set's embeddings held at a time."""
        rank, world = _world()
        per_dataset: dict[str, dict[str, float]] = {}
        failure: Exception | None = None
        for name, eval_set in eval_sets.items():  # insertion order: identical on every rank
            embeddings = {}
            for kind in KINDS:
                emb, index = self._local(name, kind)
                all_emb = gather_rows(emb, device)
                all_index = gather_rows(index, device)
                if rank != 0:  # only rank 0 searches; the others just check completeness (same error everywhere)
                    all_emb = all_emb[:, :0]
                embeddings[kind] = deduplicate(all_emb, all_index, eval_set.size(kind), f"{kind} of eval set '{name}'")
            if rank == 0 and failure is None:
                try:
                    per_dataset[name] = evaluate_embeddings(
                        embeddings["queries"], embeddings["corpus"], eval_set.query_ids, eval_set.doc_ids,
                        eval_set.qrels, self.k_values, self.search_memory_mb,
                    )
                except Exception as err:  # re-raised on every rank below, so no rank waits forever
                    failure = err
        result: list[object] = [failure if failure is not None else per_dataset]
        if world > 1:
            dist.broadcast_object_list(result, src=0, device=device if device.type != "cpu" else None)
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]  # type: ignore[return-value]

    def _local(self, name: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows; empty (not an error) so every rank still joins the collectives, and the
        completeness check after gathering fails identically everywhere."""
        chunks = self._buffers.get((name, kind), [])
        if not chunks:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
