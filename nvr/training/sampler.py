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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

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

    def mark_consumed(self, epoch: int, position: int) -> None:
        self.epoch, self.consumed = int(epoch), int(position) + 1


class NoDuplicatePositiveBatchSampler(BatchSampler):
    """Full batches whose examples have pairwise distinct positive keys (hashed doc ids) for that epoch.

    ``positive_keys(epoch)`` returns one int64 key per example (the positive it trains on in that epoch).
    Batches are filled greedily in a seeded shuffle order, deferring an example whose key is already in the
    batch to the next one; if the pool runs dry before the last batch is full, it is topped up with examples
    already used this epoch (distinct keys still), so every epoch has exactly ``len(self)`` batches per rank.
    """

    def __init__(
        self,
        sampler: Sampler | None,
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
        super().__init__(sampler if sampler is not None else EpochSampler(num_examples), batch_size, drop_last)
        if isinstance(self.sampler, DistributedSampler):
            num_replicas, rank = self.sampler.num_replicas, self.sampler.rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside world size {num_replicas}")
        self.positive_keys = positive_keys
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.progress = progress if progress is not None else SamplerProgress()
        if len(self) == 0:
            raise ConfigError(
                "data.batch_size",
                f"{self.num_examples} training examples cannot fill one batch of {batch_size} on each of "
                f"{self.num_replicas} rank(s); lower batch_size or add data",
            )

    def __len__(self) -> int:
        return (self.num_examples // self.batch_size) // self.num_replicas

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
        resume, self.progress.pending_resume = self.progress.pending_resume, None
        if resume is None:
            return self.epoch, 0
        epoch, consumed = resume
        if consumed >= len(self):  # the checkpoint was taken after the epoch's last batch
            return epoch + 1, 0
        return epoch, consumed

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches for ``epoch`` (a strided slice of the global batch list)."""
        return self.global_batches(epoch)[self.rank :: self.num_replicas]

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches for all ranks together; identical on every process."""
        keys = np.asarray(self.positive_keys(epoch), dtype=np.int64)
        if keys.shape != (self.num_examples,):
            raise ValueError(f"positive_keys({epoch}) returned shape {keys.shape}, expected ({self.num_examples},)")
        if len(np.unique(keys)) < self.batch_size:
            raise ConfigError(
                "data.batch_size",
                f"only {len(np.unique(keys))} distinct positive documents in epoch {epoch}; a batch of "
                f"{self.batch_size} cannot avoid repeating one",
            )
        total = len(self) * self.num_replicas
        rng = rng_for(self.seed, "batches", epoch)
        return _fill_batches(rng.permutation(self.num_examples), keys, self.batch_size, total, rng)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.progress.epoch, "batches_consumed": self.progress.consumed,
                "num_replicas": self.num_replicas, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_replicas", self.num_replicas)) != self.num_replicas:
            raise ConfigError(
                "trainer.devices",
                f"checkpoint was written with {state['num_replicas']} data-parallel ranks, now {self.num_replicas}; "
                "mid-epoch resume needs the same world size",
            )
        self.progress.pending_resume = (int(state["epoch"]), int(state["batches_consumed"]))
        self.progress.epoch, self.progress.consumed = self.progress.pending_resume


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
