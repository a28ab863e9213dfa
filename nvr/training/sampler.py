"""Training batch sampler: no positive document twice in a batch, deterministic per (seed, epoch), sharded by rank
with equal batch counts, and resumable mid-epoch.

How it plugs into Lightning 2.6 (read from its source, see ``fit_loop.py`` / ``data_connector.py``):

* Under DDP/FSDP Lightning re-instantiates a ``BatchSampler`` subclass with a ``DistributedSampler`` injected as
  ``sampler``; we only read ``num_replicas``/``rank``/``epoch`` from it. Without a distributed run, the
  :class:`EpochSampler` placeholder receives Lightning's ``set_epoch`` calls instead.
* Every process builds the same *global* list of batches for the epoch, then takes ``batches[rank::world]``, so
  the no-duplicate rule holds for the global batch and all ranks step the same number of times.
* Lightning saves ``state_dict()`` of a train ``DataLoader`` that has one (:class:`ResumableDataLoader`) into the
  checkpoint and restores it before iterating. Because Lightning (and worker processes) fetch batches ahead of
  the training step, the sampler does not count what it yielded: the DataModule reports each batch when the
  training loop actually receives it (``on_before_batch_transfer``) through the shared :class:`SamplerProgress`.
* Each index is yielded as a :class:`SampleKey` ``(epoch, position, index)`` so the dataset, even inside a worker
  process, knows the epoch for its per-epoch rotation of positives/negatives.
* Several datasets (:class:`MultiDatasetBatchSampler`): each step is one dataset on every rank; the single-dataset
  :class:`NoDuplicatePositiveBatchSampler` is its one-group case with the same random stream.
* Lightning applies the train loader's saved state only when it builds the loader after restoring the loops; an
  epoch-based run builds it earlier (``estimated_stepping_batches``), so the DataModule checkpoints the same state
  (:meth:`SamplerProgress.state_dict`) and hands it back through ``SamplerProgress.pending_state``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from nvr.utils.errors import ConfigError
from nvr.utils.seeding import rng_for


class SampleKey(NamedTuple):
    """What the dataset receives instead of a bare index."""

    epoch: int
    position: int
    """Index of the batch within this rank's batches of the epoch."""
    index: int


