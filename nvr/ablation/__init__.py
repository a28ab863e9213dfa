"""Paper-ablation harness: specs (``spec``), the run grid (``runner``), results tables (``results``), plots."""

from __future__ import annotations

from nvr.ablation.results import AblationResults, VariantSummary, collect, summarize, write_report
from nvr.ablation.runner import RunOutcome, RunPlan, execute_run, plan_runs, run_grid
from nvr.ablation.spec import AblationSpec, Sweep, Variant, load_spec, parse_spec

__all__ = [
    "AblationResults", "AblationSpec", "RunOutcome", "RunPlan", "Sweep", "Variant", "VariantSummary", "collect",
    "execute_run", "load_spec", "parse_spec", "plan_runs", "run_grid", "summarize", "write_report",
]
