"""Random "teacher": uniformly sampled corpus documents as candidates (paper Table 1, row "random").

Each query's candidates are drawn uniformly without replacement from the whole corpus with
``rng_for(seed, "random-teacher", query_id)``, so a query's draw does not depend on the other queries, their order or
the batch. Scores are uniform random values sorted in descending order, so a row still reads as a ranking; they
carry no information. Positives get no score (``nan``): positive-aware filters (``topk_marginpos``,
``topk_percpos``) then reject everything, so mine random negatives with ``naive_topk`` (positives and their text
duplicates are still excluded by ``build_candidate_table``).

Draws are made in fixed-size chunks and de-duplicated in draw order, so the candidates at depth ``k`` are a prefix
of those at any larger depth (widening a short query only adds candidates). Above half the corpus one permutation
is cheaper than rejection sampling; prefixes then hold among depths on the same side of that line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nvr.config.mining import TeacherConfig
from nvr.data.beir import Corpus
from nvr.utils.hashing import sha256_json
from nvr.utils.seeding import rng_for

DRAW_CHUNK = 256
"""Uniform draws per round of rejection sampling (fixed, so prefixes do not depend on the depth asked for)."""
ALGORITHM = "uniform-chunked/1"


class RandomTeacher:
    """Uniform random candidates per query; see the module doc. ``seed`` is the mining seed."""

    kind = "random"
    uses_query_ids = True
    """``build_candidate_table`` passes ``query_ids`` to ``rank_corpus`` (draws are keyed by query id)."""

    def __init__(self, cfg: TeacherConfig, seed: int) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.seed = int(seed)
        self._corpus_fingerprint: str | None = None

    @property
    def settings_fingerprint(self) -> str:
        """Seed + sampling algorithm (the table cache adds the corpus and the query ids)."""
        return sha256_json({"teacher": "random", "seed": self.seed, "algorithm": ALGORITHM, "chunk": DRAW_CHUNK})

    @property
    def fingerprint(self) -> str:
        """Settings + the corpus last ranked (the draws depend on the corpus size and order)."""
        if self._corpus_fingerprint is None:
            raise RuntimeError(f"random teacher {self.name!r}: call rank_corpus first")
        return sha256_json({"settings": self.settings_fingerprint, "corpus": self._corpus_fingerprint})

    def rank_corpus(
        self,
        query_texts: Sequence[str],
        corpus: Corpus,
        k: int,
        pair_idx: np.ndarray,
        doc_order: np.ndarray | None = None,
        memory_mb: float = 1024,
        query_ids: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores[Q, k], idx[Q, k], pair_scores[Q, P])``: ``-1``/``nan`` pads past the corpus size; pair scores
        are all ``nan``. ``doc_order`` and ``memory_mb`` are unused (no search)."""
        if query_ids is None:
            raise ValueError(f"random teacher {self.name!r} needs query_ids (draws are keyed by query id)")
        if len(query_ids) != len(query_texts):
            raise ValueError(f"{len(query_ids)} query ids but {len(query_texts)} query texts")
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        self._corpus_fingerprint = corpus.fingerprint
        n = min(k, len(corpus))
        idx = np.full((len(query_ids), k), -1, dtype=np.int64)
        scores = np.full((len(query_ids), k), np.nan, dtype=np.float32)
        for row, qid in enumerate(query_ids):
            idx[row, :n] = sample_docs(self.seed, qid, len(corpus), n)
            scores[row, :n] = random_scores(self.seed, qid, n)
        pair_scores = np.full(np.shape(pair_idx), np.nan, dtype=np.float32)
        return scores, idx, pair_scores


def sample_docs(seed: int, query_id: str, num_docs: int, n: int) -> np.ndarray:
    """``n`` distinct doc rows in ``[0, num_docs)`` drawn uniformly without replacement, in draw order."""
    if not 0 <= n <= num_docs:
        raise ValueError(f"cannot draw {n} distinct documents from {num_docs}")
    rng = rng_for(seed, "random-teacher", query_id)
    if 2 * n > num_docs:
        return rng.permutation(num_docs)[:n].astype(np.int64)
    draws = np.zeros(0, dtype=np.int64)
    while True:
        draws = np.concatenate([draws, rng.integers(0, num_docs, size=DRAW_CHUNK, dtype=np.int64)])
        _, first = np.unique(draws, return_index=True)
        if first.size >= n:
            return draws[np.sort(first)[:n]]


def random_scores(seed: int, query_id: str, n: int) -> np.ndarray:
    """``n`` uniform values in ``[0, 1)`` sorted descending (a separate stream from the document draws)."""
    values = rng_for(seed, "random-teacher", query_id, "scores").random(n, dtype=np.float32)
    return np.sort(values)[::-1].copy()
