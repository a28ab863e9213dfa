from __future__ import annotations

import numpy as np
import pytest

from nvr.config.mining import SamplerConfig
from nvr.mining.samplers import gumbel_top_k, ranked_survivors, select
from nvr.utils.errors import ConfigError
from nvr.utils.seeding import rng_for


def test_ranked_survivors_rank_order_and_padding():
    keep = np.array([[False, True, True, False, True], [False, False, False, False, True]])
    assert ranked_survivors(keep).tolist() == [[1, 2, 4, -1, -1], [4, -1, -1, -1, -1]]
    assert ranked_survivors(keep, 2).tolist() == [[1, 2], [4, -1]]
    assert ranked_survivors(keep, 7).shape == (2, 7)


def test_topk_takes_first_k_survivors_and_never_pads_with_filtered():
    keep = np.array([[False, True, True, False, True], [False, False, False, False, True]])
    scores = np.linspace(1, 0, 5, dtype=np.float32)[None].repeat(2, 0)
    out = select(keep, scores, SamplerConfig(method="topk"), 2, 0, ["a", "b"])
    assert out.tolist() == [[1, 2], [4, -1]]


def _random_problem(q: int, n: int = 30, seed: int = 1):
    rng = np.random.default_rng(seed)
    keep = rng.random((q, n)) < 0.7
    scores = -np.sort(-rng.random((q, n)), axis=1).astype(np.float32)
    qids = [f"q{i}" for i in range(q)]
    return keep, scores, qids


@pytest.mark.parametrize("method", ["sampled_topk", "top1_sampled"])
def test_sampling_stays_in_window_without_replacement_rank_ordered(method):
    keep, scores, qids = _random_problem(200)
    cfg = SamplerConfig(method=method, window=10, temperature=0.5)
    out = select(keep, scores, cfg, 4, 7, qids)
    window = ranked_survivors(keep, 10)
    for row in range(len(qids)):
        picked = out[row][out[row] >= 0]
        allowed = window[row][window[row] >= 0]
        assert set(picked) <= set(allowed)
        assert len(set(picked)) == len(picked) == min(4, len(allowed))
        assert (np.diff(picked) > 0).all()
        if method == "top1_sampled" and len(picked):
            assert picked[0] == allowed[0]


@pytest.mark.parametrize("method", ["sampled_topk", "top1_sampled"])
def test_sampling_is_deterministic_and_row_order_independent(method):
    keep, scores, qids = _random_problem(100)
    cfg = SamplerConfig(method=method, window=10)
    out = select(keep, scores, cfg, 4, 3, qids)
    assert np.array_equal(out, select(keep, scores, cfg, 4, 3, qids))
    perm = np.random.default_rng(5).permutation(len(qids))
    shuffled = select(keep[perm], scores[perm], cfg, 4, 3, [qids[i] for i in perm])
    assert np.array_equal(shuffled, out[perm])
    # sharding: the second half alone gives the same rows
    half = select(keep[50:], scores[50:], cfg, 4, 3, qids[50:])
    assert np.array_equal(half, out[50:])
    assert not np.array_equal(out, select(keep, scores, cfg, 4, 4, qids))


def test_sampling_probabilities_follow_softmax_over_scores():
    # two survivors with scores ln 1 and ln 3 at temperature 1 -> p = 0.25 / 0.75 for k = 1
    q = 4000
    keep = np.ones((q, 2), dtype=bool)
    scores = np.tile(np.log([1.0, 3.0]).astype(np.float32), (q, 1))
    out = select(keep, scores, SamplerConfig(method="sampled_topk", window=2), 1, 0, [str(i) for i in range(q)])
    assert abs((out[:, 0] == 1).mean() - 0.75) < 0.03
    # temperature 2 -> weights sqrt(1) : sqrt(3) -> p = 0.634
    out = select(keep, scores, SamplerConfig(method="sampled_topk", window=2, temperature=2.0), 1, 0,
                 [str(i) for i in range(q)])
    assert abs((out[:, 0] == 1).mean() - np.sqrt(3) / (1 + np.sqrt(3))) < 0.03


def test_low_temperature_sampling_equals_topk():
    keep, scores, qids = _random_problem(50)
    cold = select(keep, scores * 100, SamplerConfig(method="sampled_topk", window=10, temperature=1e-4), 4, 0, qids)
    assert np.array_equal(cold, select(keep, scores, SamplerConfig(method="topk"), 4, 0, qids))


def test_short_window_returns_all_survivors_without_padding_values():
    keep = np.array([[True, False, True, False, False, False]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    out = select(keep, scores, SamplerConfig(method="sampled_topk", window=6), 4, 0, ["q"])
    assert out.tolist() == [[0, 2, -1, -1]]


def test_window_smaller_than_k_is_a_config_error():
    with pytest.raises(ConfigError, match="sampler.window"):
        select(np.ones((1, 5), bool), np.zeros((1, 5)), SamplerConfig(method="sampled_topk", window=3), 4, 0, ["q"])


def test_gumbel_top_k_uses_the_generator():
    a = gumbel_top_k(np.zeros(10), 3, 1.0, rng_for(1, "x"))
    b = gumbel_top_k(np.zeros(10), 3, 1.0, rng_for(1, "x"))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 3
