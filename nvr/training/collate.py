"""Training examples for one epoch and their tokenized batches (fixed shape ``[B, 1 + E + num_negatives]``).

Every example is keyed by a :class:`~nvr.training.sampler.SampleKey`, so the per-epoch choice of positive and
negatives is a pure function of (example, epoch) and works the same inside DataLoader worker processes.
Batches are homogeneous (one dataset each, see :class:`~nvr.training.sampler.MultiDatasetBatchSampler`):
:class:`DatasetCollator` hands each batch to its dataset's :class:`TrainCollator` (its instruction, passage
prefix and in-batch-negative switch).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from nvr.mining.mined_set import MinedExample
from nvr.modeling.tokenization import tokenize
from nvr.training.loss import PAD_ID
from nvr.training.sampler import SampleKey
from nvr.utils.seeding import rng_for

NegativeOrder = Literal["rotate", "top_first", "sample"]
NEGATIVE_ORDERS = ("rotate", "top_first", "sample")
SWAPPED_FIELDS = ("negative_ids", "negative_texts", "negative_scores", "negative_teachers", "negative_ranks",
                  "extra_positive_ids", "extra_positive_texts", "extra_positive_scores")
"""What :meth:`MinedTrainDataset.swap_negatives` replaces, with every other ``extra_positive_*`` field of
:class:`MinedExample` (queries and positives stay those of the training set)."""


def doc_hash(doc_id: str) -> int:
    """Stable non-negative int64 of a document id (same on every rank and run; -1 stays free for padding)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)


def _extra(ex: MinedExample, name: str) -> list:
    """An extra-positive field of a mined example (absent on rows mined without relabelling)."""
    return list(getattr(ex, name, None) or [])


class MinedTrainDataset:
    """Mined examples with a deterministic rotation over several positives and a larger negatives pool.

    Epoch ``e`` trains example ``i`` on positive ``e mod P_i``. Which ``n = num_negatives`` of its ``K`` stored
    negatives (in mined rank order) it sees is ``negative_order``:

    * ``rotate`` (default): the ``n`` starting at ``(e * n) mod K``, cyclic, so epoch 0 uses the top-ranked ones
      and a pool larger than ``n`` is cycled through (with ``K = 4, n = 1`` the top-1 negative is seen in epochs
      0, 4, 8 only);
    * ``top_first``: the top-1 negative every epoch, the other ``n - 1`` slots rotating over negatives 2..K;
    * ``sample``: ``n`` of the ``K`` drawn without replacement per (seed, dataset, query id, epoch), kept in rank
      order.

    With ``K <= n`` every order uses all of them, and the missing slots are padding (id -1), which the loss
    masks. ``max_extra_positives = E > 0`` adds ``E`` columns after the positive holding the example's first
    ``E`` relabelled extra positives (padding where it has fewer). Whatever ``E`` (also 0, no extra columns), all
    its extra positives join ``positive_ids``, so none of them is ever scored as its negative in the batch.
    """

    def __init__(self, examples: Sequence[MinedExample], num_negatives: int, *, name: str = "default",
                 negative_order: NegativeOrder = "rotate", seed: int = 42, max_extra_positives: int = 0) -> None:
        if negative_order not in NEGATIVE_ORDERS:
            raise ValueError(f"negative_order must be one of {NEGATIVE_ORDERS}, got {negative_order!r}")
        self.examples = list(examples)
        self.num_negatives = int(num_negatives)
        self.name = name
        self.negative_order = negative_order
        self.seed = int(seed)
        self.max_extra_positives = int(max_extra_positives)
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
        extra_ids, extra_texts = _extra(ex, "extra_positive_ids"), _extra(ex, "extra_positive_texts")
        extra_scores = _extra(ex, "extra_positive_scores")
        extras = list(range(min(self.max_extra_positives, len(extra_ids))))
        extras += [-1] * (self.max_extra_positives - len(extras))
        item = {
            "query": ex.query,
            "passages": [ex.positive_texts[p], *(extra_texts[j] if j >= 0 else "" for j in extras),
                         *(ex.negative_texts[j] if j >= 0 else "" for j in negatives)],
            "passage_ids": [doc_hash(ex.positive_ids[p]),
                            *(doc_hash(extra_ids[j]) if j >= 0 else PAD_ID for j in extras),
                            *(doc_hash(ex.negative_ids[j]) if j >= 0 else PAD_ID for j in negatives)],
            "positive_ids": [*self._positive_hashes[index].tolist(), *(doc_hash(d) for d in extra_ids)],
            "negative_scores": [ex.negative_scores[j] if j >= 0 else float("nan") for j in negatives],
            "positive_score": float("nan") if pos_score is None else float(pos_score),
            "dataset": self.name,
            "epoch": epoch,
            "position": key.position,
        }
        if self.max_extra_positives:
            item["extra_positive_scores"] = [
                float(extra_scores[j]) if j >= 0 and j < len(extra_scores) and extra_scores[j] is not None
                else float("nan") for j in extras]
        return item

    def _negative_slots(self, ex: MinedExample, epoch: int) -> list[int]:
        """Positions into the stored negatives (-1 = padding slot), by ``negative_order``."""
        pool, n = len(ex.negative_ids), self.num_negatives
        if n == 0:
            return []
        if pool <= n:
            return list(range(pool)) + [-1] * (n - pool)
        if self.negative_order == "top_first":
            rest, start = pool - 1, (epoch * (n - 1)) % (pool - 1)
            return [0, *(1 + (start + j) % rest for j in range(n - 1))]
        if self.negative_order == "sample":
            rng = rng_for(self.seed, "negative-order", self.name, ex.query_id, epoch)
            return sorted(int(j) for j in rng.choice(pool, size=n, replace=False))
        start = (epoch * n) % pool
        return [(start + j) % pool for j in range(n)]

    def swap_negatives(self, replacement: Mapping[str, MinedExample]) -> list[str]:
        """Take the hard negatives (and extra positives) of every example from ``replacement`` (by query id);
        queries and positives stay. Returns the query ids missing from it (nothing is changed then)."""
        missing = [ex.query_id for ex in self.examples if ex.query_id not in replacement]
        if missing:
            return missing
        names = {f.name for f in dataclasses.fields(MinedExample)}
        keys = list(dict.fromkeys([*SWAPPED_FIELDS, *sorted(n for n in names if n.startswith("extra_positive"))]))
        swapped = []
        for ex in self.examples:
            new = replacement[ex.query_id]
            values = {k: list(getattr(new, k, None) or []) for k in keys}
            updated = dataclasses.replace(ex, **{k: v for k, v in values.items() if k in names})
            for k, v in values.items():  # extra-positive fields of a MinedExample that does not declare them yet
                if k not in names:
                    setattr(updated, k, v)
            swapped.append(updated)
        self.examples = swapped
        return []