class EpochSampler(Sampler[int]):
    """Placeholder ``sampler`` that records Lightning's ``set_epoch`` calls on a single process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


@dataclass
class SamplerProgress:
    """Batches the training loop has *received* (shared by the DataModule and every copy of the sampler)."""

    epoch: int = 0
    consumed: int = 0
    pending_resume: tuple[int, int] | None = None
    """(epoch, batches to skip) loaded from a checkpoint, applied by the next ``__iter__``."""
    pending_state: dict[str, Any] | None = None
    """A sampler ``state_dict`` restored through the DataModule's own state, checked and applied by the next
    ``__iter__`` of the sampler that actually runs (under DDP the one Lightning re-instantiated)."""
    signature: dict[str, Any] = field(default_factory=dict)
    """``num_replicas``, ``seed`` and ``schedule`` of the last sampler built on this progress (the running one)."""

    def state_dict(self) -> dict[str, Any]:
        """The running sampler's ``state_dict`` (what the DataModule checkpoints alongside Lightning's copy)."""
        return {"epoch": self.epoch, "batches_consumed": self.consumed, **self.signature}

    def mark_consumed(self, epoch: int, position: int) -> None:
        self.epoch, self.consumed = int(epoch), int(position) + 1


@dataclass(frozen=True)
class DatasetGroup:
    """One training dataset inside the concatenated dataset the sampler indexes.

    Examples ``offset .. offset + size - 1`` belong to it. ``positive_keys(epoch)`` (one int64 per example) turns
    on the no-duplicate-positive rule for its batches; None (classification, where every example of a label shares
    the label's text as positive and the loss masks same-label passages by id) batches a plain seeded shuffle.
    ``weight`` is its share of the steps under proportional sampling (None: its number of full batches, i.e. every
    batch once per epoch). ``key`` names the dataset's config entry in errors.
    """

    name: str
    offset: int
    size: int
    positive_keys: Callable[[int], np.ndarray] | None
    weight: float | None = None
    key: str = "data"


Sampling = Literal["proportional", "round_robin"]


class MultiDatasetBatchSampler(BatchSampler):
    """Homogeneous batches (one dataset per step) from several datasets, seeded, sharded by rank, resumable.

    Each epoch is a list of *steps*; a step names one dataset and holds one batch per rank from it, so every rank
    draws from the same dataset at the same step (per-dataset settings such as in-batch negatives stay consistent
    across a DDP step). Rank ``r`` takes batch ``r`` of every step, so all ranks step the same number of times.

    * ``proportional`` (default): the epoch has as many steps as all datasets have full global batches together
      (``sum(size_d // (batch_size * world))``); dataset ``d`` gets a share ``weight_d / sum(weight)`` of them
      (largest-remainder rounding), in an order shuffled by ``(seed, epoch)``. Without weights every batch of every
      dataset is used exactly once per epoch; a dataset weighted above its size is cycled through again (a fresh
      shuffle per extra round), one below it uses only its first batches of that epoch's shuffle.
    * ``round_robin``: datasets take turns in config order (``d0, d1, ..., d0, d1, ...``) until the one with the
      fewest batches has used them all (sentence-transformers' round-robin sampler); weights are not used.

    Within a dataset, batches follow :class:`NoDuplicatePositiveBatchSampler`'s rule (distinct positive keys per
    batch) unless its group has no ``positive_keys``. With one dataset the batches are exactly those of the
    single-dataset sampler (same random stream), so a one-entry ``data.datasets`` equals the single-dataset form.
    """

    def __init__(
        self,
        sampler: Sampler[int] | None,
        batch_size: int,
        drop_last: bool = True,
        *,
        groups: Sequence[DatasetGroup],
        seed: int = 42,
        sampling: Sampling = "proportional",
        num_replicas: int = 1,
        rank: int = 0,
        progress: SamplerProgress | None = None,
    ) -> None:
        groups = list(groups)
        if not groups:
            raise ValueError("MultiDatasetBatchSampler needs at least one dataset group")
        total = sum(g.size for g in groups)
        super().__init__(sampler if sampler is not None else EpochSampler(total), batch_size, drop_last)
        if isinstance(self.sampler, DistributedSampler):
            num_replicas, rank = self.sampler.num_replicas, self.sampler.rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside world size {num_replicas}")
        if sampling not in ("proportional", "round_robin"):
            raise ConfigError("data.dataset_sampling", f"must be proportional or round_robin, got {sampling!r}")
        self.groups = groups
        self.num_examples = total
        self.seed = int(seed)
        self.sampling = sampling
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.progress = progress if progress is not None else SamplerProgress()
        self.group_steps = [g.size // (self.batch_size * self.num_replicas) for g in groups]
        for group, steps in zip(groups, self.group_steps, strict=True):
            if steps == 0:
                raise ConfigError(
                    group.key,
                    f"{group.size} training examples cannot fill one batch of {batch_size} on each of "
                    f"{self.num_replicas} rank(s); lower data.batch_size or add data",
                )
        self.step_counts = self._step_counts()
        self.progress.signature = {"num_replicas": self.num_replicas, "seed": self.seed,
                                   "schedule": self.schedule_signature()}

    def _step_counts(self) -> list[int]:
        """Steps per dataset in one epoch."""
        steps = self.group_steps
        if self.sampling == "round_robin":
            return [min(steps)] * len(steps)
        if all(g.weight is None for g in self.groups):
            return list(steps)
        weights = np.asarray([g.weight for g in self.groups], dtype=np.float64)
        quotas = sum(steps) * weights / weights.sum()
        counts = np.floor(quotas).astype(np.int64)
        leftover = sum(steps) - int(counts.sum())
        for i in sorted(range(len(counts)), key=lambda j: (-(quotas[j] - counts[j]), j))[:leftover]:
            counts[i] += 1
        return counts.tolist()

    def __len__(self) -> int:
        return int(sum(self.step_counts))

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """For direct use outside Lightning (Lightning calls ``set_epoch`` on ``self.sampler``)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, skip = self._start()
        batches = self.rank_batches(epoch)
        self.progress.epoch, self.progress.consumed = epoch, skip
        for position in range(skip, len(batches)):
            yield [SampleKey(epoch, position, int(i)) for i in batches[position]]

    def _start(self) -> tuple[int, int]:
        """(epoch, batches to skip): a loaded checkpoint state wins over the sampler's epoch once."""
        state, self.progress.pending_state = self.progress.pending_state, None
        if state is not None:
            self.load_state_dict(state)
        resume, self.progress.pending_resume = self.progress.pending_resume, None
        if resume is None:
            return self.epoch, 0
        epoch, consumed = resume
        if consumed >= len(self):  # the checkpoint was taken after the epoch's last batch
            return epoch + 1, 0
        return epoch, consumed

    def schedule(self, epoch: int) -> np.ndarray:
        """Dataset index of every step of ``epoch`` (identical on every process)."""
        counts = self.step_counts
        if self.sampling == "round_robin":
            return np.tile(np.arange(len(counts), dtype=np.int64), counts[0])
        order = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        if len(counts) == 1:
            return order
        return rng_for(self.seed, "dataset-schedule", epoch).permutation(order)

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches for ``epoch``: batch ``rank`` of every step."""
        return self.global_batches(epoch)[self.rank :: self.num_replicas]

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """Every step's batches for all ranks, step-major (step ``t``, rank ``r`` at ``t * world + r``); indices
        are into the concatenated dataset. Identical on every process."""
        world = self.num_replicas
        pools = [self._group_batches(i, epoch, steps * world) for i, steps in enumerate(self.step_counts)]
        used = [0] * len(self.groups)
        out: list[np.ndarray] = []
        for d in self.schedule(epoch).tolist():
            out.extend(pools[d][used[d] : used[d] + world])
            used[d] += world
        return out

    def _group_batches(self, index: int, epoch: int, count: int) -> list[np.ndarray]:
        """``count`` batches of one dataset (global indices), cycling through fresh shuffles when it is weighted
        above its size."""
        group = self.groups[index]
        per_round = self.group_steps[index] * self.num_replicas
        keys = self._keys(group, epoch)
        out: list[np.ndarray] = []
        round_ = 0
        while len(out) < count:
            stream = ("batches", epoch) if len(self.groups) == 1 else ("batches", group.name, epoch)
            rng = rng_for(self.seed, *stream, *((round_,) if round_ else ()))
            order = rng.permutation(group.size)
            if keys is None:
                batches = [order[j * self.batch_size : (j + 1) * self.batch_size] for j in range(per_round)]
            else:
                batches = _fill_batches(order, keys, self.batch_size, per_round, rng)
            out.extend(np.asarray(b, dtype=np.int64) + group.offset for b in batches)
            round_ += 1
        return out[:count]

    def _keys(self, group: DatasetGroup, epoch: int) -> np.ndarray | None:
        if group.positive_keys is None:
            return None
        keys = np.asarray(group.positive_keys(epoch), dtype=np.int64)
        if keys.shape != (group.size,):
            raise ValueError(f"positive_keys({epoch}) returned shape {keys.shape}, expected ({group.size},)")
        distinct = len(np.unique(keys))
        if distinct < self.batch_size:
            key = "data.batch_size" if len(self.groups) == 1 else group.key
            raise ConfigError(key, f"only {distinct} distinct positive documents in epoch {epoch}; a batch of "
                                   f"{self.batch_size} cannot avoid repeating one")
        return keys

    def schedule_signature(self) -> dict[str, Any]:
        """What fixes the order of steps: a mid-epoch resume needs the same."""
        return {"datasets": [g.name for g in self.groups], "sampling": self.sampling,
                "weights": [g.weight for g in self.groups]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.progress.epoch, "batches_consumed": self.progress.consumed,
                "num_replicas": self.num_replicas, "seed": self.seed, "schedule": self.schedule_signature()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_replicas", self.num_replicas)) != self.num_replicas:
            raise ConfigError(
                "trainer.devices",
                f"checkpoint was written with {state['num_replicas']} data-parallel ranks, now {self.num_replicas}; "
                "mid-epoch resume needs the same world size",
            )
        saved = state.get("schedule")
        if saved is not None and saved != self.schedule_signature():
            raise ConfigError(
                "data.datasets",
                f"checkpoint was written with datasets {saved}, now {self.schedule_signature()}; a mid-epoch resume "
                "needs the same datasets, weights and data.dataset_sampling",
            )
        self.progress.pending_resume = (int(state["epoch"]), int(state["batches_consumed"]))
        self.progress.epoch, self.progress.consumed = self.progress.pending_resume


class NoDuplicatePositiveBatchSampler(MultiDatasetBatchSampler):
    """Full batches whose examples have pairwise distinct positive keys (hashed doc ids) for that epoch.

    ``positive_keys(epoch)`` returns one int64 key per example (the positive it trains on in that epoch).
    Batches are filled greedily in a seeded shuffle order, deferring an example whose key is already in the
    batch to the next one; if the pool runs dry before the last batch is full, it is topped up with examples
    already used this epoch (distinct keys still), so every epoch has exactly ``len(self)`` batches per rank.
    The single-dataset case of :class:`MultiDatasetBatchSampler`.
    """

    def __init__(
        self,
        sampler: Sampler[int] | None,
        batch_size: int,
        drop_last: bool = True,
        *,
        positive_keys: Callable[[int], np.ndarray],
        num_examples: int,
        seed: int = 42,
        num_replicas: int = 1,
        rank: int = 0,
        progress: SamplerProgress | None = None,
    ) -> None:
        group = DatasetGroup("default", 0, int(num_examples), positive_keys, key="data.batch_size")
        super().__init__(sampler, batch_size, drop_last, groups=[group], seed=seed, num_replicas=num_replicas,
                         rank=rank, progress=progress)
        self.positive_keys = positive_keys


def _fill_batches(order: np.ndarray, keys: np.ndarray, size: int, total: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Greedy no-duplicate batching; deferred examples get first pick in the next batch."""
    pending = deque(int(i) for i in order)
    batches: list[np.ndarray] = []
    while len(batches) < total:
        batch: list[int] = []
        seen: set[int] = set()
        deferred: list[int] = []
        while pending and len(batch) < size:
            i = pending.popleft()
            if int(keys[i]) in seen:
                deferred.append(i)
            else:
                batch.append(i)
                seen.add(int(keys[i]))
        pending.extendleft(reversed(deferred))
        if len(batch) < size:
            for i in rng.permutation(len(keys)):
                if len(batch) == size:
                    break
                if int(keys[i]) not in seen:
                    batch.append(int(i))
                    seen.add(int(keys[i]))
        batches.append(np.asarray(batch, dtype=np.int64))
    return batches


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as stateful: its state is the batch sampler's (epoch, batches consumed)."""

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state_dict)
