"""Choosing K negatives among the survivors of a filter (paper section 4.3.2).

All samplers return (Q, K) int64 *column positions* into the candidate table (``-1`` pads when fewer than K
survive; never filled with anything else), listed in rank order. Random choices use one generator per query,
``rng_for(seed, "sample", query_id)``, so a query's negatives do not depend on row order, batching or sharding.

Sampling is without replacement with probabilities ``softmax(score / temperature)`` over the window (footnote 13 of
the paper: not uniform). It is implemented with the Gumbel-top-k trick, which draws exactly that distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nvr.config.mining import SamplerConfig
from nvr.utils.errors import ConfigError
from nvr.utils.seeding import rng_for


def ranked_survivors(keep: np.ndarray, limit: int | None = None) -> np.ndarray:
    """(Q, M) column positions of the kept candidates in rank order, ``-1`` padded; M = ``limit`` or N."""
    keep = np.asarray(keep, dtype=bool)
    q, n = keep.shape
    m = n if limit is None else int(limit)
    order = np.argsort(~keep, axis=1, kind="stable")[:, : min(m, n)]
    out = np.where(np.take_along_axis(keep, order, axis=1), order, -1).astype(np.int64)
    if m > n:
        out = np.concatenate([out, np.full((q, m - n), -1, dtype=np.int64)], axis=1)
    return out


def needed_survivors(cfg: SamplerConfig, k: int) -> int:
    """Survivors a query's candidate list must hold for its selection to be final: K for ``topk``, the whole
    ``window`` for the samplers (sampling from a truncated window would differ from a deeper search)."""
    return k if cfg.method == "topk" else max(cfg.window, k)


def starved(keep: np.ndarray, cfg: SamplerConfig, k: int) -> np.ndarray:
    """(Q,) True where fewer than ``needed_survivors`` survive: a deeper candidate list could change the pick."""
    return np.asarray(keep, dtype=bool).sum(axis=1) < needed_survivors(cfg, k)


def gumbel_top_k(scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (into ``scores``) of k draws without replacement, p ~ softmax(scores / temperature), sorted."""
    scores = np.asarray(scores, dtype=np.float64)
    noise = rng.gumbel(size=scores.shape[0])
    if k >= scores.shape[0]:
        return np.arange(scores.shape[0])
    keys = scores / temperature + noise
    chosen = np.argsort(-keys, kind="stable")[:k]
    return np.sort(chosen)


def _sample_row(
    survivors: np.ndarray, scores: np.ndarray, k: int, cfg: SamplerConfig, rng: np.random.Generator
) -> np.ndarray:
    """One query: ``survivors`` are its first ``window`` kept positions in rank order (no padding)."""
    if cfg.method == "sampled_topk":
        picked = gumbel_top_k(scores[survivors], k, cfg.temperature, rng)
        return survivors[picked]
    head, rest = survivors[:1], survivors[1:]
    picked = gumbel_top_k(scores[rest], k - 1, cfg.temperature, rng)
    return np.concatenate([head, rest[picked]])


def select(
    keep: np.ndarray, scores: np.ndarray, cfg: SamplerConfig, k: int, seed: int, query_ids: Sequence[str]
) -> np.ndarray:
    """(Q, K) column positions of the chosen negatives (rank order, ``-1`` pads).

    - ``topk``: the first K survivors.
    - ``sampled_topk``: K of the first ``window`` survivors.
    - ``top1_sampled``: the first survivor plus K-1 of the next ``window - 1``.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != np.shape(scores) or keep.shape[0] != len(query_ids):
        raise ValueError("keep, scores and query_ids must agree on (Q, N)")
    if k <= 0:
        raise ConfigError("num_negatives", f"must be > 0, got {k}")
    if cfg.method == "topk":
        return ranked_survivors(keep, k)
    if cfg.window < k:
        raise ConfigError("sampler.window", f"{cfg.method} needs window >= num_negatives ({k}), got {cfg.window}")
    windows = ranked_survivors(keep, cfg.window)
    out = np.full((keep.shape[0], k), -1, dtype=np.int64)
    for row, qid in enumerate(query_ids):
        survivors = windows[row][windows[row] >= 0]
        if survivors.size <= k:
            out[row, : survivors.size] = survivors
            continue
        out[row] = _sample_row(survivors, scores[row], k, cfg, rng_for(seed, "sample", qid))
    return out
