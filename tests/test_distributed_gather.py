"""gather_padded (contract C4): uneven row counts, a rank without rows, ids padded, sync_grads handed through."""

from __future__ import annotations

import pytest
import torch

from nvr.utils.distributed import concat_trimmed, dist_all_gather, gather_padded
from tests._threads import ThreadGroup


def test_uneven_counts_pad_to_the_max_and_trim_back() -> None:
    world = 3
    rows = [torch.arange(n * 4, dtype=torch.float32).reshape(n, 2, 2) + 100 * r for r, n in enumerate((3, 0, 5))]
    ids = [torch.arange(n) + 10 * r for r, n in enumerate((3, 0, 5))]
    rows[1] = torch.zeros((0, 2, 2))
    out = ThreadGroup(world).run(lambda r, g: gather_padded(rows[r], ids[r], g, pad_id=-7))
    for all_rows, all_ids, counts in out:
        assert counts == [3, 0, 5] and all_rows.shape == (3, 5, 2, 2) and all_ids.shape == (3, 5)
        assert torch.equal(concat_trimmed(all_rows, counts), torch.cat([rows[0], rows[2]]))
        assert torch.equal(all_ids[0, 3:], torch.full((2,), -7)) and torch.equal(all_ids[1], torch.full((5,), -7))
        assert torch.equal(concat_trimmed(all_ids, counts), torch.cat([ids[0], ids[2]]))


def test_empty_rank_takes_the_trailing_shape_of_the_others() -> None:
    rows = [torch.ones(2, 4), torch.zeros(0, 0)]
    out = ThreadGroup(2).run(lambda r, g: gather_padded(rows[r], None, g))
    assert all(o[0].shape == (2, 2, 4) and o[1] is None and o[2] == [2, 0] for o in out)


def test_mismatched_trailing_shapes_are_refused() -> None:
    rows = [torch.ones(2, 4), torch.ones(2, 3)]
    with pytest.raises(ValueError, match="only a rank without rows may differ"):
        ThreadGroup(2).run(lambda r, g: gather_padded(rows[r], None, g))
    with pytest.raises(ValueError, match="ids of shape"):
        gather_padded(torch.ones(2, 3), torch.ones(3), dist_all_gather)


def test_sync_grads_reaches_the_row_gather_only() -> None:
    calls: list[tuple[tuple, bool]] = []

    def gather(t: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        calls.append((tuple(t.shape), sync_grads))
        return t.unsqueeze(0)

    x = torch.ones(4, 3, requires_grad=True)
    all_rows, all_ids, counts = gather_padded(x, torch.arange(4), gather, sync_grads=True)
    assert calls == [((2,), False), ((4, 3), True), ((4,), False)]
    all_rows.sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 3)) and counts == [4]


def test_single_process_dist_all_gather_is_a_stack_of_one() -> None:
    x = torch.arange(6).reshape(2, 3)
    assert torch.equal(dist_all_gather(x), x[None])
