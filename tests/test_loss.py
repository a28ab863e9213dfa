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


# --------------------------------------------------------------- multi-positive, self-mask, diagnostics (C1 layout)
def reference_loss(q, p, ids, pos_ids, extra, mode, *, in_batch=True, margin=None, hard_mask=None, remote=None,
                   remote_ids=None, tau=TAU):
    """Plain-loop reference: every candidate of every query classified as target / masked / negative."""
    batch, group, _ = p.shape
    cands = [(b, g, p[b, g], int(ids[b, g])) for b in range(batch) for g in range(group)]
    if remote is not None:
        cands += [(-1, -1, remote[r], int(remote_ids[r])) for r in range(remote.shape[0])]
    total, correct, margins = 0.0, 0, []
    for a in range(batch):
        mine = {int(x) for x in pos_ids[a] if int(x) != -1} | {int(ids[a, k]) for k in range(1, 1 + extra)
                                                              if int(ids[a, k]) != -1}
        targets, negatives = [], []
        anchor = float(q[a] @ p[a, 0])
        for b, g, vec, did in cands:
            if not in_batch and b != a:
                continue
            score = float(q[a] @ vec)
            if b == a and g <= extra:
                if did != -1:
                    targets.append(score)
                continue
            if did == -1 or did in mine:
                continue
            if b == a and hard_mask is not None and bool(hard_mask[a, g - 1 - extra]):
                continue
            if margin is not None and score > anchor + margin:
                continue
            negatives.append(score)
        exp_neg = sum(math.exp(s / tau) for s in negatives)
        if mode == "each":
            total += sum(-math.log(math.exp(t / tau) / (math.exp(t / tau) + exp_neg)) for t in targets) / len(targets)
        else:
            exp_pos = sum(math.exp(t / tau) for t in targets)
            total += -math.log(exp_pos / (exp_pos + exp_neg))
        correct += max(targets) > max(negatives, default=-math.inf)
        if negatives:
            margins.append(anchor - max(negatives))
    return total / batch, correct / batch, (sum(margins) / len(margins) if margins else math.nan)


def _random_c1(seed: int, batch: int = 4, extra: int = 2, n: int = 3, dim: int = 6):
    """Random normalized embeddings, absent extra positives, padded negatives and cross-example duplicates."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(batch, 1 + extra + n, dim, generator=gen), dim=-1)
    ids = torch.arange(batch * (1 + extra + n)).reshape(batch, -1) + 100
    ids[0, 2] = -1  # example 0 has one extra positive only
    ids[1, 1:1 + extra] = -1  # example 1 has none
    ids[2, -1] = -1  # a padded hard negative
    ids[3, -2] = int(ids[0, 1])  # example 3's negative is example 0's extra positive (masked for query 0 only)
    ids[2, -2] = int(ids[1, 0])  # example 2's negative is example 1's positive
    pos_ids = torch.cat([ids[:, :1], torch.full((batch, 1), -1)], dim=1)
    pos_ids[3, 1] = int(ids[1, -1])  # query 3 also has example 1's last negative as a (qrels) positive
    hard = torch.zeros(batch, n, dtype=torch.bool)
    hard[1, 0] = True
    return q, p, ids, pos_ids, hard


@pytest.mark.parametrize("mode", ["each", "logsumexp"])
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("margin", [None, 0.1, 0.0])
def test_multi_positive_loss_matches_the_loop_reference(mode, in_batch, margin) -> None:
    from nvr.training.loss import contrastive_loss

    for seed in range(3):
        q, p, ids, pos_ids, hard = _random_c1(seed)
        remote = torch.nn.functional.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(9)), dim=-1)
        remote_ids = torch.tensor([int(ids[0, 1]), -1, 999])
        kw = dict(remote=remote, remote_ids=remote_ids) if in_batch else {}
        want = reference_loss(q, p, ids, pos_ids, 2, mode, in_batch=in_batch, margin=margin, hard_mask=hard, **kw)
        got = contrastive_loss(q, p, TAU, use_in_batch_negatives=in_batch, passage_ids=ids, positive_ids=pos_ids,
                               remote_passage_emb=kw.get("remote"), remote_passage_ids=kw.get("remote_ids"),
                               hard_negative_mask=hard, num_extra_positives=2, multi_positive=mode,
                               self_mask_margin=margin)
        assert got.loss.item() == pytest.approx(want[0], rel=1e-5)
        assert got.accuracy.item() == pytest.approx(want[1])
        assert got.margin.item() == pytest.approx(want[2], rel=1e-5)


def test_the_two_multi_positive_modes_differ_and_both_equal_plain_infonce_without_extra() -> None:
    from nvr.training.loss import contrastive_loss

    q, p, ids, pos_ids, _ = _random_c1(4)
    kw = dict(passage_ids=ids, positive_ids=pos_ids, num_extra_positives=2)
    each = contrastive_loss(q, p, TAU, multi_positive="each", **kw).loss
    lse = contrastive_loss(q, p, TAU, multi_positive="logsumexp", **kw).loss
    assert abs(float(each) - float(lse)) > 1e-3
    # E = 0: the extra slots are ordinary hard negatives; both modes are F.cross_entropy
    logits = (q @ p.reshape(-1, 6).T) / TAU
    plain = torch.nn.functional.cross_entropy(logits, torch.arange(4) * p.shape[1])
    for mode in ("each", "logsumexp"):
        assert info_nce(q, p, TAU, multi_positive=mode).item() == pytest.approx(plain.item(), rel=1e-6)


def test_self_mask_drops_exactly_the_candidates_above_positive_plus_margin() -> None:
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[[0.6, 0.8], [0.75, 0.66], [0.65, 0.76], [0.0, 1.0]]])  # scores .6 / .75 / .65 / 0
    ids = torch.tensor([[1, 2, 3, 4]])
    off = info_nce(q, p, TAU, passage_ids=ids)
    masked = info_nce(q, p, TAU, passage_ids=ids, self_mask_margin=0.1)  # .75 > .7 dropped, .65 kept
    assert off.item() == pytest.approx(_ce([0.6, 0.75, 0.65, 0.0], 0), rel=1e-6)
    assert masked.item() == pytest.approx(_ce([0.6, 0.65, 0.0], 0), rel=1e-6)


def test_gradients_stay_finite_when_a_query_has_no_negative_and_no_extra_positive() -> None:
    from nvr.training.loss import contrastive_loss

    q = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1).requires_grad_()
    p = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1).requires_grad_()
    ids = torch.tensor([[1, -1, -1], [2, 3, -1]])  # query 0: no extra positive, its only negative padded
    for mode in ("each", "logsumexp"):
        out = contrastive_loss(q, p, TAU, use_in_batch_negatives=False, passage_ids=ids, num_extra_positives=1,
                               multi_positive=mode)
        q.grad = p.grad = None
        out.loss.backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()
        assert out.accuracy.item() == 1.0 and math.isnan(out.margin.item())  # no query has a negative


def test_bad_extra_positive_arguments_fail() -> None:
    q, p = _toy()
    with pytest.raises(ValueError, match="needs passage_ids"):
        info_nce(q, p, TAU, num_extra_positives=1)
    with pytest.raises(ValueError, match="does not fit"):
        info_nce(q, p, TAU, passage_ids=torch.tensor([[1, 2], [3, 4]]), num_extra_positives=2)
    with pytest.raises(ValueError, match="multi_positive"):
        info_nce(q, p, TAU, multi_positive="max")
