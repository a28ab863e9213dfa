from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from nvr.training.sampler import NoDuplicatePositiveBatchSampler, SampleKey
from nvr.utils.errors import ConfigError


class Keys:
    """40 examples over 14 documents (many share a positive); epoch 1 rotates to a second positive."""

    def __init__(self, n: int = 40, docs: int = 14) -> None:
        self.n, self.docs = n, docs

    def __call__(self, epoch: int) -> np.ndarray:
        return (np.arange(self.n) * (1 + epoch)) % self.docs


def _sampler(rank: int = 0, world: int = 1, seed: int = 3, batch: int = 6) -> NoDuplicatePositiveBatchSampler:
    return NoDuplicatePositiveBatchSampler(None, batch, positive_keys=Keys(), num_examples=40, seed=seed,
                                           num_replicas=world, rank=rank)


def _batches(sampler: NoDuplicatePositiveBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    out = []
    for batch in sampler:
        assert all(isinstance(k, SampleKey) and k.epoch == epoch for k in batch)
        out.append([k.index for k in batch])
    return out


@pytest.mark.parametrize("epoch", [0, 1])
def test_no_duplicate_positive_and_full_batches(epoch: int) -> None:
    sampler = _sampler()
    keys = Keys()(epoch)
    batches = _batches(sampler, epoch)
    assert len(batches) == len(sampler) == 6
    for batch in batches:
        assert len(batch) == 6
        assert len(set(keys[batch].tolist())) == 6


def test_deterministic_per_seed_and_epoch() -> None:
    a, b = _batches(_sampler(), 0), _batches(_sampler(), 0)
    assert a == b
    assert a != _batches(_sampler(), 1)
    assert a != _batches(_sampler(seed=4), 0)


def test_ranks_get_equal_disjoint_shares_of_the_global_batches() -> None:
    ranks = [_batches(_sampler(rank=r, world=2), 0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    global_batches = [b.tolist() for b in _sampler(world=2).global_batches(0)]
    assert global_batches[0::2] == ranks[0] and global_batches[1::2] == ranks[1]
    # rank and world come from an injected DistributedSampler (what Lightning does under DDP)
    dist = DistributedSampler(range(40), num_replicas=2, rank=1, shuffle=False)
    injected = NoDuplicatePositiveBatchSampler(dist, 6, positive_keys=Keys(), num_examples=40, seed=3)
    dist.set_epoch(0)
    assert [[k.index for k in b] for b in injected] == ranks[1]


def test_state_resume_continues_mid_epoch() -> None:
    full = _batches(_sampler(), 1)
    first = _sampler()
    first.set_epoch(1)
    it = iter(first)
    for _ in range(2):
        batch = next(it)
        first.progress.mark_consumed(batch[0].epoch, batch[0].position)
    next(it)  # fetched ahead but never trained on: must not count
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 2
    resumed = _sampler()
    resumed.load_state_dict(state)
    rest = [[k.index for k in b] for b in resumed]  # epoch from the state, not from set_epoch
    assert rest == full[2:]
    # state taken after the last batch of epoch 1 resumes at the start of epoch 2
    done = _sampler()
    done.load_state_dict({"epoch": 1, "batches_consumed": len(done), "num_replicas": 1, "seed": 3})
    assert [[k.index for k in b] for b in done] == _batches(_sampler(), 2)
    with pytest.raises(ConfigError, match="world size"):
        _sampler(world=2).load_state_dict(state)


def test_impossible_batches_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        NoDuplicatePositiveBatchSampler(None, 50, positive_keys=Keys(), num_examples=40)
    few_docs = NoDuplicatePositiveBatchSampler(None, 6, positive_keys=Keys(docs=4), num_examples=40)
    with pytest.raises(ConfigError, match="distinct positive"):
        list(few_docs)
