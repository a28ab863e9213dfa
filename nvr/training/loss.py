"""InfoNCE over [own positive(s) | own hard negatives | every other passage in the batch (+ other ranks)].

Each query's row scores all passages it may see; the target is its own positive. Passages that are really
positives of the query (same hashed doc id as one of its positives, extra positives included) are masked out
instead of being treated as negatives, and so are padding slots (id ``-1``), hard negatives flagged by the
teacher-based false-negative mask and, with ``self_mask_margin`` (Qwen3-Embedding), every negative candidate whose
score from the model being trained exceeds the query's positive score by more than the margin. The loss averages
over *local* queries only, so DDP/FSDP gradient averaging stays correct (no ``loss * world_size`` trick).

Passage block per example (contract C1): ``[positive | E extra-positive slots | n hard negatives]``, ``G = 1+E+n``;
an extra-positive slot with id ``-1`` is an absent positive. Multi-positive InfoNCE (``multi_positive``):

* ``each`` (default): every positive is its own target, with the query's other positives masked; the query's loss
  is the mean of these cross-entropies over its positives (a query counts once, however many positives it has).
* ``logsumexp``: ``-log(sum_pos exp(s) / sum_all exp(s))``: the probability mass on the positive *set*; the model
  may put it on any of them.

With ``E = 0`` both are exactly the standard single-positive InfoNCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PAD_ID = -1
"""Passage id of a padding slot (an example with fewer stored negatives than the batch shape needs)."""

MultiPositive = Literal["each", "logsumexp"]
MULTI_POSITIVE_MODES = ("each", "logsumexp")


@dataclass
class ContrastiveOutput:
    """The loss and two cheap diagnostics read off the same score matrix (no extra forward, no gradient).

    ``accuracy``: share of queries whose highest-scoring unmasked candidate is one of their own positives.
    ``margin``: mean over queries of (positive score - hardest negative score) in raw similarity units (before
    the temperature), over the negatives the loss actually uses (hard + in-batch, masked ones excluded); NaN when
    no query has a negative.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


def info_nce(query_emb: torch.Tensor, passage_emb: torch.Tensor, temperature: float, **kwargs) -> torch.Tensor:
    """:func:`contrastive_loss`'s scalar loss (same arguments)."""
    return contrastive_loss(query_emb, passage_emb, temperature, **kwargs).loss


def contrastive_loss(
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
    num_extra_positives: int = 0,
    multi_positive: MultiPositive = "each",
    self_mask_margin: float | None = None,
) -> ContrastiveOutput:
    """Contrastive loss with the positive first in each example's passage block.

    Args:
        query_emb: ``[B, H]`` query embeddings.
        passage_emb: ``[B, 1+E+n, H]``: the example's positive, ``E`` extra-positive slots, ``n`` hard negatives.
        temperature: logits are ``q·p / temperature``.
        use_in_batch_negatives: also score every other example's passages (and the remote ones).
        passage_ids: ``[B, 1+E+n]`` int64 hashed doc ids (``-1`` = padding slot, always masked). Needed when E > 0.
        positive_ids: ``[B, P]`` int64 ids of *all* positives of each query (``-1`` padded); any non-target
            passage carrying one of them (or one of the query's extra positives) is masked.
        remote_passage_emb: ``[R, H]`` passages gathered from other ranks (only used with in-batch negatives).
        remote_passage_ids: ``[R]`` their ids.
        hard_negative_mask: ``[B, n]`` bool, True = drop this hard negative (teacher says likely false negative).
        num_extra_positives: ``E``.
        multi_positive: ``each`` | ``logsumexp`` (module docstring).
        self_mask_margin: drop negative candidates scoring above ``positive score + margin`` (raw similarity).

    Returns:
        :class:`ContrastiveOutput`; ``loss`` is the mean over the ``B`` local queries (computed in float32).
    """
    _check_shapes(query_emb, passage_emb, passage_ids, positive_ids, remote_passage_emb, remote_passage_ids,
                  hard_negative_mask, num_extra_positives)
    if multi_positive not in MULTI_POSITIVE_MODES:
        raise ValueError(f"multi_positive must be one of {MULTI_POSITIVE_MODES}, got {multi_positive!r}")
    batch, group, _ = passage_emb.shape
    extra = int(num_extra_positives)
    q = query_emb.float()
    device = q.device
    if use_in_batch_negatives:
        candidates = passage_emb.reshape(batch * group, -1).float()
        cand_ids = passage_ids.reshape(-1) if passage_ids is not None else None
        if remote_passage_emb is not None:
            candidates = torch.cat([candidates, remote_passage_emb.float()], dim=0)
            if cand_ids is not None:
                cand_ids = torch.cat([cand_ids, remote_passage_ids.reshape(-1)], dim=0)
        scores = q @ candidates.T  # [B, B*G+R]
        own_start = torch.arange(batch, device=device) * group
    else:
        scores = torch.einsum("bh,bgh->bg", q, passage_emb.float())  # [B, G]
        cand_ids = passage_ids
        own_start = torch.zeros(batch, dtype=torch.long, device=device)

    pos_cols = own_start.unsqueeze(1) + torch.arange(1 + extra, device=device)  # [B, 1+E]
    pos_valid = torch.ones(batch, 1 + extra, dtype=torch.bool, device=device)
    if extra:
        pos_valid[:, 1:] = passage_ids[:, 1 : 1 + extra] != PAD_ID
    is_pos = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, pos_cols, pos_valid)

    masked = torch.zeros_like(scores, dtype=torch.bool)
    if cand_ids is not None:
        ids = cand_ids if cand_ids.dim() == 2 else cand_ids.unsqueeze(0).expand(batch, -1)
        masked |= ids == PAD_ID
        row_positives = positive_ids if positive_ids is not None else passage_ids[:, :1]
        if extra:
            row_positives = torch.cat([row_positives, passage_ids[:, 1 : 1 + extra]], dim=1)
        masked |= _is_positive_of_row(ids, row_positives)
    if hard_negative_mask is not None:
        neg_cols = own_start.unsqueeze(1) + torch.arange(1 + extra, group, device=device)
        masked.scatter_(1, neg_cols, masked.gather(1, neg_cols) | hard_negative_mask.bool())
    masked &= ~is_pos  # a query's own (real) positives are never masked
    raw = scores.detach()
    anchor = raw.gather(1, own_start.unsqueeze(1))  # [B, 1] the query's (primary) positive score
    if self_mask_margin is not None:
        masked |= ~is_pos & (raw > anchor + self_mask_margin)

    logits = scores / temperature
    negatives = ~(masked | is_pos)
    if extra == 0:  # one positive: both modes are the plain cross-entropy
        loss = F.cross_entropy(logits.masked_fill(masked, float("-inf")), own_start)
    elif multi_positive == "each":
        # a finite stand-in for absent positives keeps every log-sum-exp finite (their weight is zero)
        pos_logits = logits.gather(1, pos_cols).masked_fill(~pos_valid, 0.0)  # [B, 1+E]
        neg_logits = logits.masked_fill(~negatives, float("-inf"))  # [B, C]
        rows = torch.cat([pos_logits.unsqueeze(2), neg_logits.unsqueeze(1).expand(-1, 1 + extra, -1)], dim=2)
        per_positive = torch.logsumexp(rows, dim=2) - pos_logits  # [B, 1+E]
        weights = pos_valid.float()
        loss = ((per_positive * weights).sum(1) / weights.sum(1)).mean()
    else:
        everything = torch.logsumexp(logits.masked_fill(masked, float("-inf")), dim=1)
        positives = torch.logsumexp(logits.gather(1, pos_cols).masked_fill(~pos_valid, float("-inf")), dim=1)
        loss = (everything - positives).mean()
    return ContrastiveOutput(loss, *_diagnostics(raw, anchor.squeeze(1), is_pos, negatives))


