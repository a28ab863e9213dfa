"""KD loss (KL divergence to teacher scores over each query's own passage block) against F.kl_div row by row."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nvr.training.kd import kd_kl_div, teacher_group_scores
from nvr.training.objective import Objective


def reference_kd(student, teacher, ids, t_student, t_teacher) -> tuple[float, int]:
    """Per query with a known positive score and >= 2 known slots: F.kl_div over its known, non-padding slots."""
    losses = []
    for b in range(student.shape[0]):
        keep = [g for g in range(student.shape[1]) if not math.isnan(float(teacher[b, g])) and int(ids[b, g]) != -1]
        if 0 not in keep or len(keep) < 2:
            continue
        log_s = F.log_softmax(student[b, keep] / t_student, dim=0)
        p_t = F.softmax(teacher[b, keep] / t_teacher, dim=0)
        losses.append(float(F.kl_div(log_s, p_t, reduction="sum")))
    return (sum(losses) / len(losses) if losses else 0.0), len(losses)


@pytest.mark.parametrize("temps", [(0.05, 0.05), (0.02, 1.0), (1.0, 0.1)])
def test_kd_equals_the_reference_with_unknown_scores_and_padding(temps) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=gen) * 0.3
    teacher = torch.randn(5, 4, generator=gen)
    ids = torch.arange(20).reshape(5, 4)
    teacher[1, 2] = float("nan")  # unknown negative score: slot left out
    ids[2, 3] = -1  # padding slot
    teacher[3, 0] = float("nan")  # unknown positive score: query left out
    teacher[4, 1:] = float("nan")  # only the positive is known: query left out
    got, count = kd_kl_div(student, teacher, *temps, passage_ids=ids)
    want, want_count = reference_kd(student, teacher, ids, *temps)
    assert count == want_count == 3
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_kd_gradients_are_finite_and_zero_for_left_out_queries() -> None:
    student = torch.randn(3, 3, requires_grad=True)
    teacher = torch.tensor([[0.9, 0.5, 0.1], [float("nan"), 0.2, 0.3], [0.5, float("nan"), float("nan")]])
    loss, count = kd_kl_div(student, teacher, 0.1, 0.1)
    loss.backward()
    assert count == 1 and torch.isfinite(student.grad).all()
    assert student.grad[1:].abs().sum() == 0 and student.grad[0].abs().sum() > 0
    # matching distributions: zero loss; no teacher anywhere: an exact zero, still differentiable
    same, _ = kd_kl_div(teacher[:1] * 0.5, teacher[:1], 0.5, 1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    none, count = kd_kl_div(student, torch.full((3, 3), float("nan")), 0.1, 0.1)
    assert count == 0 and none.item() == 0.0 and none.requires_grad


def test_teacher_scores_align_with_the_c1_passage_block() -> None:
    pos = torch.tensor([0.9, 0.8])
    neg = torch.tensor([[0.5, 0.4], [0.3, 0.2]])
    torch.testing.assert_close(teacher_group_scores(pos, neg), torch.tensor([[0.9, 0.5, 0.4], [0.8, 0.3, 0.2]]))
    extra = torch.tensor([[0.85], [float("nan")]])
    block = teacher_group_scores(pos, neg, 1, extra)
    assert block[0].tolist() == pytest.approx([0.9, 0.85, 0.5, 0.4]) and math.isnan(block[1, 1])
    assert torch.isnan(teacher_group_scores(pos, neg, 2)[:, 1:3]).all()  # no extra scores given: unknown


def test_objective_kd_and_infonce_plus_kd_are_the_weighted_sums() -> None:
    from nvr.training.loss import info_nce

    gen = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    p = F.normalize(torch.randn(3, 4, 8, generator=gen), dim=-1)
    ids = torch.arange(12).reshape(3, 4)
    teacher = torch.rand(3, 4, generator=gen)
    student = torch.einsum("bh,bgh->bg", q, p)
    kd_ref, _ = reference_kd(student, teacher, ids, 0.05, 0.2)
    nce = info_nce(q, p, 0.05, passage_ids=ids, positive_ids=ids[:, :1]).item()
    kd_only = Objective(0.05, loss="kd", kd_weight=0.5, kd_teacher_temperature=0.2)
    both = Objective(0.05, loss="infonce+kd", kd_weight=0.5, kd_teacher_temperature=0.2)
    kw = dict(passage_ids=ids, positive_ids=ids[:, :1], teacher_scores=teacher)
    out = kd_only(q, p, **kw)
    assert out.loss.item() == pytest.approx(0.5 * kd_ref, rel=1e-5) and out.infonce is None
    out = both(q, p, **kw)
    assert out.loss.item() == pytest.approx(nce + 0.5 * kd_ref, rel=1e-5)
    assert out.kd.item() == pytest.approx(0.5 * kd_ref, rel=1e-5) and out.infonce.item() == pytest.approx(nce)
    # student KD temperature defaults to the InfoNCE temperature, the teacher's to the student's KD temperature
    default = Objective(0.05, loss="kd")(q, p, **kw).loss.item()
    assert default == pytest.approx(reference_kd(student, teacher, ids, 0.05, 0.05)[0], rel=1e-5)
    with pytest.raises(ValueError, match="teacher_scores"):
        both(q, p, passage_ids=ids)
