"""Full-corpus BEIR validation inside Lightning's validation loop, correct under 1 process, DDP and FSDP2.

Each rank embeds its DistributedSampler shard of every queries/corpus loader (same number of forward calls on
all ranks, which FSDP needs). At epoch end the embeddings are all-gathered padded to the largest shard (gloo
aborts on unequal shapes), de-duplicated by sample index (the sampler pads by repeating samples), searched
exactly, and scored with ``evaluate_run`` on rank 0; the scores are broadcast so every rank logs identical
values and ``ModelCheckpoint(monitor="val/ndcg@10")`` behaves the same everywhere.

Frozen base weights share the embedding cache with mining and ``nvr eval`` (one corpus encode per model and
settings): when validation runs before any optimizer step (``global_step == 0``, no checkpoint to restore) and the
module's weights are bit-identical to the model a dense teacher with the same settings would load (compared by
``Embedder.fingerprint`` over every tensor, the tokenizer and the pooling settings: a LoRA adapter, a latent-attention
head, a warm start or quantization all differ or are refused), the corpus key is the teacher's
(:func:`nvr.teachers.dense.dense_embedding_key`, precision from ``trainer.precision``). A cached corpus is then
attached to the eval set in ``setup`` so :func:`~nvr.evaluation.data.build_eval_dataloaders` leaves its corpus loader
out, and a corpus the loop did encode is written to the cache. Trained weights never read or write it.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from nvr.evaluation.data import KINDS, CachedCorpus, EvalSet, EvalTextDataset
from nvr.evaluation.retrieval import evaluate_embeddings, mean_over_datasets, metric_names
from nvr.utils.errors import NvrError
from nvr.utils.precision import AUTOCAST_BF16

log = logging.getLogger(__name__)

TRAINER_PRECISION_LABELS = {"32-true": "float32", "32": "float32", "bf16-mixed": AUTOCAST_BF16}
"""``trainer.precision`` -> the precision label of the embeddings validation computes (``Precision.label``)."""
_REUSABLE_POOLING = ("mean", "cls", "last_token")
"""Poolings without weights: a dense teacher loading the same folder builds the identical head."""

# Rows gathered per collective call: bounds the device memory of one gather to world * rows * dim floats.
GATHER_CHUNK_ROWS = 8192


class IncompleteEvaluationError(NvrError, RuntimeError):
    """Validation did not embed every query/document exactly once (e.g. ``limit_val_batches`` < 1.0)."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows (counts may differ, a rank may have none) with
    :func:`nvr.utils.distributed.gather_padded`, ``GATHER_CHUNK_ROWS`` rows per collective call. Returns the
    concatenation in rank order on the CPU."""
    from nvr.utils.distributed import dist_all_gather, gather_padded

    rank, world = _world()
    if world == 1:
        return local.cpu()
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    longest = int(dist_all_gather(count).max().item())
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(longest, 1), GATHER_CHUNK_ROWS):  # one call even when no rank has rows (shapes)
        gathered, _, counts = gather_padded(local[start : start + GATHER_CHUNK_ROWS].to(device), None,
                                            dist_all_gather)
        for r, c in enumerate(counts):
            parts[r].append(gathered[r, :c].cpu())
    return torch.cat([p for rank_parts in parts for p in rank_parts], dim=0)


def datamodule_cache_dir(datamodule: object) -> str | None:
    """The cache the data module mines into: its ``mining`` config's, else (``data.datasets``) the first mined
    dataset's; None when nothing is mined (a fixed ``mined_dir``)."""
    mining = getattr(datamodule, "mining", None)
    if mining is None and getattr(datamodule, "mined_datasets", None):
        mining = datamodule.mining_config(datamodule.mined_datasets[0])
    return getattr(mining, "cache_dir", None)


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
        cache_dir: str | None = None,
        reuse_frozen_cache: bool = True,
    ) -> None:
        """``cache_dir``: the embedding cache shared with mining (default: the datamodule's ``mining.cache_dir``);
        ``reuse_frozen_cache``: read / write it for frozen base weights (see the module docstring)."""
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
        self.cache_dir = cache_dir
        self.reuse_frozen_cache = reuse_frozen_cache
        self._reference: dict[str, str] = {}
        """Model key -> ``Embedder.fingerprint`` of the model a teacher would load (computed once)."""
        self.corpus_encodes_skipped = 0
        """Corpora served from the shared cache instead of being encoded by the loop (for logs and tests)."""

    # -- shared cache for frozen base weights -------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Attach cached corpus embeddings to the datamodule's eval sets when the weights are the frozen base
        model (before the dataloaders are built, so the corpus loaders can be left out); clear them otherwise."""
        sets = _datamodule_eval_sets(trainer)
        for eval_set in sets:
            eval_set.cached_corpus = None
        if not sets or stage not in ("validate", "test") or not self.reuse_frozen_cache:
            return
        reuse = self._frozen_reuse(trainer, pl_module)
        for eval_set in sets:
            found = None if reuse is None else reuse.cache.get(reuse.key(eval_set), eval_set.doc_texts)
            # every rank must build the same loaders: attach only where every rank found the entry
            if trainer.strategy.reduce_boolean_decision(found is not None, all=True) and reuse is not None:
                eval_set.cached_corpus = CachedCorpus(reuse.key(eval_set), np.asarray(found), reuse.tokenizer,
                                                      reuse.add_eos)

    def _frozen_reuse(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _FrozenReuse | None:
        """The shared-cache context when the module's weights are exactly the base model's, else None."""
        cache_dir = self.cache_dir or datamodule_cache_dir(getattr(trainer, "datamodule", None))
        label = TRAINER_PRECISION_LABELS.get(str(trainer.precision))
        embedder = getattr(pl_module, "embedder", None)
        cfg = getattr(embedder, "config", None)
        if (not self.reuse_frozen_cache or not cache_dir or label is None or cfg is None
                or trainer.global_step != 0 or getattr(trainer, "ckpt_path", None) is not None
                or cfg.lora is not None or cfg.quantization is not None or cfg.pooling not in _REUSABLE_POOLING
                or cfg.dtype != "float32" or cfg.attn_implementation != "sdpa"):
            return None
        from nvr.config.mining import TeacherConfig
        from nvr.modeling.embedder import tokenizer_fingerprint
        from nvr.teachers.cache import EmbeddingCache
        from nvr.teachers.dense import load_dense_embedder, teacher_model_fingerprint
        from nvr.utils.fingerprint import memo_dir_for, model_fingerprint
        from nvr.utils.precision import Precision

        memo = memo_dir_for(cache_dir)
        if model_fingerprint(cfg.model_name_or_path, memo) is None:
            return None  # not a local folder: never download a second copy just to compare
        tcfg = TeacherConfig(name="validation", model_name_or_path=cfg.model_name_or_path, pooling=cfg.pooling,
                             normalize=cfg.normalize, add_eos=cfg.add_eos, bidirectional=cfg.bidirectional,
                             trust_remote_code=cfg.trust_remote_code, dtype="float32")
        model_key = teacher_model_fingerprint(tcfg, memo, lambda: None, label)
        if model_key not in self._reference:
            self._reference[model_key] = load_dense_embedder(tcfg, Precision("float32")).fingerprint()
        if embedder.fingerprint() != self._reference[model_key]:
            return None
        from nvr.modeling.backbone import position_limit

        return _FrozenReuse(EmbeddingCache(Path(cache_dir) / "embeddings"), model_key, tcfg, label,
                            tokenizer_fingerprint(embedder.tokenizer), cfg.add_eos,
                            position_limit(getattr(embedder.backbone, "config", None)))

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
            shared = _SharedCorpora(self._frozen_reuse(trainer, pl_module), _corpus_loaders(loaders), pl_module,
                                    trainer)
            per_dataset = self._evaluate(eval_sets, trainer.strategy.root_device, shared)
            self.corpus_encodes_skipped += shared.served
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

    def _evaluate(self, eval_sets: dict[str, EvalSet], device: torch.device,
                  shared: _SharedCorpora | None = None) -> dict[str, dict[str, float]]:
        """Gather one eval set at a time (all ranks, same order), score it on rank 0, broadcast the scores at the
        end: identical metrics on every rank, and only one set's embeddings held at a time."""
        rank, world = _world()
        per_dataset: dict[str, dict[str, float]] = {}
        failure: Exception | None = None
        for name, eval_set in eval_sets.items():  # insertion order: identical on every rank
            embeddings = {}
            for kind in KINDS:
                if kind == "corpus" and shared is not None and name not in shared.loaders \
                        and eval_set.cached_corpus is not None:
                    # no corpus loader ran: the frozen-base corpus attached in setup (or, if the weights changed
                    # since, a fresh encode); every rank takes this branch, so the collectives stay aligned
                    embeddings[kind] = shared.corpus(eval_set) if rank == 0 else np.zeros((eval_set.size(kind), 0))
                    continue
                emb, index = self._local(name, kind)
                all_emb = gather_rows(emb, device)
                all_index = gather_rows(index, device)
                if rank != 0:  # only rank 0 searches; the others just check completeness (same error everywhere)
                    all_emb = all_emb[:, :0]
                embeddings[kind] = deduplicate(all_emb, all_index, eval_set.size(kind), f"{kind} of eval set '{name}'")
                if kind == "corpus" and rank == 0 and shared is not None:
                    shared.store(eval_set, embeddings[kind])
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


