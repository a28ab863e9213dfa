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

Several datasets (``data.datasets``, :mod:`nvr.training.multi_dataset`) train in homogeneous batches drawn by
:class:`~nvr.training.sampler.MultiDatasetBatchSampler`; each retrieval dataset is mined (or reused) exactly as
the single-dataset form, task datasets (classification, STS) are built from their files
(:mod:`nvr.training.tasks`). The single-dataset form is the one-entry case named ``default`` (same batches).
Re-mining: :meth:`MinedDataModule.swap_mined` replaces a dataset's hard negatives with another mined folder's
for the batches built after the call; the current mined folder per dataset is in :meth:`state_dict`, so a resumed
run continues on the swapped set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from nvr.config.mining import MineConfig
from nvr.evaluation.data import EvalSet, EvalSetConfig, build_eval_dataloaders, load_eval_sets
from nvr.mining.mined_set import MANIFEST_FILE, MinedExample, load_mined, mined_file, mined_problem, verify_mined
from nvr.modeling.backbone import load_tokenizer
from nvr.modeling.config import EmbedderConfig
from nvr.modeling.tokenization import check_prefix_fits
from nvr.training.collate import (
    NEGATIVE_ORDERS,
    ConcatTrainDataset,
    DatasetCollator,
    MinedTrainDataset,
    NegativeOrder,
    TrainCollator,
)
from nvr.training.multi_dataset import DatasetSpec, build_mine_config, parse_datasets
from nvr.training.sampler import (
    DatasetGroup,
    EpochSampler,
    MultiDatasetBatchSampler,
    ResumableDataLoader,
    SamplerProgress,
)
from nvr.utils.errors import ConfigError, InputError
from nvr.utils.locking import entry_lock_path, exclusive_lock

log = logging.getLogger(__name__)


def mining_fingerprint(cfg: MineConfig) -> str:
    """Cache key of a mined set: the pipeline's content address (config without output locations, input file
    contents, teacher and cross-encoder fingerprints)."""
    from nvr.mining.pipeline import mining_fingerprint as content_fingerprint

    return content_fingerprint(cfg)


