"""The training objective of :class:`~nvr.training.module.BiEncoderModule`, as one function of the embeddings.

``loss = sum over Matryoshka dims d of w_d * ([InfoNCE_d] + kd_weight * [KD_d])`` where ``model.loss`` picks the
terms (``infonce`` | ``kd`` | ``infonce+kd``). Because it only sees embeddings, the plain path (one graph) and the
cached path (:mod:`nvr.training.cached`, embeddings as leaves) compute exactly the same loss and gradients, and
other ranks' passages enter only through ``remote_passage_emb`` (cross-device negatives under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from nvr.modeling.matryoshka import dims_and_weights, truncate
from nvr.training.kd import kd_kl_div
from nvr.training.loss import MultiPositive, contrastive_loss

LossKind = Literal["infonce", "kd", "infonce+kd"]
LOSS_KINDS = ("infonce", "kd", "infonce+kd")


@dataclass
class ObjectiveOutput:
    """``loss`` (what is back-propagated), its parts (summed over Matryoshka dims; None when off), how many queries
    had a teacher distribution, and the diagnostics of the largest embedding size (no gradient)."""

    loss: torch.Tensor
    infonce: torch.Tensor | None
    kd: torch.Tensor | None
    kd_queries: int
    accuracy: torch.Tensor
    margin: torch.Tensor


@dataclass(frozen=True)
class Objective:
    """Settings of the objective (``model.*`` keys of the same names; validated by the module)."""

    temperature: float
    loss: LossKind = "infonce"
    kd_weight: float = 1.0
    kd_temperature: float | None = None
    kd_teacher_temperature: float | None = None
    multi_positive: MultiPositive = "each"
    self_mask_margin: float | None = None
    matryoshka_dims: tuple[int, ...] | None = None
    matryoshka_weights: tuple[float, ...] | None = None
    normalize: bool = True

    @property
    def uses_infonce(self) -> bool:
        return self.loss in ("infonce", "infonce+kd")

    @property
    def uses_kd(self) -> bool:
        return self.loss in ("kd", "infonce+kd")

    @property
    def student_kd_temperature(self) -> float:
        return self.kd_temperature if self.kd_temperature is not None else self.temperature

    @property
    def teacher_kd_temperature(self) -> float:
        return self.kd_teacher_temperature if self.kd_teacher_temperature is not None else self.student_kd_temperature

    def __call__(
        self,
        query_emb: torch.Tensor,
        passage_emb: torch.Tensor,
        *,
        use_in_batch_negatives: bool = True,
        passage_ids: torch.Tensor | None = None,
        positive_ids: torch.Tensor | None = None,
        remote_passage_emb: torch.Tensor | None = None,
        remote_passage_ids: torch.Tensor | None = None,
        hard_negative_mask: torch.Tensor | None = None,
        num_extra_positives: int = 0,
        teacher_scores: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Args as :func:`~nvr.training.loss.contrastive_loss`; ``teacher_scores`` ``[B, 1+E+n]`` (NaN = unknown,
        see :func:`~nvr.training.kd.teacher_group_scores`) is required when the loss has a KD term."""
        if self.uses_kd and teacher_scores is None:
            raise ValueError(f"loss {self.loss!r} needs teacher_scores")
        schedule = dims_and_weights(self.matryoshka_dims, self.matryoshka_weights)
        largest = max(range(len(schedule)), key=lambda i: float("inf") if schedule[i][0] is None else schedule[i][0])
        total = infonce_sum = kd_sum = None
        kd_queries = 0
        accuracy = margin = None
        for index, (dim, weight) in enumerate(schedule):
            q = truncate(query_emb.float(), dim, self.normalize)
            p = truncate(passage_emb.float(), dim, self.normalize)
            remote = truncate(remote_passage_emb.float(), dim, self.normalize) if remote_passage_emb is not None \
                else None
            term = None
            if self.uses_infonce or index == largest:
                out = contrastive_loss(
                    q, p, self.temperature, use_in_batch_negatives=use_in_batch_negatives, passage_ids=passage_ids,
                    positive_ids=positive_ids, remote_passage_emb=remote, remote_passage_ids=remote_passage_ids,
                    hard_negative_mask=hard_negative_mask, num_extra_positives=num_extra_positives,
                    multi_positive=self.multi_positive, self_mask_margin=self.self_mask_margin,
                )
                if index == largest:
                    accuracy, margin = out.accuracy, out.margin
                if self.uses_infonce:
                    term = weight * out.loss
                    infonce_sum = term if infonce_sum is None else infonce_sum + term
            if self.uses_kd:
                student = torch.einsum("bh,bgh->bg", q, p)
                kd, kd_queries = kd_kl_div(student, teacher_scores, self.student_kd_temperature,
                                           self.teacher_kd_temperature, passage_ids)
                kd_term = weight * self.kd_weight * kd
                kd_sum = kd_term if kd_sum is None else kd_sum + kd_term
                term = kd_term if term is None else term + kd_term
            total = term if total is None else total + term
        return ObjectiveOutput(total, infonce_sum, kd_sum, kd_queries, accuracy, margin)
