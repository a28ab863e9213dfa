"""Knowledge distillation from the mined set's teacher scores (FlagEmbedding ``kd_loss_type kl_div``,
sentence-transformers ``DistillKLDivLoss``).

Per query, over its own passage block ``[positive | extra positives | hard negatives]`` (no in-batch passages: the
teacher never scored them): ``KL(p_teacher || p_student)`` with ``p_teacher = softmax(teacher / teacher_T)`` and
``p_student = softmax(q·p / T)``, averaged over the queries that have a teacher distribution.

Missing teacher scores are *masked*, not errors: a slot whose teacher score is NaN (unknown, e.g. a negative that
only BM25 found in an ensemble without its score) or that is padding leaves both distributions; a query whose
positive score is unknown, or with fewer than two scored slots, is left out of the average. When no query of a batch
has a teacher distribution the term is an exact zero (``BiEncoderModule`` turns that into a one-line error under
``loss: kd`` alone, where the batch would teach nothing). No ``T**2`` factor: ``kd_weight`` scales the term.
Negatives that InfoNCE drops (teacher ``false_negative_perc`` mask, self-guided masking) stay in the KD softmax:
there the teacher's high score is exactly the soft label distillation should learn.
"""

from __future__ import annotations

import torch

from nvr.training.loss import PAD_ID


def teacher_group_scores(positive_scores: torch.Tensor, negative_scores: torch.Tensor, num_extra_positives: int = 0,
                         extra_positive_scores: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, 1+E+n]`` teacher scores aligned with the passage block (NaN where unknown)."""
    pos = positive_scores.float().reshape(-1, 1)
    parts = [pos]
    if num_extra_positives:
        if extra_positive_scores is None:
            extra = pos.new_full((pos.shape[0], num_extra_positives), float("nan"))
        else:
            extra = extra_positive_scores.float().reshape(pos.shape[0], num_extra_positives)
        parts.append(extra)
    parts.append(negative_scores.float().reshape(pos.shape[0], -1))
    return torch.cat(parts, dim=1)


def kd_kl_div(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float,
              teacher_temperature: float, passage_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(mean KL over the queries with a teacher distribution, how many there are).

    Args:
        student_scores: ``[B, G]`` raw similarities of each query with its own passage block.
        teacher_scores: ``[B, G]`` teacher scores (NaN = unknown).
        temperature: student temperature (``model.kd_temperature``).
        teacher_temperature: teacher temperature (``model.kd_teacher_temperature``).
        passage_ids: ``[B, G]`` (``-1`` = padding slot, left out).
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"student {tuple(student_scores.shape)} and teacher {tuple(teacher_scores.shape)} differ")
    teacher = teacher_scores.to(student_scores.device).float()
    known = torch.isfinite(teacher)
    if passage_ids is not None:
        known &= passage_ids.to(known.device) != PAD_ID
    rows = known[:, 0] & (known.sum(dim=1) >= 2)
    # rows without a distribution get finite all-zero logits, so no NaN reaches the gradient through them
    usable = known & rows.unsqueeze(1)
    student = torch.where(usable, student_scores.float() / temperature, float("-inf"))
    student = torch.where(rows.unsqueeze(1), student, 0.0)
    target = torch.where(usable, teacher.nan_to_num(0.0) / teacher_temperature, float("-inf"))
    target = torch.where(rows.unsqueeze(1), target, 0.0)
    log_student = torch.log_softmax(student, dim=1)
    log_teacher = torch.log_softmax(target, dim=1)
    terms = torch.where(usable, log_teacher.exp() * (log_teacher - log_student), 0.0)
    count = int(rows.sum())
    if count == 0:
        return terms.sum() * 0.0, 0
    return terms.sum(dim=1)[rows].mean(), count
