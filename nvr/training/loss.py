"""InfoNCE over [own positive | own hard negatives | every other passage in the batch (+ other ranks)].

Each query's row scores all passages it may see; the target is its own positive. Passages that are really
positives of the query (same hashed doc id as one of its positives) are masked out instead of being treated as
negatives, and so are padding slots (id ``-1``) and hard negatives flagged by the teacher-based false-negative
mask. The loss averages over *local* queries only, so DDP/FSDP gradient averaging stays correct (no
``loss * world_size`` trick).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD_ID = -1
"""Passage id of a padding slot (an example with fewer stored negatives than the batch shape needs)."""


def info_nce(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    temperature: float,
    *,
    use_in_batch_negatives: bool = True,
    passage_ids: torch.Tensor | None = None,
    positive_ids: torch.Tensor | None = None,
    remote_passage_emb: torch.Tensor | None = None,
    remote_passage_ids: torch.Tensor | None = None,
    hard_negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive loss with the positive first in each example's passage block.

    Args:
        query_emb: ``[B, H]`` query embeddings.
        passage_emb: ``[B, 1+n, H]``; column 0 is the example's positive, then its ``n`` hard negatives.
        temperature: logits are ``q·p / temperature``.
        use_in_batch_negatives: also score every other example's passages (and the remote ones).
        passage_ids: ``[B, 1+n]`` int64 hashed doc ids (``-1`` = padding slot, always masked).
        positive_ids: ``[B, P]`` int64 ids of *all* positives of each query (``-1`` padded); any non-target
            passage carrying one of them is masked (a duplicate of the positive is not a negative).
        remote_passage_emb: ``[R, H]`` passages gathered from other ranks (only used with in-batch negatives).
        remote_passage_ids: ``[R]`` their ids.
        hard_negative_mask: ``[B, n]`` bool, True = drop this hard negative (teacher says likely false negative).

    Returns:
        Scalar mean cross-entropy over the ``B`` local queries (computed in float32).
    """
    _check_shapes(query_emb, passage_emb, passage_ids, positive_ids, remote_passage_emb, remote_passage_ids,
                  hard_negative_mask)
    batch, group, _ = passage_emb.shape
    q = query_emb.float()
    if use_in_batch_negatives:
        candidates = passage_emb.reshape(batch * group, -1).float()
        cand_ids = passage_ids.reshape(-1) if passage_ids is not None else None
        if remote_passage_emb is not None:
            candidates = torch.cat([candidates, remote_passage_emb.float()], dim=0)
            if cand_ids is not None:
                cand_ids = torch.cat([cand_ids, remote_passage_ids.reshape(-1)], dim=0)
        logits = q @ candidates.T / temperature  # [B, B*(1+n)+R]
        targets = torch.arange(batch, device=q.device) * group
    else:
        logits = torch.einsum("bh,bgh->bg", q, passage_emb.float()) / temperature  # [B, 1+n]
        cand_ids = passage_ids
        targets = torch.zeros(batch, dtype=torch.long, device=q.device)

    masked = torch.zeros_like(logits, dtype=torch.bool)
    if cand_ids is not None:
        ids = cand_ids if cand_ids.dim() == 2 else cand_ids.unsqueeze(0).expand(batch, -1)
        masked |= ids == PAD_ID
        if positive_ids is not None:
            masked |= _is_positive_of_row(ids, positive_ids)
    if hard_negative_mask is not None:
        neg_cols = _own_negative_columns(batch, group, use_in_batch_negatives, q.device)
        masked.scatter_(1, neg_cols, masked.gather(1, neg_cols) | hard_negative_mask.bool())
    masked[torch.arange(batch, device=q.device), targets] = False  # never mask the query's own positive
    logits = logits.masked_fill(masked, float("-inf"))
    return F.cross_entropy(logits, targets)


def _is_positive_of_row(ids: torch.Tensor, positive_ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` bool: candidate column c carries one of row b's positive ids (padding ids never match)."""
    valid = positive_ids != PAD_ID  # [B, P]
    hits = (ids.unsqueeze(2) == positive_ids.unsqueeze(1)) & valid.unsqueeze(1)  # [B, C, P]
    return hits.any(dim=2)


def _own_negative_columns(batch: int, group: int, in_batch: bool, device: torch.device) -> torch.Tensor:
    """``[B, n]`` logit columns of each query's own hard negatives."""
    offsets = torch.arange(1, group, device=device).unsqueeze(0).expand(batch, -1)
    if not in_batch:
        return offsets
    return offsets + (torch.arange(batch, device=device) * group).unsqueeze(1)


def _check_shapes(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    passage_ids: torch.Tensor | None,
    positive_ids: torch.Tensor | None,
    remote_emb: torch.Tensor | None,
    remote_ids: torch.Tensor | None,
    hard_negative_mask: torch.Tensor | None,
) -> None:
    """Shape errors here are programming errors; fail loudly with the shapes rather than broadcast silently."""
    if query_emb.dim() != 2 or passage_emb.dim() != 3 or passage_emb.shape[0] != query_emb.shape[0]:
        raise ValueError(f"expected query [B,H] and passages [B,1+n,H], got {tuple(query_emb.shape)} "
                         f"and {tuple(passage_emb.shape)}")
    if passage_emb.shape[2] != query_emb.shape[1]:
        raise ValueError(f"hidden sizes differ: {query_emb.shape[1]} vs {passage_emb.shape[2]}")
    if passage_ids is not None and tuple(passage_ids.shape) != tuple(passage_emb.shape[:2]):
        raise ValueError(f"passage_ids must be {tuple(passage_emb.shape[:2])}, got {tuple(passage_ids.shape)}")
    if positive_ids is not None and (passage_ids is None or positive_ids.shape[0] != query_emb.shape[0]):
        raise ValueError("positive_ids needs passage_ids and one row per query")
    if remote_emb is None and remote_ids is not None:
        raise ValueError("remote_passage_ids given without remote_passage_emb")
    if remote_emb is not None and passage_ids is not None and remote_ids is None:
        raise ValueError("remote_passage_emb needs remote_passage_ids when passage_ids are given")
    if remote_emb is not None and remote_ids is not None and remote_ids.numel() != remote_emb.shape[0]:
        raise ValueError(f"remote ids ({remote_ids.numel()}) and embeddings ({remote_emb.shape[0]}) differ")
    if hard_negative_mask is not None and tuple(hard_negative_mask.shape) != (
        passage_emb.shape[0], passage_emb.shape[1] - 1
    ):
        raise ValueError(f"hard_negative_mask must be [B, n], got {tuple(hard_negative_mask.shape)}")
