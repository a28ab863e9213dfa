"""Ablation plots (matplotlib Agg, written atomically):

- ``metric_vs_threshold.png``: one panel per sweep, mean ± std over seeds against the swept value, the paper's
  points beside ours (Figure 1 / Figure 2 of the paper).
- ``score_histograms.png``: teacher scores of the mined negatives, absolute and relative to the query's positive,
  for the chosen variants (e.g. naive Top-K vs TopK-PercPos: the positive-aware filter removes the negatives that
  score close to the positive, the likely false negatives).
- ``loss_curves.png``: training loss and the validation metric against the step, averaged over seeds.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from nvr.ablation.results import AblationResults
from nvr.ablation.runner import TRAIN_LOSS, RunPlan, read_series
from nvr.data.jsonl import iter_jsonl
from nvr.mining.mined_set import mined_file
from nvr.utils.atomic import write_bytes_atomic

MAX_HISTOGRAM_VARIANTS = 6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------------------------- sweeps
def plot_sweeps(res: AblationResults, path: Path) -> Path | None:
    """Metric vs swept value per sweep; None when the spec has no sweep with a finished numeric point."""
    sweeps = [s for s in res.spec.sweeps if any(r.sweep == s.name and r.x is not None and r.values for r in res.rows)]
    if not sweeps:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.6), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        rows = sorted((r for r in res.rows if r.sweep == sweep.name and r.x is not None and r.values),
                      key=lambda r: r.x)  # type: ignore[arg-type, return-value]
        xs = [r.x for r in rows]
        ax.errorbar(xs, [r.mean for r in rows], yerr=[r.std or 0.0 for r in rows], marker="o", capsize=3,
                    label=f"ours (n={max(r.n for r in rows)} seeds)")
        paper = sorted((r.x, r.paper) for r in res.rows if r.sweep == sweep.name and r.x is not None and r.paper)
        if paper:
            twin = ax.twinx()
            twin.plot([p[0] for p in paper], [p[1] for p in paper], "s--", color="tab:red", label="paper")
            twin.set_ylabel("paper NDCG@10", color="tab:red")
            twin.legend(loc="lower right", fontsize=8)
        ax.set_title(sweep.name)
        ax.set_xlabel(sweep.key.rsplit(".", 1)[-1])
        ax.set_ylabel(res.spec.metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{res.spec.name}: {res.spec.metric} vs swept value")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- histograms
def mined_scores(mined_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(negative scores, negative score / anchor) of a mined set; the anchor is the query's lowest positive
    score (the mining default); ratios only where the anchor is positive."""
    negatives, ratios = [], []
    for _, row in iter_jsonl(mined_file(mined_dir)):
        positive = [p.get("score") for p in row.get("positives", []) if p.get("score") is not None]
        anchor = min(positive) if positive else None
        for neg in row.get("negatives", []):
            score = neg.get("score")
            if score is None or not math.isfinite(score):
                continue
            negatives.append(score)
            if anchor is not None and anchor > 0:
                ratios.append(score / anchor)
    return np.asarray(negatives, dtype=np.float64), np.asarray(ratios, dtype=np.float64)


def _histogram_variants(res: AblationResults, plans: Sequence[RunPlan]) -> list[tuple[str, Path]]:
    """(variant, mined folder) for the spec's ``histograms`` list, else the first listed variants."""
    mined: dict[str, Path] = {}
    for plan in plans:
        if plan.mined_dir is not None and mined_file(plan.mined_dir).is_file():
            mined.setdefault(plan.variant.name, plan.mined_dir)
    names = res.spec.histograms or [v.name for v in res.spec.variants][:MAX_HISTOGRAM_VARIANTS]
    return [(n, mined[n]) for n in names if n in mined]


def shared_bins(samples: Sequence[np.ndarray], count: int = 40) -> np.ndarray | int:
    """Common bin edges so the variants' histograms are comparable bar for bar."""
    values = np.concatenate([s for s in samples if s.size]) if any(s.size for s in samples) else np.empty(0)
    if values.size == 0 or values.max() <= values.min():
        return count
    return np.linspace(values.min(), values.max(), count + 1)


def plot_score_histograms(res: AblationResults, plans: Sequence[RunPlan], path: Path) -> Path | None:
    chosen = _histogram_variants(res, plans)
    if not chosen:
        return None
    data = [(name, *mined_scores(folder)) for name, folder in chosen]
    data = [d for d in data if d[1].size]
    if not data:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    score_bins = shared_bins([d[1] for d in data])
    ratio_bins = shared_bins([d[2] for d in data])
    for name, scores, ratios in data:
        ax1.hist(scores, bins=score_bins, histtype="step", linewidth=1.6, label=f"{name} ({scores.size})")
        if ratios.size:
            ax2.hist(ratios, bins=ratio_bins, histtype="step", linewidth=1.6, label=name)
    ax2.axvline(0.95, color="gray", linestyle=":", label="95% of positive")
    ax1.set_xlabel("teacher score of mined negatives")
    ax2.set_xlabel("negative score / positive score")
    for ax in (ax1, ax2):
        ax.set_ylabel("negatives")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res.spec.name}: hard-negative score distributions")
    return _save(fig, path)


# -------------------------------------------------------------------------------------------- loss curves
def _mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds at every step any seed logged."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    steps = np.asarray(sorted(by_step), dtype=np.int64)
    return steps, np.asarray([np.mean(by_step[s]) for s in steps], dtype=np.float64)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Exponential moving average with span ``window`` (bias-corrected, so the first points are not damped)."""
    if window <= 1 or values.size == 0:
        return values
    alpha = 2.0 / (window + 1.0)
    out = np.empty_like(values)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def _variant_series(plans: Sequence[RunPlan]) -> Iterator[tuple[str, list[dict[str, list[tuple[int, float]]]]]]:
    by_variant: dict[str, list[RunPlan]] = {}
    for plan in plans:
        by_variant.setdefault(plan.variant.name, []).append(plan)
    for name, group in by_variant.items():
        yield name, [read_series(p.run_dir) for p in group if p.done]


def plot_loss_curves(res: AblationResults, plans: Sequence[RunPlan], path: Path) -> Path | None:
    series = [(name, runs) for name, runs in _variant_series(plans) if any(r.get(TRAIN_LOSS) for r in runs)]
    if not series:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, runs in series:
        steps, loss = _mean_curve([r.get(TRAIN_LOSS, []) for r in runs])
        window = max(1, steps.size // 20)
        (line,) = ax1.plot(steps, smooth(loss, window), label=f"{name} (n={len(runs)})", linewidth=1.3)
        m_steps, metric = _mean_curve([r.get(res.spec.metric, []) for r in runs])
        if m_steps.size:
            ax2.plot(m_steps, metric, marker=".", color=line.get_color(), label=name)
    ax1.set_ylabel(f"{TRAIN_LOSS} (EMA, mean over seeds)")
    ax2.set_ylabel(f"{res.spec.metric} (mean over seeds)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{res.spec.name}: training curves")
    return _save(fig, path)


def write_plots(res: AblationResults, plans: Sequence[RunPlan], out_dir: Path) -> dict[str, Path]:
    """Every plot that has data; returns {kind: path}."""
    written = {
        "sweeps": plot_sweeps(res, out_dir / "metric_vs_threshold.png"),
        "histograms": plot_score_histograms(res, plans, out_dir / "score_histograms.png"),
        "loss_curves": plot_loss_curves(res, plans, out_dir / "loss_curves.png"),
    }
    return {k: v for k, v in written.items() if v is not None}
