from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nvr.training.loss import info_nce

TAU = 0.5


def _toy() -> tuple[torch.Tensor, torch.Tensor]:
    """B=2 queries, n=1 hard negative, H=2."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[[0.8, 0.6], [0.6, 0.8]], [[0.0, 1.0], [1.0, 0.0]]])
    return q, p


def _ce(row: list[float], target: int) -> float:
    logits = np.asarray(row) / TAU
    return float(np.log(np.exp(logits).sum()) - logits[target])


def test_hand_computed_with_in_batch_negatives() -> None:
    q, p = _toy()
    # query 0 sees p00=.8, n01=.6, p10=0, n11=1; query 1 sees p00=.6, n01=.8, p10=1, n11=0.
    expected = (_ce([0.8, 0.6, 0.0, 1.0], 0) + _ce([0.6, 0.8, 1.0, 0.0], 2)) / 2
    assert info_nce(q, p, TAU).item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_without_in_batch_negatives() -> None:
    q, p = _toy()
    expected = (_ce([0.8, 0.6], 0) + _ce([1.0, 0.0], 0)) / 2
    assert info_nce(q, p, TAU, use_in_batch_negatives=False).item() == pytest.approx(expected, rel=1e-6)


def test_other_examples_copy_of_my_positive_is_masked() -> None:
    q, p = _toy()
    # example 1's hard negative (id 7) is example 0's positive document -> not a negative for query 0.
    passage_ids = torch.tensor([[7, 8], [9, 10]])
    positive_ids = torch.tensor([[7, -1], [9, 11]])
    ids_dup = torch.tensor([[7, 8], [9, 7]])
    plain = info_nce(q, p, TAU, passage_ids=passage_ids, positive_ids=positive_ids).item()
    masked = info_nce(q, p, TAU, passage_ids=ids_dup, positive_ids=positive_ids).item()
    expected_masked = (_ce([0.8, 0.6, 0.0], 0) + _ce([0.6, 0.8, 1.0, 0.0], 2)) / 2
    assert masked == pytest.approx(expected_masked, rel=1e-6)
    assert plain != pytest.approx(masked)


def test_own_positive_never_masked_even_if_listed_twice() -> None:
    q, p = _toy()
    # both examples share the same positive doc (id 5): each query keeps its own positive column and masks the other.
    passage_ids = torch.tensor([[5, 8], [5, 10]])
    positive_ids = torch.tensor([[5], [5]])
    loss = info_nce(q, p, TAU, passage_ids=passage_ids, positive_ids=positive_ids).item()
    expected = (_ce([0.8, 0.6, 1.0], 0) + _ce([0.8, 1.0, 0.0], 1)) / 2
    assert loss == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(loss)


def test_padding_slots_and_teacher_mask_are_excluded() -> None:
    q, p = _toy()
    passage_ids = torch.tensor([[1, -1], [2, 3]])
    positive_ids = torch.tensor([[1], [2]])
    loss = info_nce(q, p, TAU, passage_ids=passage_ids, positive_ids=positive_ids).item()
    assert loss == pytest.approx((_ce([0.8, 0.0, 1.0], 0) + _ce([0.6, 1.0, 0.0], 1)) / 2, rel=1e-6)
    hard_mask = torch.tensor([[False], [True]])
    loss2 = info_nce(q, p, TAU, passage_ids=torch.tensor([[1, 4], [2, 3]]), positive_ids=positive_ids,
                     hard_negative_mask=hard_mask).item()
    # the teacher mask drops example 1's negative for query 1 only; query 0 still sees it as an in-batch passage
    assert loss2 == pytest.approx((_ce([0.8, 0.6, 0.0, 1.0], 0) + _ce([0.6, 0.8, 1.0], 2)) / 2, rel=1e-6)
    loss3 = info_nce(q, p, TAU, use_in_batch_negatives=False, hard_negative_mask=hard_mask).item()
    assert loss3 == pytest.approx(_ce([0.8, 0.6], 0) / 2, rel=1e-6)


def test_remote_passages_extend_the_columns_and_are_id_masked() -> None:
    q, p = _toy()
    remote = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    ids = torch.tensor([[1, 2], [3, 4]])
    pos = torch.tensor([[1], [3]])
    loss = info_nce(q, p, TAU, passage_ids=ids, positive_ids=pos, remote_passage_emb=remote,
                    remote_passage_ids=torch.tensor([20, 3])).item()
    expected = (_ce([0.8, 0.6, 0.0, 1.0, 0.6, 1.0], 0) + _ce([0.6, 0.8, 1.0, 0.0, 0.8], 2)) / 2
    assert loss == pytest.approx(expected, rel=1e-6)
    # the gathered path with one rank's own passages as the only "remote" ones equals a bigger local batch
    q2, p2 = torch.cat([q, q]), torch.cat([p, p])
    big = info_nce(q2, p2, TAU)
    split = info_nce(q, p, TAU, remote_passage_emb=p.reshape(-1, 2))
    assert split.item() == pytest.approx(big.item(), rel=1e-6)


def test_gradients_flow_and_bad_shapes_fail() -> None:
    q, p = _toy()
    q.requires_grad_(True)
    p.requires_grad_(True)
    info_nce(q, p, 0.02).backward()
    assert q.grad is not None and p.grad is not None and torch.isfinite(p.grad).all()
    with pytest.raises(ValueError, match="passage_ids"):
        info_nce(q, p, TAU, passage_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden"):
        info_nce(q, torch.zeros(2, 2, 3), TAU)
