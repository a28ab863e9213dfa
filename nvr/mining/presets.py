"""Named mining presets: the best configuration of each method in the paper (Table 3, section 4.3).

Each preset returns fresh ``(FilterConfig, SamplerConfig)`` objects; the number of negatives stays
``MineConfig.num_negatives`` (4 in the paper's ablations). ``topk_percpos_0.95`` is the default and the paper's best.
"""

from __future__ import annotations

from collections.abc import Callable

from nvr.config.mining import FilterConfig, SamplerConfig
from nvr.utils.errors import ConfigError

Preset = tuple[FilterConfig, SamplerConfig]
DEFAULT_PRESET = "topk_percpos_0.95"


def naive_topk() -> Preset:
    """Top-K most similar, positives excluded (the weakest baseline)."""
    return FilterConfig(method="naive_topk"), SamplerConfig(method="topk")


def topk_shifted_10() -> Preset:
    """Skip the 10 most similar candidates (likely false negatives)."""
    return FilterConfig(method="topk_shifted", shift=10), SamplerConfig(method="topk")


def topk_abs_07() -> Preset:
    """Drop candidates scoring >= 0.7."""
    return FilterConfig(method="topk_abs", max_score=0.7), SamplerConfig(method="topk")


def topk_marginpos_005() -> Preset:
    """Keep n if score(n) < score(p) - 0.05."""
    return FilterConfig(method="topk_marginpos", margin=0.05), SamplerConfig(method="topk")


def topk_percpos_095() -> Preset:
    """Keep n if score(n) < 95% of score(p) (sign-safe): the paper's best method."""
    return FilterConfig(method="topk_percpos", perc=0.95), SamplerConfig(method="topk")


def sampled_topk_10() -> Preset:
    """TopK-PercPos 95%, then sample from the first 10 survivors (softmax over scores)."""
    return FilterConfig(method="topk_percpos", perc=0.95), SamplerConfig(method="sampled_topk", window=10)


def top1_sampled_10() -> Preset:
    """TopK-PercPos 95%, keep the top-1 survivor and sample the rest from survivors 2..10."""
    return FilterConfig(method="topk_percpos", perc=0.95), SamplerConfig(method="top1_sampled", window=10)


PRESETS: dict[str, Callable[[], Preset]] = {
    "naive_topk": naive_topk,
    "topk_shifted_10": topk_shifted_10,
    "topk_abs_0.7": topk_abs_07,
    "topk_marginpos_0.05": topk_marginpos_005,
    "topk_percpos_0.95": topk_percpos_095,
    "sampled_topk_10": sampled_topk_10,
    "top1_sampled_10": top1_sampled_10,
}


def get_preset(name: str) -> Preset:
    """The (filter, sampler) pair of a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
