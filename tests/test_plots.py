"""Ablation plots people can read: a clipped ratio axis, validation points at the step they evaluated, a single
validation point drawn as a marker. Checked on the figure objects, not pixels."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nvr.ablation.plots import (
    RATIO_MARK,
    loss_curves_figure,
    plot_loss_curves,
    plot_score_histograms,
    robust_limits,
    score_histograms_figure,
    validation_step,
)
from nvr.ablation.runner import RESULT_FILE, TRAIN_LOSS, RunPlan

METRIC = "val/ndcg@10"


def results(histograms: list[str] | None = None) -> SimpleNamespace:
    spec = SimpleNamespace(name="grid", metric=METRIC, histograms=histograms or [], variants=[], sweeps=[])
    return SimpleNamespace(spec=spec, rows=[])


def run_plan(tmp_path: Path, variant: str, seed: int, rows: list[dict], mined: Path | None = None) -> RunPlan:
    """A finished run whose metrics.csv holds ``rows`` (Lightning's layout: one column per metric, blanks)."""
    run_dir = tmp_path / "runs" / variant / f"seed-{seed}"
    attempt = run_dir / "logs" / "attempt-0"
    attempt.mkdir(parents=True)
    with open(attempt / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "step", TRAIN_LOSS, METRIC])
        writer.writeheader()
        for row in rows:
            writer.writerow({"epoch": 0, **row})
    (run_dir / RESULT_FILE).write_text("{}", encoding="utf-8")
    return RunPlan(variant=SimpleNamespace(name=variant), seed=seed, run_dir=run_dir, mined_dir=mined, overrides={})


def training_rows(steps: int, validate_every: int, offset: float = 0.0) -> list[dict]:
    """What ``fit`` logs: the loss of batch s at step s, a validation after step k at logged step k - 1."""
    rows = [{"step": s, TRAIN_LOSS: 3.0 - 0.05 * s + offset} for s in range(steps)]
    rows += [{"step": k - 1, METRIC: 0.40 + 0.001 * k + offset} for k in range(validate_every, steps + 1,
                                                                               validate_every)]
    return rows


def test_validation_points_sit_at_their_step_and_a_single_one_is_a_marker(tmp_path):
    plans = [run_plan(tmp_path, "once", seed, training_rows(30, 30, 0.01 * seed)) for seed in (1, 2)]
    plans += [run_plan(tmp_path, "thrice", 1, training_rows(30, 10))]
    fig = loss_curves_figure(results(), plans)
    loss_ax, val_ax = fig.axes[:2]
    assert [list(line.get_xdata()) for line in loss_ax.lines] == [list(range(30))] * 2
    single, several = val_ax.lines
    assert list(single.get_xdata()) == [30] and validation_step(29) == 30
    assert single.get_linestyle() == "None" and single.get_marker() == "o" and single.get_markersize() >= 6
    assert single.get_ydata()[0] == pytest.approx(0.43 + 0.015)  # mean over the two seeds
    assert list(several.get_xdata()) == [10, 20, 30] and several.get_linestyle() == "-"
    # one step axis for both panels: the lone point is inside the training range, not centred on an empty axis
    lo, hi = val_ax.get_xlim()
    assert lo <= 0 and 30 <= hi <= 32
    assert loss_ax.get_xlim() == val_ax.get_xlim()
    assert plot_loss_curves(results(), plans, tmp_path / "loss.png").stat().st_size > 0


def write_mined(folder: Path, pairs: list[tuple[float, list[float]]]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "mined.jsonl", "w", encoding="utf-8") as fh:
        for i, (pos, negs) in enumerate(pairs):
            fh.write(json.dumps({"query_id": f"q{i}", "query": "q", "positives": [{"id": "p", "score": pos}],
                                 "negatives": [{"id": f"n{j}", "score": s} for j, s in enumerate(negs)]}) + "\n")
    return folder


def test_ratio_histogram_is_clipped_to_robust_quantiles(tmp_path):
    rng = np.random.default_rng(0)
    normal = [(0.8, list(rng.uniform(0.3, 0.75, size=4))) for _ in range(60)]
    # a near-zero positive score makes ratios of 40-80: they must not set the axis
    outliers = [(0.01, [0.4, 0.8])]
    a = write_mined(tmp_path / "mined_a", normal + outliers)
    b = write_mined(tmp_path / "mined_b", normal[:30])
    plans = [run_plan(tmp_path, "naive", 1, training_rows(4, 4), a), run_plan(tmp_path, "percpos", 1,
                                                                              training_rows(4, 4), b)]
    fig = score_histograms_figure(results(["naive", "percpos"]), plans)
    _, ratio_ax = fig.axes[:2]
    lo, hi = ratio_ax.get_xlim()
    assert lo < 0.3 / 0.8 + 0.05 and 0.75 / 0.8 < hi < 2.0, (lo, hi)
    assert lo < RATIO_MARK < hi  # the 95% mark stays visible
    assert ratio_ax.get_xlabel() == "negative score / positive score (2 ratios outside the axis)"
    for patch in ratio_ax.patches:  # every drawn bar lies inside the axis
        xs = patch.get_path().vertices[:, 0]
        assert xs.min() >= lo - 1e-9 and xs.max() <= hi + 1e-9
    assert plot_score_histograms(results(["naive"]), plans, tmp_path / "h.png").stat().st_size > 0


def test_robust_limits_without_outliers_keeps_everything_and_the_marks():
    values = np.linspace(0.2, 0.6, 101)
    lo, hi = robust_limits([values], quantiles=(0.0, 1.0), marks=[0.95])
    assert lo < 0.2 and 0.95 < hi < 1.0
    assert robust_limits([], marks=[]) is None
