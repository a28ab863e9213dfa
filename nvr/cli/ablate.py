"""``nvr ablate``: run a paper-ablation grid (variants x seeds of ``nvr fit``) and write the results table + plots.

Examples::

    nvr ablate --config configs/ablations/table3_filters.yaml --dry_run      # print the planned runs
    nvr ablate --config configs/ablations/table3_filters.yaml                # run (resumable), then report
    nvr ablate --config spec.yaml --variants naive,percpos --seeds 0         # a subset
    nvr ablate --config spec.yaml --shard 0/4                                # this machine's quarter of the grid
    nvr ablate --config spec.yaml --report_only                              # re-draw table and plots
    nvr ablate --config spec.yaml -- --trainer.max_steps 20                  # extra args for every nvr fit
"""

from __future__ import annotations

import argparse
import sys

from nvr.ablation.results import write_report
from nvr.ablation.runner import LAUNCHERS, describe_plan, plan_runs, run_grid, runnable, shard_plans
from nvr.ablation.spec import load_spec
from nvr.ablation.validate import validate_plans
from nvr.utils.errors import ConfigError
from nvr.utils.preflight import check_cache_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvr ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="ablation spec YAML (see configs/ablations/)")
    parser.add_argument("--dry_run", action="store_true",
                        help="check every run's overrides against the nvr fit schema, print the runs and commands")
    parser.add_argument("--report_only", action="store_true", help="only (re)write results and plots")
    parser.add_argument("--variants", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to run (default: the spec's)")
    parser.add_argument("--shard", default=None, help="i/n: run only shard i of n (grouped by mined set)")
    parser.add_argument("--launcher", default="subprocess", choices=sorted(LAUNCHERS),
                        help="subprocess (isolated, default) or inprocess (debugging)")
    parser.add_argument("--timeout_s", type=float, default=None, help="wall-clock limit per run (subprocess)")
    parser.add_argument("--fail_fast", action="store_true", help="stop at the first failed run")
    parser.add_argument("--no_plots", action="store_true", help="write the tables only")
    return parser


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ConfigError("--seeds", f"expected comma-separated integers, got {text!r}") from err


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise ConfigError("--shard", f"expected i/n such as 0/4, got {text!r}")
    return int(index), int(count)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    spec = load_spec(args.config)
    if args.report_only:
        written = write_report(spec, plots=not args.no_plots)
        print("\n".join(f"{kind}: {path}" for kind, path in written.items()))
        return 0
    variants = [v for v in args.variants.split(",") if v] if args.variants else None
    plans = plan_runs(spec, variants, _seeds(args.seeds))
    shard = _shard(args.shard)
    if shard is not None:
        plans = shard_plans(plans, *shard)
    check_cache_dir(spec.output_dir, "output_dir")  # runs, mined sets and results all go here
    # a typo in an override fails here, not in every run
    validate_plans(spec, runnable(plans), extra, source=args.config)
    if args.dry_run:
        print(describe_plan(spec, plans, extra))
        return 0
    outcomes = run_grid(spec, plans, extra, fail_fast=args.fail_fast, timeout_s=args.timeout_s,
                        launcher=LAUNCHERS[args.launcher])
    written = write_report(spec, plots=not args.no_plots)
    print(written["markdown"].read_text(encoding="utf-8"))
    print("\n".join(f"{kind}: {path}" for kind, path in written.items()))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print(f"nvr ablate: {len(failed)} of {len(outcomes)} runs failed; re-run to retry them", file=sys.stderr)
        return 1
    return 0