def _diagnostics(raw: torch.Tensor, anchor: torch.Tensor, is_pos: torch.Tensor,
                 negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(in-batch accuracy, mean positive-vs-hardest-negative margin) of one score matrix, without gradient."""
    seen = raw.masked_fill(~(negatives | is_pos), float("-inf"))
    accuracy = is_pos.gather(1, seen.argmax(dim=1, keepdim=True)).float().mean()
    hardest = raw.masked_fill(~negatives, float("-inf")).max(dim=1).values
    has_negative = negatives.any(dim=1)
    margin = (anchor - hardest)[has_negative].mean() if has_negative.any() else raw.new_tensor(float("nan"))
    return accuracy, margin


def _is_positive_of_row(ids: torch.Tensor, positive_ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` bool: candidate column c carries one of row b's positive ids (padding ids never match)."""
    valid = positive_ids != PAD_ID  # [B, P]
    hits = (ids.unsqueeze(2) == positive_ids.unsqueeze(1)) & valid.unsqueeze(1)  # [B, C, P]
    return hits.any(dim=2)


def _check_shapes(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    passage_ids: torch.Tensor | None,
    positive_ids: torch.Tensor | None,
    remote_emb: torch.Tensor | None,
    remote_ids: torch.Tensor | None,
    hard_negative_mask: torch.Tensor | None,
    extra: int = 0,
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
    if extra < 0 or 1 + extra > passage_emb.shape[1]:
        raise ValueError(f"num_extra_positives {extra} does not fit a passage block of {passage_emb.shape[1]}")
    if extra and passage_ids is None:
        raise ValueError("num_extra_positives needs passage_ids (absent extra positives are padding ids)")
    if remote_emb is None and remote_ids is not None:
        raise ValueError("remote_passage_ids given without remote_passage_emb")
    if remote_emb is not None and passage_ids is not None and remote_ids is None:
        raise ValueError("remote_passage_emb needs remote_passage_ids when passage_ids are given")
    if remote_emb is not None and remote_ids is not None and remote_ids.numel() != remote_emb.shape[0]:
        raise ValueError(f"remote ids ({remote_ids.numel()}) and embeddings ({remote_emb.shape[0]}) differ")
    if hard_negative_mask is not None and tuple(hard_negative_mask.shape) != (
        passage_emb.shape[0], passage_emb.shape[1] - 1 - extra
    ):
        raise ValueError(f"hard_negative_mask must be [B, n], got {tuple(hard_negative_mask.shape)}")