class MinedDataModule(pl.LightningDataModule):
    """Train on one or several mined sets / task files, validate on BEIR eval sets.

    Args:
        mining: how to mine the training set when it is not there yet (None = ``mined_dir`` must exist).
        mined_dir: where the mined set lives; default ``<mining.cache_dir>/mined/<fingerprint[:16]>``.
        datasets: several training datasets instead of ``mining``/``mined_dir`` (see
            :mod:`nvr.training.multi_dataset`); ``query_instruction``, ``passage_prefix``, ``num_negatives`` and
            ``max_extra_positives`` below are their defaults.
        dataset_sampling: ``proportional`` (steps shared by weight, or by size without weights; seeded order) or
            ``round_robin`` (datasets in turn until the smallest runs out; weights unused).
        tokenizer: tokenizer name or folder (linked from ``model.embedder.model_name_or_path`` by the CLI).
        query_instruction: task definition; queries become ``"{instruction}: {query}"`` (NV-Retriever format). An
            instruction that leaves no query token within ``query_max_length`` is a ``ConfigError`` naming it
            (never truncated: a cut instruction is another instruction).
        mask_instruction: keep the instruction tokens out of pooling (NV-Embed / NV-Retriever).
        passage_prefix: text before every passage (e5 ``"passage: "``); the paper uses none.
        num_negatives: hard negatives per example per step, chosen from the stored pool by ``negative_order``.
        negative_order: ``rotate`` (default: consecutive negatives, moving by ``num_negatives`` each epoch),
            ``top_first`` (the top-1 negative every epoch, the rest rotating) or ``sample`` (seeded per query and
            epoch); see :class:`~nvr.training.collate.MinedTrainDataset`.
        max_extra_positives: relabelled extra positives (``extra_positives`` of mined rows) collated per example
            after its positive (0 = none collated; they are still never scored as that query's negatives).
        batch_size: queries per rank per step.
        eval_sets: BEIR folders for validation (``val/<name>/ndcg@10``).
        add_eos: append EOS to every sequence (linked from the model's embedder config).
    """

    def __init__(
        self,
        mining: MineConfig | None = None,
        mined_dir: str | None = None,
        datasets: list[dict[str, Any]] | None = None,
        dataset_sampling: Literal["proportional", "round_robin"] = "proportional",
        tokenizer: str | None = None,
        query_instruction: str = "",
        mask_instruction: bool = True,
        passage_prefix: str = "",
        query_max_length: int = 192,
        passage_max_length: int = 512,
        num_negatives: int = 1,
        negative_order: NegativeOrder = "rotate",
        max_extra_positives: int = 0,
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
                                ("num_workers", num_workers, 0), ("eval_batch_size", eval_batch_size, 1),
                                ("max_extra_positives", max_extra_positives, 0)):
            if value < low:
                raise ConfigError(f"data.{key}", f"must be >= {low}, got {value}")
        if negative_order not in NEGATIVE_ORDERS:
            raise ConfigError("data.negative_order", f"must be one of {list(NEGATIVE_ORDERS)}, got {negative_order!r}")
        if dataset_sampling not in ("proportional", "round_robin"):
            raise ConfigError("data.dataset_sampling", f"must be proportional or round_robin, got {dataset_sampling!r}")
        if datasets is not None:
            if mining is not None or mined_dir is not None:
                raise ConfigError("data.datasets", "set data.datasets or data.mining / data.mined_dir, not both")
            self.specs = parse_datasets(datasets, {"query_instruction": query_instruction, "passage_prefix":
                                                   passage_prefix, "num_negatives": num_negatives,
                                                   "max_extra_positives": max_extra_positives})
            if dataset_sampling == "round_robin" and any(s.weight is not None for s in self.specs):
                log.warning("data.dataset_sampling is round_robin: the datasets' weights are not used")
        else:
            if mining is None and mined_dir is None:
                raise ConfigError("data.mined_dir", "set data.mined_dir (an existing mined set) or data.mining")
            self.specs = [DatasetSpec("default", "data", mining=mining, mined_dir=mined_dir,
                                      query_instruction=query_instruction, passage_prefix=passage_prefix,
                                      num_negatives=num_negatives, max_extra_positives=max_extra_positives)]
        self.multi_dataset = datasets is not None
        self.mining = mining
        self.mined_dir = mined_dir
        self.dataset_sampling = dataset_sampling
        self.tokenizer_name = tokenizer
        self.query_instruction = query_instruction
        self.mask_instruction = mask_instruction
        self.passage_prefix = passage_prefix
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.num_negatives = num_negatives
        self.negative_order = negative_order
        self.max_extra_positives = max_extra_positives
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.eval_set_configs = list(eval_sets or [])
        self.eval_batch_size = eval_batch_size
        self.add_eos = add_eos
        self.eval_sets: dict[str, EvalSet] = {}
        self.train_dataset: ConcatTrainDataset | None = None
        self.parts: dict[str, MinedTrainDataset] = {}
        self.progress = SamplerProgress()
        self._tokenizer = None
        self._mined_keys: dict[str, str] = {}
        self._verified: set[Path] = set()
        self._current: dict[str, Path] = {}
        """Mined folder each retrieval dataset currently trains on, once it differs from its initial one."""
        self._mine_configs: dict[str, MineConfig | None] = {s.name: s.mining for s in self.specs if s.mined}
        self._train_loader: ResumableDataLoader | None = None

    # ------------------------------------------------------------------------------------------------- paths
    @property
    def dataset_names(self) -> list[str]:
        """Every training dataset, in config order (``default`` for the single-dataset form)."""
        return [s.name for s in self.specs]

    @property
    def mined_datasets(self) -> list[str]:
        """The datasets that train on a mined set (what :meth:`swap_mined` accepts)."""
        return [s.name for s in self.specs if s.mined]

    def spec(self, dataset: str | None = None) -> DatasetSpec:
        """A dataset's resolved settings; ``None`` = the only dataset (an error when there are several)."""
        if dataset is None:
            if len(self.specs) > 1:
                raise ConfigError("data.datasets", f"several datasets {self.dataset_names}: name one")
            return self.specs[0]
        for spec in self.specs:
            if spec.name == dataset:
                return spec
        raise ConfigError("data.datasets", f"no dataset named {dataset!r} (have {self.dataset_names})")

    def initial_mined_path(self, spec: DatasetSpec) -> Path:
        """``mined_dir``, else the cache folder named by the mining content address (computed once per dataset)."""
        if spec.mined_dir is not None:
            return Path(spec.mined_dir).expanduser()
        assert spec.mining is not None
        if spec.name not in self._mined_keys:
            with contextlib.suppress(OSError):  # the cache holds the file-hash memo: a cold run hashes inputs once
                Path(spec.mining.cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
            self._mined_keys[spec.name] = mining_fingerprint(spec.mining)[:16]
        return Path(spec.mining.cache_dir) / "mined" / self._mined_keys[spec.name]

    def current_mined_path(self, dataset: str | None = None) -> Path:
        """The mined folder a retrieval dataset trains on now (after any :meth:`swap_mined`)."""
        spec = self._mined_spec(dataset)
        return self._current.get(spec.name) or self.initial_mined_path(spec)

    @property
    def mined_path(self) -> Path | None:
        """The current mined folder of the (first) retrieval dataset; None when every dataset is a task file."""
        mined = self.mined_datasets
        return self.current_mined_path(mined[0]) if mined else None

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
        """Mine once per retrieval dataset: reuse an existing (verified) mined set, else mine it."""
        for spec in self.specs:
            if spec.mined:
                self._prepare_mined(spec)

    def _prepare_mined(self, spec: DatasetSpec) -> None:
        path = self.initial_mined_path(spec)
        if spec.mined_dir is not None:  # the user's folder: verify, never overwrite
            if mined_file(path).is_file():
                verify_mined(path)
                self._verified.add(path)
                log.info("reusing mined set %s", path)
                return
            if spec.mining is None:
                raise InputError("no mined set here and no data.mining config to create it", mined_file(path))
            self._mine(spec, path, overwrite=False)
            return
        # a cache entry: one process mines it while others wait for it (not mine()'s own lock on the output folder)
        with exclusive_lock(entry_lock_path(path), wait=True, what="mined-set cache entry"):
            overwrite = False
            if mined_file(path).is_file():
                problem = mined_problem(path, require_manifest=True)  # nvr wrote it: a manifest must vouch
                if problem is None:
                    self._verified.add(path)
                    log.info("reusing mined set %s", path)
                    return
                log.warning("%s: %s; re-mining it", mined_file(path), problem)
                overwrite = True
            elif path.exists():
                overwrite = True  # a folder without mined.jsonl (e.g. an older partial layout): replace it
            self._mine(spec, path, overwrite=overwrite)

    def _mine(self, spec: DatasetSpec, path: Path, overwrite: bool) -> None:
        from nvr.mining.pipeline import mine

        assert spec.mining is not None
        log.info("mining %s into %s (no mined set for this config and these inputs yet)",
                 f"dataset {spec.name!r}" if self.multi_dataset else "the training set", path)
        out = mine(dataclasses.replace(spec.mining, output_dir=str(path), overwrite=overwrite))
        from nvr.utils.distributed import dist_rank_world

        if dist_rank_world()[0] == 0:  # the same summary `nvr mine` prints
            from nvr.mining.report import print_mining_summary

            print_mining_summary(out)
        self._verified.add(path)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            parts = []
            for spec in self.specs:
                part = MinedTrainDataset(self._load_examples(spec), spec.num_negatives, name=spec.name,
                                         negative_order=self.negative_order, seed=self.seed,
                                         max_extra_positives=spec.max_extra_positives)
                if spec.mined:
                    _log_pool(part.examples, spec.num_negatives)
                parts.append(part)
            self.parts = {p.name: p for p in parts}
            self.train_dataset = ConcatTrainDataset(parts)
            for name, path in list(self._current.items()):  # swaps recorded before the data was loaded
                self._apply_swap(self.spec(name), path)
        if stage in (None, "fit", "validate", "test") and not self.eval_sets and self.eval_set_configs:
            self.eval_sets = load_eval_sets(self.eval_set_configs)

    def _load_examples(self, spec: DatasetSpec) -> list[MinedExample]:
        if spec.mined:
            path = self.initial_mined_path(spec)
            if path not in self._verified:  # ranks that did not run prepare_data check it themselves
                verify_mined(path)
            examples = load_mined(path)
            source = mined_file(path)
        else:
            from nvr.training.tasks import load_classification, load_sts

            source = Path(spec.path)
            examples = (load_classification(source, spec.label_texts) if spec.task == "classification"
                        else load_sts(source, spec.min_score))
        if not examples:
            if not self.multi_dataset:
                raise InputError("the mined set has no examples", source)
            raise ConfigError(spec.key, f"dataset {spec.name!r} has no training examples ({source})")
        return examples

    # ------------------------------------------------------------------------------------------- re-mining
    def _mined_spec(self, dataset: str | None) -> DatasetSpec:
        if dataset is None and len(self.mined_datasets) == 1:
            dataset = self.mined_datasets[0]
        spec = self.spec(dataset)
        if not spec.mined:
            raise ConfigError(f"{spec.key}.task", f"dataset {spec.name!r} is a {spec.task} dataset, not a mined set")
        return spec

    def swap_mined(self, mined_dir: str | Path, dataset: str | None = None) -> None:
        """Train a retrieval dataset on the hard negatives (and extra positives) of another mined folder from the
        next batch built on (the next epoch when called from ``on_train_epoch_end``); its queries and positives
        stay. Every training query must be in the folder (an ``InputError`` naming it otherwise; nothing changes).
        Call it on every rank (each holds its own copy of the data)."""
        spec = self._mined_spec(dataset)
        path = Path(mined_dir).expanduser()
        if self.train_dataset is not None:
            self._apply_swap(spec, path)
        else:
            verify_mined(path)
        self._current[spec.name] = path
        self._mine_configs[spec.name] = self._config_of(path, spec)
        log.info("dataset %r now trains on the mined set %s", spec.name, path)

    def _apply_swap(self, spec: DatasetSpec, path: Path) -> None:
        verify_mined(path)
        part = self.parts[spec.name]
        missing = part.swap_negatives({ex.query_id: ex for ex in load_mined(path)})
        if missing:
            raise InputError(f"{len(missing)} of the {len(part)} training queries of dataset {spec.name!r} are not in "
                             f"this mined set (e.g. {missing[0]!r}); it cannot replace their negatives",
                             mined_file(path))
        self._restart_workers()

    def _restart_workers(self) -> None:
        """Persistent DataLoader workers hold a copy of the dataset: drop them so the next epoch forks new ones."""
        loader = self._train_loader
        if loader is not None and loader.num_workers > 0 and getattr(loader, "_iterator", None) is not None:
            loader._iterator = None

    def _config_of(self, path: Path, spec: DatasetSpec) -> MineConfig | None:
        """The mining config recorded in a mined folder's manifest (output and cache locations from the dataset's
        own config); None when the folder has no readable one."""
        try:
            record = json.loads((mined_file(path).with_name(MANIFEST_FILE)).read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        base = self._mine_configs.get(spec.name) or spec.mining
        locations = {"output_dir": str(path)}
        if base is not None:
            locations.update(cache_dir=base.cache_dir, search_memory_mb=base.search_memory_mb, audit=base.audit)
        try:
            return build_mine_config({**record, **locations}, f"{path}/{MANIFEST_FILE}:config")
        except (ConfigError, InputError) as err:
            log.warning("%s: its mining config cannot be read back (%s)", path, err)
            return None

    def mining_config(self, dataset: str | None = None) -> MineConfig | None:
        """The mining config that produced a retrieval dataset's current mined set (None: a ``mined_dir`` given
        without one, or a swapped-in folder whose manifest records none)."""
        return self._mine_configs.get(self._mined_spec(dataset).name)

    def state_dict(self) -> dict[str, Any]:
        """The mined folder each retrieval dataset trains on (so a resume continues on a swapped set) and the train
        sampler's position.

        The position is also in Lightning's own copy (the train DataLoader's state), but Lightning only applies
        that one when the train loader is built *after* the loops are restored; with epoch-based training
        ``trainer.estimated_stepping_batches`` (the LR schedule) builds it before, and the copy would be dropped.
        The DataModule state is restored first in every case, so a mid-epoch resume never replays an epoch."""
        state: dict[str, Any] = {"mined_dirs": {name: str(self.current_mined_path(name))
                                                for name in self.mined_datasets}}
        if self.progress.signature:
            state["sampler"] = self.progress.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sampler"):
            self.progress.pending_state = dict(state_dict["sampler"])
            self.progress.epoch = int(state_dict["sampler"]["epoch"])
            self.progress.consumed = int(state_dict["sampler"]["batches_consumed"])
        for name, saved in (state_dict.get("mined_dirs") or {}).items():
            if name not in self.mined_datasets:
                log.warning("checkpoint names a mined dataset %r this config does not have; ignored", name)
                continue
            if Path(saved) != self.current_mined_path(name):
                self.swap_mined(saved, name)

    # ------------------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        dataset = self.train_dataset
        assert dataset is not None
        groups = []
        for spec, offset in zip(self.specs, dataset.offsets, strict=False):
            part = self.parts[spec.name]
            keys = None if spec.task == "classification" else part.positive_keys  # same-label passages: masked
            groups.append(DatasetGroup(spec.name, offset, len(part), keys, spec.weight,
                                       key=spec.key if self.multi_dataset else "data.batch_size"))
        sampler = MultiDatasetBatchSampler(EpochSampler(len(dataset)), self.batch_size, True, groups=groups,
                                           seed=self.seed, sampling=self.dataset_sampling, progress=self.progress)
        collate = DatasetCollator({spec.name: self._collator(spec) for spec in self.specs})
        self._train_loader = ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                                 num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        return self._train_loader

    def _collator(self, spec: DatasetSpec) -> TrainCollator:
        """A dataset's collator; its instruction and passage prefix must leave room for text (checked after the
        module clamped the max lengths to the model)."""
        check_prefix_fits(self.tokenizer, spec.query_prefix, self.query_max_length, self.add_eos,
                          spec.field_key("query_instruction"), "data.query_max_length")
        check_prefix_fits(self.tokenizer, spec.passage_prefix, self.passage_max_length, self.add_eos,
                          spec.field_key("passage_prefix"), "data.passage_max_length")
        return TrainCollator(self.tokenizer, self.query_max_length, self.passage_max_length, spec.query_prefix,
                             self.mask_instruction, spec.passage_prefix, self.add_eos, spec.use_in_batch_negatives)

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
