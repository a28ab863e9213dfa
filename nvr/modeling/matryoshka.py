"""Matryoshka representation learning (sentence-transformers ``MatryoshkaLoss``): the training loss is summed over
truncated embeddings ``emb[..., :d]`` for each ``d`` of ``model.matryoshka_dims`` (weights ``matryoshka_weights``,
default 1 each), so the leading dims alone already make a good embedding and ``nvr eval --truncate_dim d`` /
``SentenceTransformer(..., truncate_dim=d)`` can serve them. A model that L2-normalizes its embeddings gets the
truncated ones re-normalized (cosine similarity at every size), as at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def truncate(embeddings: torch.Tensor, dim: int | None, normalize: bool) -> torch.Tensor:
    """The first ``dim`` components of every row (``None`` or the full size: unchanged), re-normalized if asked."""
    if dim is None or dim >= embeddings.shape[-1]:
        return embeddings
    cut = embeddings[..., :dim]
    return F.normalize(cut, p=2, dim=-1) if normalize else cut


def truncate_numpy(embeddings, dim: int, normalize: bool):
    """:func:`truncate` for ``[N, H]`` numpy arrays (``nvr eval --truncate_dim``), float32 out."""
    import numpy as np

    cut = np.asarray(embeddings, dtype=np.float32)[:, :dim]
    if normalize:
        norms = np.linalg.norm(cut, axis=1, keepdims=True)
        cut = cut / np.maximum(norms, 1e-12)  # F.normalize's eps
    return np.ascontiguousarray(cut, dtype=np.float32)


def dims_and_weights(dims: Sequence[int] | None, weights: Sequence[float] | None) -> list[tuple[int | None, float]]:
    """``[(dim, weight), ...]`` to sum over; ``[(None, 1.0)]`` (the full embedding once) when Matryoshka is off."""
    if not dims:
        return [(None, 1.0)]
    weights = list(weights) if weights is not None else [1.0] * len(dims)
    return [(int(d), float(w)) for d, w in zip(dims, weights, strict=True)]
