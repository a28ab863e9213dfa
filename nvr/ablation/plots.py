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


def shared_bins(samples: Sequence[np.ndarray], count: int = 40,
                limits: tuple[float, float] | None = None) -> np.ndarray | int:
    """Common bin edges so the variants' histograms are comparable bar for bar (over ``limits`` when given)."""
    if limits is not None:
        return np.linspace(limits[0], limits[1], count + 1)
    values = np.concatenate([s for s in samples if s.size]) if any(s.size for s in samples) else np.empty(0)
    if values.size == 0 or values.max() <= values.min():
        return count
    return np.linspace(values.min(), values.max(), count + 1)


RATIO_QUANTILES = (0.01, 0.99)
"""The ratio axis spans these quantiles of all variants' ratios (plus the 0.95 mark): a negative scoring 40x a
near-zero positive score must not squash every other bar into the first bin."""
RATIO_MARK = 0.95


def robust_limits(samples: Sequence[np.ndarray], quantiles: tuple[float, float] = RATIO_QUANTILES,
                  marks: Sequence[float] = ()) -> tuple[float, float] | None:
    """x-limits from the pooled quantiles of ``samples`` (widened to include ``marks``), padded by 5%."""
    values = np.concatenate([s[np.isfinite(s)] for s in samples]) if samples else np.empty(0)
    points = [float(m) for m in marks]
    if values.size:
        points += [float(v) for v in np.quantile(values, quantiles)]
    if not points:
        return None
    lo, hi = min(points), max(points)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05
    return lo - pad, hi + pad


def score_histograms_figure(res: AblationResults, plans: Sequence[RunPlan]):
    """The figure of :func:`plot_score_histograms` (None without mined sets); the ratio panel is clipped to
    :data:`RATIO_QUANTILES`, the number of ratios left outside is written in its axis label."""
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
    limits = robust_limits([d[2] for d in data if d[2].size], marks=[RATIO_MARK])
    ratio_bins = shared_bins([d[2] for d in data], limits=limits)
    outside = 0
    for name, scores, ratios in data:
        ax1.hist(scores, bins=score_bins, histtype="step", linewidth=1.6, label=f"{name} ({scores.size})")
        if ratios.size:
            shown = ratios if limits is None else ratios[(ratios >= limits[0]) & (ratios <= limits[1])]
            outside += ratios.size - shown.size
            ax2.hist(shown, bins=ratio_bins, histtype="step", linewidth=1.6, label=name)
    ax2.axvline(RATIO_MARK, color="gray", linestyle=":", label="95% of positive")
    if limits is not None:
        ax2.set_xlim(*limits)
    ax1.set_xlabel("teacher score of mined negatives")
    note = f" ({outside} ratios outside the axis)" if outside else ""
    ax2.set_xlabel(f"negative score / positive score{note}")
    for ax in (ax1, ax2):
        ax.set_ylabel("negatives")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res.spec.name}: hard-negative score distributions")
    return fig


def plot_score_histograms(res: AblationResults, plans: Sequence[RunPlan], path: Path) -> Path | None:
    fig = score_histograms_figure(res, plans)
    return None if fig is None else _save(fig, path)


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


def validation_step(logged_step: int) -> int:
    """The optimizer step a validation inside ``fit`` evaluated. Lightning logs it before counting the batch that
    triggered it (``_batches_that_stepped``), so a validation after step 30 sits at 29 in metrics.csv; training
    losses are logged at the same counter, which numbers the batch they were computed on (0 = first batch, taken
    with the weights of step 0), so they stay as logged."""
    return logged_step + 1


def loss_curves_figure(res: AblationResults, plans: Sequence[RunPlan]):
    """The figure of :func:`plot_loss_curves` (None without logged losses). Validation points are drawn at the
    step they evaluated (:func:`validation_step`) on the same step axis as the loss; a variant with a single
    validation point gets a marker (a line needs two points)."""
    series = [(name, runs) for name, runs in _variant_series(plans) if any(r.get(TRAIN_LOSS) for r in runs)]
    if not series:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    for name, runs in series:
        steps, loss = _mean_curve([r.get(TRAIN_LOSS, []) for r in runs])
        window = max(1, steps.size // 20)
        (line,) = ax1.plot(steps, smooth(loss, window), label=f"{name} (n={len(runs)})", linewidth=1.3)
        m_steps, metric = _mean_curve([[(validation_step(s), v) for s, v in r.get(res.spec.metric, [])]
                                       for r in runs])
        if m_steps.size == 1:
            ax2.plot(m_steps, metric, linestyle="none", marker="o", markersize=7, color=line.get_color(), label=name)
        elif m_steps.size:
            ax2.plot(m_steps, metric, marker=".", color=line.get_color(), label=name)
    ax1.set_ylabel(f"{TRAIN_LOSS} (EMA, mean over seeds)")
    ax2.set_ylabel(f"{res.spec.metric} (mean over seeds)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    if ax2.lines:
        ax2.legend(fontsize=7)
    last = max(int(line.get_xdata().max()) for line in [*ax1.lines, *ax2.lines] if len(line.get_xdata()))
    ax1.set_xlim(0, max(1, last) * 1.03)  # shared: validation points sit inside the training range
    fig.suptitle(f"{res.spec.name}: training curves")
    return fig


def plot_loss_curves(res: AblationResults, plans: Sequence[RunPlan], path: Path) -> Path | None:
    fig = loss_curves_figure(res, plans)
    return None if fig is None else _save(fig, path)


def write_plots(res: AblationResults, plans: Sequence[RunPlan], out_dir: Path) -> dict[str, Path]:
    """Every plot that has data; returns {kind: path}."""
    written = {
        "sweeps": plot_sweeps(res, out_dir / "metric_vs_threshold.png"),
        "histograms": plot_score_histograms(res, plans, out_dir / "score_histograms.png"),
        "loss_curves": plot_loss_curves(res, plans, out_dir / "loss_curves.png"),
    }
    return {k: v for k, v in written.items() if v is not None}
