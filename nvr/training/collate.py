"""Training examples for one epoch and their tokenized batches (fixed shape ``[B, 1 + num_negatives]``).

Every example is keyed by a :class:`~nvr.training.sampler.SampleKey`, so the per-epoch choice of positive and
negatives is a pure function of (example, epoch) and works the same inside DataLoader worker processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nvr.mining.mined_set import MinedExample
from nvr.modeling.tokenization import tokenize
from nvr.training.loss import PAD_ID
from nvr.training.sampler import SampleKey


def doc_hash(doc_id: str) -> int:
    """Stable non-negative int64 of a document id (same on every rank and run; -1 stays free for padding)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)


class MinedTrainDataset:
    """Mined examples with a deterministic rotation over several positives and a larger negatives pool.

    Epoch ``e`` trains example ``i`` on positive ``e mod P_i`` and on the ``num_negatives`` stored negatives
    starting at ``(e * num_negatives) mod K_i`` (cyclic), so epoch 0 uses the top-ranked ones and a pool larger
    than ``num_negatives`` is cycled through. Examples with fewer than ``num_negatives`` stored negatives get
    padding slots (id -1), which the loss masks.
    """

    def __init__(self, examples: Sequence[MinedExample], num_negatives: int) -> None:
        self.examples = list(examples)
        self.num_negatives = int(num_negatives)
        self._positive_hashes = [np.asarray([doc_hash(d) for d in ex.positive_ids], dtype=np.int64)
                                 for ex in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def positive_keys(self, epoch: int) -> np.ndarray:
        """Hashed id of the positive each example trains on in ``epoch`` (the sampler's no-duplicate key)."""
        return np.asarray([h[epoch % len(h)] for h in self._positive_hashes], dtype=np.int64)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        epoch, _, index = key
        ex = self.examples[index]
        p = epoch % len(ex.positive_ids)
        negatives = self._negative_slots(ex, epoch)
        pos_score = ex.positive_scores[p] if ex.positive_scores and ex.positive_scores[p] is not None else None
        return {
            "query": ex.query,
            "passages": [ex.positive_texts[p], *(ex.negative_texts[j] if j >= 0 else "" for j in negatives)],
            "passage_ids": [doc_hash(ex.positive_ids[p]),
                            *(doc_hash(ex.negative_ids[j]) if j >= 0 else PAD_ID for j in negatives)],
            "positive_ids": self._positive_hashes[index].tolist(),
            "negative_scores": [ex.negative_scores[j] if j >= 0 else float("nan") for j in negatives],
            "positive_score": float("nan") if pos_score is None else float(pos_score),
            "epoch": epoch,
            "position": key.position,
        }

    def _negative_slots(self, ex: MinedExample, epoch: int) -> list[int]:
        """Positions into the stored negatives (-1 = padding slot)."""
        pool, n = len(ex.negative_ids), self.num_negatives
        if pool <= n:
            return list(range(pool)) + [-1] * (n - pool)
        start = (epoch * n) % pool
        return [(start + j) % pool for j in range(n)]


class TrainCollator:
    """Tokenizes queries (instruction prefix masked out of pooling) and the flattened passages."""

    def __init__(self, tokenizer, query_max_length: int, passage_max_length: int, query_prefix: str = "",
                 mask_instruction: bool = True, passage_prefix: str = "", add_eos: bool = False) -> None:
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.query_prefix = query_prefix
        self.mask_instruction = mask_instruction
        self.passage_prefix = passage_prefix
        self.add_eos = add_eos

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        query = tokenize(self.tokenizer, [it["query"] for it in items], self.query_max_length,
                         prefix=self.query_prefix, mask_prefix=self.mask_instruction, add_eos=self.add_eos)
        passages = tokenize(self.tokenizer, [t for it in items for t in it["passages"]], self.passage_max_length,
                            prefix=self.passage_prefix, mask_prefix=False, add_eos=self.add_eos)
        width = max(len(it["positive_ids"]) for it in items)
        positive_ids = torch.full((len(items), width), PAD_ID, dtype=torch.long)
        for row, it in enumerate(items):
            positive_ids[row, : len(it["positive_ids"])] = torch.as_tensor(it["positive_ids"], dtype=torch.long)
        return {
            "query": query,
            "passages": passages,
            "passage_ids": torch.as_tensor([it["passage_ids"] for it in items], dtype=torch.long),
            "positive_ids": positive_ids,
            "negative_scores": torch.as_tensor([it["negative_scores"] for it in items], dtype=torch.float32),
            "positive_scores": torch.as_tensor([it["positive_score"] for it in items], dtype=torch.float32),
            "sampler_epoch": items[0]["epoch"],
            "sampler_position": items[0]["position"],
        }