@dataclass
class _FrozenReuse:
    """Where and under which key frozen base weights share corpus embeddings with a dense teacher."""

    cache: object
    model_key: str
    teacher: object
    label: str
    tokenizer: str
    """``tokenizer_fingerprint`` of the module's tokenizer (the loop's must match for its output to be stored)."""
    add_eos: bool
    position_limit: int | None = None
    """The model's position limit: lengths above it are clamped (teachers key on the clamped length, and the module
    clamps the eval sets only in its own ``setup``, after this callback's)."""

    def key(self, eval_set: EvalSet) -> str:
        from nvr.teachers.dense import dense_embedding_key

        cfg = eval_set.config
        length = cfg.passage_max_length
        if self.position_limit is not None:
            length = min(length, self.position_limit)
        return dense_embedding_key(self.model_key, self.teacher, cfg.passage_prefix, length, self.label)


class _SharedCorpora:
    """Per epoch end: serve attached corpora (loader left out) and store loop-encoded ones (frozen base only)."""

    def __init__(self, reuse: _FrozenReuse | None, loaders: dict[str, object], pl_module, trainer) -> None:
        self.reuse = reuse
        self.loaders = loaders
        self.pl_module = pl_module
        self.trainer = trainer
        self.served = 0

    def corpus(self, eval_set: EvalSet) -> np.ndarray:
        cached = eval_set.cached_corpus
        if cached is not None and self.reuse is not None and self.reuse.key(eval_set) == cached.key:
            self.served += 1
            return np.asarray(cached.embeddings)
        # the weights are no longer the frozen base the cache entry belongs to: encode with the current ones
        log.warning("eval set '%s': weights changed since the cached corpus was attached; encoding it", eval_set.name)
        from nvr.modeling.encode import encode_texts

        cfg = eval_set.config
        with self.trainer.precision_plugin.forward_context():
            return encode_texts(self.pl_module.embedder, eval_set.doc_texts, prefix=cfg.passage_prefix,
                                max_length=cfg.passage_max_length, show_progress=False)

    def store(self, eval_set: EvalSet, corpus: np.ndarray) -> None:
        """Write the loop's corpus embeddings to the shared cache when they are the frozen base model's and were
        tokenized by the module's own tokenizer (same ids a teacher would feed)."""
        loader = self.loaders.get(eval_set.name)
        collate = getattr(loader, "collate_fn", None)
        if self.reuse is None or collate is None or corpus.size == 0:
            return
        from nvr.modeling.embedder import tokenizer_fingerprint

        if getattr(collate, "add_eos", None) != self.reuse.add_eos or \
                tokenizer_fingerprint(collate.tokenizer) != self.reuse.tokenizer:
            return
        self.reuse.cache.put(self.reuse.key(eval_set), eval_set.doc_texts, corpus)


def _corpus_loaders(loaders) -> dict[str, object]:
    """Eval-set name -> its corpus loader, for the loaders this loop actually ran."""
    if loaders is None:
        return {}
    found: dict[str, object] = {}
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        dataset = getattr(loader, "dataset", None)
        if isinstance(dataset, EvalTextDataset) and dataset.kind == "corpus":
            found.setdefault(dataset.eval_set.name, loader)
    return found


def _datamodule_eval_sets(trainer: pl.Trainer) -> list[EvalSet]:
    """The datamodule's loaded eval sets (``MinedDataModule.eval_sets``), the objects its loaders are built from."""
    sets = getattr(getattr(trainer, "datamodule", None), "eval_sets", None)
    values = sets.values() if isinstance(sets, dict) else (sets or [])
    return [s for s in values if isinstance(s, EvalSet)]