class ConcatTrainDataset:
    """Several :class:`MinedTrainDataset` back to back; the sampler's indices are into the concatenation."""

    def __init__(self, parts: Sequence[MinedTrainDataset]) -> None:
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def examples(self) -> list[MinedExample]:
        """Every part's examples in index order (the single-dataset form: that dataset's examples)."""
        return [ex for part in self.parts for ex in part.examples]

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        part = bisect.bisect_right(self.offsets, key.index) - 1
        if not 0 <= part < len(self.parts):
            raise IndexError(f"sample index {key.index} outside 0..{len(self) - 1}")
        return self.parts[part][SampleKey(key.epoch, key.position, key.index - self.offsets[part])]


class TrainCollator:
    """Tokenizes queries (instruction prefix masked out of pooling) and the flattened passages.

    The batch carries ``dataset`` (its dataset's name), ``use_in_batch_negatives`` when this dataset overrides
    the module's setting, and ``num_extra_positives`` / ``extra_positive_scores`` when extra-positive columns are
    collated (the batch-dict contract consumed by ``BiEncoderModule``).
    """

    def __init__(self, tokenizer, query_max_length: int, passage_max_length: int, query_prefix: str = "",
                 mask_instruction: bool = True, passage_prefix: str = "", add_eos: bool = False,
                 use_in_batch_negatives: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.query_prefix = query_prefix
        self.mask_instruction = mask_instruction
        self.passage_prefix = passage_prefix
        self.add_eos = add_eos
        self.use_in_batch_negatives = use_in_batch_negatives

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        names = {it.get("dataset", "default") for it in items}
        if len(names) != 1:
            raise ValueError(f"a training batch mixes datasets {sorted(names)}; batches must be homogeneous")
        query = tokenize(self.tokenizer, [it["query"] for it in items], self.query_max_length,
                         prefix=self.query_prefix, mask_prefix=self.mask_instruction, add_eos=self.add_eos)
        passages = tokenize(self.tokenizer, [t for it in items for t in it["passages"]], self.passage_max_length,
                            prefix=self.passage_prefix, mask_prefix=False, add_eos=self.add_eos)
        width = max(len(it["positive_ids"]) for it in items)
        positive_ids = torch.full((len(items), width), PAD_ID, dtype=torch.long)
        for row, it in enumerate(items):
            positive_ids[row, : len(it["positive_ids"])] = torch.as_tensor(it["positive_ids"], dtype=torch.long)
        batch = {
            "query": query,
            "passages": passages,
            "passage_ids": torch.as_tensor([it["passage_ids"] for it in items], dtype=torch.long),
            "positive_ids": positive_ids,
            "negative_scores": torch.as_tensor([it["negative_scores"] for it in items], dtype=torch.float32),
            "positive_scores": torch.as_tensor([it["positive_score"] for it in items], dtype=torch.float32),
            "dataset": names.pop(),
            "sampler_epoch": items[0]["epoch"],
            "sampler_position": items[0]["position"],
        }
        if self.use_in_batch_negatives is not None:
            batch["use_in_batch_negatives"] = bool(self.use_in_batch_negatives)
        if "extra_positive_scores" in items[0]:
            scores = torch.as_tensor([it["extra_positive_scores"] for it in items], dtype=torch.float32)
            batch["num_extra_positives"] = int(scores.shape[1])
            batch["extra_positive_scores"] = scores
        return batch


class DatasetCollator:
    """Routes each homogeneous batch to the :class:`TrainCollator` of its dataset."""

    def __init__(self, collators: Mapping[str, TrainCollator]) -> None:
        self.collators = dict(collators)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        name = items[0].get("dataset", "default")
        if name not in self.collators:
            raise KeyError(f"no collator for dataset {name!r} (known: {sorted(self.collators)})")
        return self.collators[name](items)
