"""MinedDataModule: mined (query, positives, hard negatives) for training, BEIR sets for validation.

``prepare_data`` (once per node, before any process group work) mines when the mined set for this exact
MineConfig *and these inputs* is missing and reuses it otherwise, so a resumed or repeated run never re-mines while
an edited corpus / queries / qrels / pairs file or a retrained teacher (the self-mining loop) gets a fresh mined set:
the cache folder is named by ``nvr.mining.pipeline.mining_fingerprint`` (config + input file contents + teacher and
cross-encoder identities). Before training, ``mined.jsonl`` is verified against the sha256 and row count in its
``manifest.json``: a cache-owned set that fails is re-mined (with a warning), a user-given ``mined_dir`` is refused
with a one-line error. ``setup`` loads it on every rank. Training batches come from
:class:`~nvr.training.sampler.NoDuplicatePositiveBatchSampler` through a
:class:`~nvr.training.sampler.ResumableDataLoader`, which Lightning checkpoints and restores mid-epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from nvr.evaluation.data import EvalSet, EvalSetConfig, build_eval_dataloaders, load_eval_sets
from nvr.mining.build import entry_lock_path
from nvr.mining.config import MineConfig
from nvr.mining.mined_set import MinedExample, load_mined, mined_file, mined_problem, verify_mined
from nvr.modeling.backbone import load_tokenizer
from nvr.modeling.config import EmbedderConfig
from nvr.training.collate import MinedTrainDataset, TrainCollator
from nvr.training.sampler import EpochSampler, NoDuplicatePositiveBatchSampler, ResumableDataLoader, SamplerProgress
from nvr.utils.errors import ConfigError, InputError
from nvr.utils.locking import exclusive_lock

log = logging.getLogger(__name__)


def mining_fingerprint(cfg: MineConfig) -> str:
    """Cache key of a mined set: the pipeline's content address (config without output locations, input file
    contents, teacher and cross-encoder fingerprints)."""
    from nvr.mining.pipeline import mining_fingerprint as content_fingerprint

    return content_fingerprint(cfg)


class MinedDataModule(pl.LightningDataModule):
    """Train on a mined set, validate on BEIR eval sets.

    Args:
        mining: how to mine the training set when it is not there yet (None = ``mined_dir`` must exist).
        mined_dir: where the mined set lives; default ``<mining.cache_dir>/mined/<fingerprint[:16]>``.
        tokenizer: tokenizer name or folder (linked from ``model.embedder.model_name_or_path`` by the CLI).
        query_instruction: task definition; queries become ``"{instruction}: {query}"`` (NV-Retriever format).
        mask_instruction: keep the instruction tokens out of pooling (NV-Embed / NV-Retriever).
        passage_prefix: text before every passage (e5 ``"passage: "``); the paper uses none.
        num_negatives: hard negatives per example per step (rotated over the stored pool across epochs).
        batch_size: queries per rank per step.
        eval_sets: BEIR folders for validation (``val/<name>/ndcg@10``).
        add_eos: append EOS to every sequence (linked from the model's embedder config).
    """

    def __init__(
        self,
        mining: MineConfig | None = None,
        mined_dir: str | None = None,
        tokenizer: str | None = None,
        query_instruction: str = "",
        mask_instruction: bool = True,
        passage_prefix: str = "",
        query_max_length: int = 192,
        passage_max_length: int = 512,
        num_negatives: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 42,
        eval_sets: list[EvalSetConfig] | None = None,
        eval_batch_size: int = 64,
        add_eos: bool = False,
    ) -> None:
        super().__init__()
        for key, value, low in (("query_max_length", query_max_length, 1), ("passage_max_length", passage_max_length,
                                1), ("num_negatives", num_negatives, 0), ("batch_size", batch_size, 1),
                                ("num_workers", num_workers, 0), ("eval_batch_size", eval_batch_size, 1)):
            if value < low:
                raise ConfigError(f"data.{key}", f"must be >= {low}, got {value}")
        if mining is None and mined_dir is None:
            raise ConfigError("data.mined_dir", "set data.mined_dir (an existing mined set) or data.mining")
        self.mining = mining
        self.mined_dir = mined_dir
        self.tokenizer_name = tokenizer
        self.query_instruction = query_instruction
        self.mask_instruction = mask_instruction
        self.passage_prefix = passage_prefix
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.num_negatives = num_negatives
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.eval_set_configs = list(eval_sets or [])
        self.eval_batch_size = eval_batch_size
        self.add_eos = add_eos
        self.eval_sets: dict[str, EvalSet] = {}
        self.train_dataset: MinedTrainDataset | None = None
        self.progress = SamplerProgress()
        self._tokenizer = None
        self._mined_key: str | None = None
        self._verified: Path | None = None

    # ------------------------------------------------------------------------------------------------- paths
    @property
    def mined_path(self) -> Path:
        """``mined_dir``, else the cache folder named by the mining content address (computed once per instance)."""
        if self.mined_dir is not None:
            return Path(self.mined_dir).expanduser()
        assert self.mining is not None
        if self._mined_key is None:
            with contextlib.suppress(OSError):  # the cache holds the file-hash memo: a cold run hashes inputs once
                Path(self.mining.cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
            self._mined_key = mining_fingerprint(self.mining)[:16]
        return Path(self.mining.cache_dir) / "mined" / self._mined_key

    @property
    def query_prefix(self) -> str:
        return f"{self.query_instruction}: " if self.query_instruction else ""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_name:
                raise ConfigError("data.tokenizer", "no tokenizer (the CLI links it from model.embedder)")
            self._tokenizer = load_tokenizer(EmbedderConfig(model_name_or_path=self.tokenizer_name))
        return self._tokenizer

    # --------------------------------------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        """Mine once: reuse an existing (verified) mined set, else run the mining job into ``mined_path``."""
        path = self.mined_path
        if self.mined_dir is not None:  # the user's folder: verify, never overwrite
            if mined_file(path).is_file():
                verify_mined(path)
                self._verified = path
                log.info("reusing mined set %s", path)
                return
            if self.mining is None:
                raise InputError("no mined set here and no data.mining config to create it", mined_file(path))
            self._mine(path, overwrite=False)
            return
        # a cache entry: one process mines it while others wait for it (not mine()'s own lock on the output folder)
        with exclusive_lock(entry_lock_path(path), wait=True, what="mined-set cache entry"):
            overwrite = False
            if mined_file(path).is_file():
                problem = mined_problem(path, require_manifest=True)  # nvr wrote it: a manifest must vouch
                if problem is None:
                    self._verified = path
                    log.info("reusing mined set %s", path)
                    return
                log.warning("%s: %s; re-mining it", mined_file(path), problem)
                overwrite = True
            elif path.exists():
                overwrite = True  # a folder without mined.jsonl (e.g. an older partial layout): replace it
            self._mine(path, overwrite=overwrite)

    def _mine(self, path: Path, overwrite: bool) -> None:
        from nvr.mining.pipeline import mine

        assert self.mining is not None
        log.info("mining into %s (no mined set for this config and these inputs yet)", path)
        mine(dataclasses.replace(self.mining, output_dir=str(path), overwrite=overwrite))
        self._verified = path

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            if self._verified != self.mined_path:  # ranks that did not run prepare_data check it themselves
                verify_mined(self.mined_path)
            examples = load_mined(self.mined_path)
            if not examples:
                raise InputError("the mined set has no examples", mined_file(self.mined_path))
            self.train_dataset = MinedTrainDataset(examples, self.num_negatives)
            _log_pool(examples, self.num_negatives)
        if stage in (None, "fit", "validate", "test") and not self.eval_sets and self.eval_set_configs:
            self.eval_sets = load_eval_sets(self.eval_set_configs)

    # ------------------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        dataset = self.train_dataset
        assert dataset is not None
        sampler = NoDuplicatePositiveBatchSampler(
            EpochSampler(len(dataset)), self.batch_size, True, positive_keys=dataset.positive_keys,
            num_examples=len(dataset), seed=self.seed, progress=self.progress,
        )
        collate = TrainCollator(self.tokenizer, self.query_max_length, self.passage_max_length, self.query_prefix,
                                self.mask_instruction, self.passage_prefix, self.add_eos)
        return ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        if not self.eval_sets and self.eval_set_configs:
            self.setup("validate")
        if not self.eval_sets:
            return []
        return build_eval_dataloaders(self.eval_sets, self.tokenizer, self.eval_batch_size, self.add_eos,
                                      self.num_workers)

    def test_dataloader(self) -> list[DataLoader]:
        """``nvr test`` evaluates the configured eval sets (point ``eval_sets[].split`` at the held-out split)."""
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The training loop has received this batch: record it for a mid-epoch resume."""
        if isinstance(batch, dict) and "sampler_position" in batch:
            self.progress.mark_consumed(batch["sampler_epoch"], batch["sampler_position"])
        return batch


def _log_pool(examples: list[MinedExample], num_negatives: int) -> None:
    short = sum(1 for ex in examples if len(ex.negative_ids) < num_negatives)
    empty = sum(1 for ex in examples if not ex.negative_ids)
    if short:
        log.warning("%d of %d mined examples have fewer than %d negatives (%d have none and train on in-batch "
                    "negatives only); their missing slots are masked", short, len(examples), num_negatives, empty)
