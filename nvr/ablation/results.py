"""Results of an ablation grid: per-variant mean ± std over seeds beside the paper's numbers (markdown + CSV).

Absolute numbers of a miniature run are not comparable with the paper's (other model, data and budget); what
is comparable is the *ordering* of the methods, so the table ranks both and reports Kendall's tau between them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvr.ablation.runner import FAILED_FILE, RESULT_FILE, RunPlan, plan_runs
from nvr.ablation.spec import AblationSpec
from nvr.utils.atomic import write_text_atomic

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
RUNS_CSV = "runs.csv"
PAIRED_CSV = "paired.csv"


@dataclass
class VariantSummary:
    """One row of the results table."""

    name: str
    sweep: str | None
    x: float | None
    values: list[float] = field(default_factory=list)
    """One value per finished seed (in seed order)."""
    seeds: list[int] = field(default_factory=list)
    failed_seeds: list[int] = field(default_factory=list)
    paper: float | None = None
    disabled: str | None = None
    rank: int | None = None
    paper_rank: int | None = None
    extra: dict[str, list[float]] = field(default_factory=dict)
    """``report_metrics`` name -> one value per finished seed that logged it (final validation)."""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None below two seeds)."""
        return mean_std(self.values)[1]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean (None when empty) and sample standard deviation (None below two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class AblationResults:
    spec: AblationSpec
    rows: list[VariantSummary]
    runs: list[dict[str, Any]]
    """``result.json`` records of the finished runs."""
    failures: list[dict[str, Any]]
    kendall_tau: float | None
    rank_seeds: list[int] | None = None
    """The seeds ranks and tau are computed over: those every finished variant has (a grid still filling up would
    otherwise rank a mean over 3 seeds against one over 2); None when the variants share no seed."""


def read_run_records(plans: Sequence[RunPlan]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Finished results and recorded failures of the given runs (runs not started yet are in neither)."""
    results, failures = [], []
    for plan in plans:
        done, failed = plan.run_dir / RESULT_FILE, plan.run_dir / FAILED_FILE
        if done.is_file():  # a borrowed run is recorded under its own spec's variant name: report it under ours
            results.append({**json.loads(done.read_text(encoding="utf-8")), "variant": plan.variant.name})
        elif failed.is_file():
            failures.append({"variant": plan.variant.name, "seed": plan.seed, "run_dir": str(plan.run_dir),
                             **json.loads(failed.read_text(encoding="utf-8"))})
    return results, failures


def _ranks(values: dict[str, float]) -> dict[str, int]:
    """1 = highest; ties share the better rank."""
    ordered = sorted(values.values(), reverse=True)
    return {name: ordered.index(v) + 1 for name, v in values.items()}


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's tau-b of two paired samples (None with fewer than two pairs or no untied pair)."""
    if len(a) != len(b):
        raise ValueError("kendall_tau needs paired samples")
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom > 0 else None


def summarize(spec: AblationSpec, results: Sequence[dict[str, Any]],
              failures: Sequence[dict[str, Any]] = ()) -> AblationResults:
    """Per-variant rows in spec order, with our rank, the paper's rank and their Kendall tau."""
    rows = [VariantSummary(name=v.name, sweep=v.sweep, x=v.x, paper=v.paper, disabled=v.disabled)
            for v in spec.all_variants()]
    by_name = {r.name: r for r in rows}
    for record in sorted(results, key=lambda r: (r["variant"], r["seed"])):
        row = by_name.get(record["variant"])
        if row is not None and record.get("value") is not None:
            row.values.append(float(record["value"]))
            row.seeds.append(int(record["seed"]))
            final = record.get("metrics_at_final") or {}
            for name in spec.report_metrics:
                if final.get(name) is not None:
                    row.extra.setdefault(name, []).append(float(final[name]))
    for failure in failures:
        if failure["variant"] in by_name:
            by_name[failure["variant"]].failed_seeds.append(int(failure["seed"]))
    finished = [r for r in rows if r.values]
    common = sorted(set.intersection(*(set(r.seeds) for r in finished))) if finished else []
    ours = {r.name: _mean_over(r, common) if common else r.mean for r in finished}
    theirs = {r.name: r.paper for r in rows if r.paper is not None}
    for name, rank in _ranks(ours).items():  # type: ignore[arg-type]
        by_name[name].rank = rank
    for name, rank in _ranks(theirs).items():  # type: ignore[arg-type]
        by_name[name].paper_rank = rank
    both = [n for n in ours if n in theirs]
    tau = kendall_tau([ours[n] for n in both], [theirs[n] for n in both]) if len(both) >= 2 else None  # type: ignore
    return AblationResults(spec, rows, list(results), list(failures), tau, common or None)


def _mean_over(row: VariantSummary, seeds: Sequence[int]) -> float:
    by_seed = dict(zip(row.seeds, row.values, strict=True))
    return sum(by_seed[s] for s in seeds) / len(seeds)


# ------------------------------------------------------------------------------------------------- writers
def _f(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _spread(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{_f(mean)} ± {_f(std)}" if std is not None else _f(mean)


FN_COLUMNS = (("fn_rate", "FN rate", 4), ("hardness", "hardness", 4))
"""Columns taken from ``fn_report/fn_report.json`` (same held-back positives for every variant)."""


def markdown_table(res: AblationResults, fn_rows: dict[str, dict[str, Any]] | None = None) -> str:
    """The results table; ``report_metrics`` and (with ``fn_rows``: variant -> fn-report row) the false-negative
    rate and hardness of each variant's mined negatives as extra columns, so NDCG and FN rate line up."""
    spec, fn_rows = res.spec, fn_rows or {}
    extra = [*spec.report_metrics]
    fn_cols = FN_COLUMNS if fn_rows else ()
    header = ["variant", "n", "mean ± std", "min", "max", *extra, *(c[1] for c in fn_cols), "paper", "rank",
              "paper rank"]
    lines = [f"# Ablation: {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [f"Metric: `{spec.metric}` ({spec.select} value of each run), mean ± sample std over seeds "
              f"{spec.seeds}. Paper: NDCG@10 as printed in the paper (its scale, not ours: compare orderings)."]
    if extra:
        lines.append(f"Also shown (final validation, mean ± std, not ranked): {', '.join(f'`{m}`' for m in extra)}.")
    if fn_cols:
        lines.append("FN rate / hardness: share of the variant's mined negatives that are held-back positives, and "
                     "their mean teacher score (`fn_report/`).")
    lines += ["", "| " + " | ".join(header) + " |",
              "|---|---:|---|" + "---:|" * (len(header) - 3)]
    for row in res.rows:
        fn = [_f(fn_rows.get(row.name, {}).get(key), digits) for key, _, digits in fn_cols]
        if row.disabled:
            cells = [row.name, "0", f"not run: {row.disabled}", "", "", *([""] * len(extra)), *fn, _f(row.paper), "",
                     str(row.paper_rank or "")]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        spread = _spread(row.values)
        if row.failed_seeds:
            spread += f" ({len(row.failed_seeds)} failed)"
        cells = [row.name, str(row.n), spread, _f(min(row.values) if row.values else None),
                 _f(max(row.values) if row.values else None), *(_spread(row.extra.get(m, [])) for m in extra), *fn,
                 _f(row.paper), str(row.rank or ""), str(row.paper_rank or "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    compared = sum(1 for r in res.rows if r.rank is not None and r.paper_rank is not None)
    if res.kendall_tau is not None:
        lines.append(f"Rank agreement with the paper: Kendall tau-b = {res.kendall_tau:.3f} over {compared} variants.")
    if len({tuple(r.seeds) for r in res.rows if r.values}) > 1:
        lines.append(f"Ranks (and tau) use the mean over the seeds every variant has finished: {res.rank_seeds}; "
                     "the others are not finished for every variant yet." if res.rank_seeds else
                     "The variants share no finished seed yet: ranks use each variant's own mean.")
    borrowed = [(v.name, v.borrowed) for v in spec.all_variants() if v.borrowed is not None]
    if borrowed:
        lines += ["", "Borrowed rows (the other spec's runs, same settings; run there, not here):"]
        lines += [f"- {name}: `{source.variant}` of `{source.spec}`" for name, source in borrowed]
    if res.failures:
        lines += ["", "Failed runs (re-run the same command to retry them):"]
        lines += [f"- {f['variant']} seed {f['seed']}: {f['run_dir']}/{FAILED_FILE}" for f in res.failures]
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def results_csv(res: AblationResults) -> str:
    extra = res.spec.report_metrics
    header = ["variant", "sweep", "x", "n", "mean", "std", "min", "max",
              *(f"{m}{suffix}" for m in extra for suffix in (" mean", " std")), "paper", "rank", "paper_rank",
              "failed", "disabled"]
    rows = [[r.name, r.sweep or "", "" if r.x is None else r.x, r.n, _f(r.mean, 6), _f(r.std, 6),
             _f(min(r.values) if r.values else None, 6), _f(max(r.values) if r.values else None, 6),
             *(_f(v, 6) for m in extra for v in mean_std(r.extra.get(m, []))),
             _f(r.paper, 4), r.rank or "", r.paper_rank or "", len(r.failed_seeds), r.disabled or ""]
            for r in res.rows]
    return _csv_text(header, rows)


def runs_csv(res: AblationResults) -> str:
    header = ["variant", "seed", "value", "final", "final_step", "best", "best_step", "final_train_loss", "wall_s",
              "mined_dir"]
    rows = [[r["variant"], r["seed"], _f(r.get("value"), 6), _f(r.get("final"), 6), r.get("final_step", ""),
             _f(r.get("best"), 6), r.get("best_step", ""), _f(r.get("final_train_loss"), 6), r.get("wall_s", ""),
             r.get("mined_dir") or ""] for r in sorted(res.runs, key=lambda r: (r["variant"], r["seed"]))]
    return _csv_text(header, rows)


def collect(spec: AblationSpec) -> tuple[AblationResults, list[RunPlan]]:
    """Summarize whatever runs of the whole spec have finished so far."""
    plans = plan_runs(spec)
    results, failures = read_run_records(plans)
    return summarize(spec, results, failures), plans


def write_report(spec: AblationSpec, plots: bool = True) -> dict[str, Path]:
    """``results.md``, ``results.csv``, ``runs.csv`` and the plots in ``spec.output_dir`` (each atomically)."""
    res, plans = collect(spec)
    out = Path(spec.output_dir)
    written: dict[str, Path] = {}
    fn_rows = None
    if spec.fn_report is not None:  # filters over cached tables: no run needs to have finished
        from nvr.ablation.false_negatives import write_fn_reports

        written.update(write_fn_reports(spec, plots=plots))
        fn_rows = _fn_rows(out)
    from nvr.ablation.paired import paired_csv_rows, paired_markdown

    written.update({"markdown": out / RESULTS_MD, "csv": out / RESULTS_CSV, "runs_csv": out / RUNS_CSV,
                    "paired_csv": out / PAIRED_CSV})
    reference = spec.reference_variant
    write_text_atomic(written["markdown"], markdown_table(res, fn_rows) + "\n" + paired_markdown(res, reference))
    write_text_atomic(written["csv"], results_csv(res))
    write_text_atomic(written["runs_csv"], runs_csv(res))
    write_text_atomic(written["paired_csv"], _csv_text(*paired_csv_rows(res, reference)))
    if plots:
        from nvr.ablation.plots import write_plots

        written.update(write_plots(res, plans, out))
    return written


def _fn_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Variant -> row of the fn report just written (``fn_report/fn_report.json``)."""
    from nvr.ablation.false_negatives import FOLDER

    report = json.loads((out / FOLDER / "fn_report.json").read_text(encoding="utf-8"))
    return {row["variant"]: row for row in report["rows"]}
