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

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None below two seeds)."""
        if self.n < 2:
            return None
        mean = self.mean
        assert mean is not None
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (self.n - 1))


@dataclass
class AblationResults:
    spec: AblationSpec
    rows: list[VariantSummary]
    runs: list[dict[str, Any]]
    """``result.json`` records of the finished runs."""
    failures: list[dict[str, Any]]
    kendall_tau: float | None


def read_run_records(plans: Sequence[RunPlan]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Finished results and recorded failures of the given runs (runs not started yet are in neither)."""
    results, failures = [], []
    for plan in plans:
        done, failed = plan.run_dir / RESULT_FILE, plan.run_dir / FAILED_FILE
        if done.is_file():
            results.append(json.loads(done.read_text(encoding="utf-8")))
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
    for failure in failures:
        if failure["variant"] in by_name:
            by_name[failure["variant"]].failed_seeds.append(int(failure["seed"]))
    ours = {r.name: r.mean for r in rows if r.mean is not None}
    theirs = {r.name: r.paper for r in rows if r.paper is not None}
    for name, rank in _ranks(ours).items():  # type: ignore[arg-type]
        by_name[name].rank = rank
    for name, rank in _ranks(theirs).items():  # type: ignore[arg-type]
        by_name[name].paper_rank = rank
    both = [n for n in ours if n in theirs]
    tau = kendall_tau([ours[n] for n in both], [theirs[n] for n in both]) if len(both) >= 2 else None  # type: ignore
    return AblationResults(spec, rows, list(results), list(failures), tau)


# ------------------------------------------------------------------------------------------------- writers
def _f(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(res: AblationResults) -> str:
    spec = res.spec
    lines = [f"# Ablation: {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [f"Metric: `{spec.metric}` ({spec.select} value of each run), mean ± sample std over seeds "
              f"{spec.seeds}. Paper: NDCG@10 as printed in the paper (its scale, not ours: compare orderings).", "",
              "| variant | n | mean ± std | min | max | paper | rank | paper rank |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in res.rows:
        if row.disabled:
            lines.append(f"| {row.name} | 0 | not run: {row.disabled} | | | {_f(row.paper)} | | "
                         f"{row.paper_rank or ''} |")
            continue
        spread = f"{_f(row.mean)} ± {_f(row.std)}" if row.std is not None else _f(row.mean)
        if row.failed_seeds:
            spread += f" ({len(row.failed_seeds)} failed)"
        lines.append(f"| {row.name} | {row.n} | {spread} | {_f(min(row.values) if row.values else None)} | "
                     f"{_f(max(row.values) if row.values else None)} | {_f(row.paper)} | {row.rank or ''} | "
                     f"{row.paper_rank or ''} |")
    lines.append("")
    compared = sum(1 for r in res.rows if r.rank is not None and r.paper_rank is not None)
    if res.kendall_tau is not None:
        lines.append(f"Rank agreement with the paper: Kendall tau-b = {res.kendall_tau:.3f} over {compared} variants.")
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
    header = ["variant", "sweep", "x", "n", "mean", "std", "min", "max", "paper", "rank", "paper_rank",
              "failed", "disabled"]
    rows = [[r.name, r.sweep or "", "" if r.x is None else r.x, r.n, _f(r.mean, 6), _f(r.std, 6),
             _f(min(r.values) if r.values else None, 6), _f(max(r.values) if r.values else None, 6),
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
    written = {"markdown": out / RESULTS_MD, "csv": out / RESULTS_CSV, "runs_csv": out / RUNS_CSV}
    write_text_atomic(written["markdown"], markdown_table(res))
    write_text_atomic(written["csv"], results_csv(res))
    write_text_atomic(written["runs_csv"], runs_csv(res))
    if plots:
        from nvr.ablation.plots import write_plots

        written.update(write_plots(res, plans, out))
    if spec.fn_report is not None:  # filters over cached tables: no run needs to have finished
        from nvr.ablation.false_negatives import write_fn_reports

        written.update(write_fn_reports(spec, plots=plots))
    return written
