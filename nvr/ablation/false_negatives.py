"""The false-negative step of ``nvr ablate`` (spec key ``fn_report``): every mining variant's FN rate and hardness.

For each variant of the spec (overrides of its first seed), its effective ``data.mining`` section is run through
``nvr.mining.fn_report.build_fn_report``: the same held-back positives for every variant (same data, holdout and
seed), its own filter / calibration / sampler / ensemble, over candidate tables from the base config's cache (a
filter sweep shares one table per teacher; nothing is trained). One row per variant is the variant's
``configured`` row, so the table lines up with the ablation's NDCG table: does a filter that removes more false
negatives at equal hardness also train better? Variants that do not mine (a fixed ``data.mined_dir``) are listed
as skipped.

Output: ``<output_dir>/fn_report/`` with ``fn_report.json`` (rows + each variant's full report), ``fn_report.md``,
``fn_report.csv`` and ``fn_report.png`` (FN rate vs hardness, one labelled point per variant), written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvr.ablation.runner import config_get, effective_mining, load_base_config, run_overrides
from nvr.ablation.spec import AblationSpec, Variant
from nvr.config.mining import MineConfig
from nvr.utils.atomic import atomic_dir, atomic_file, write_json_atomic
from nvr.utils.errors import ConfigError

FOLDER = "fn_report"
COLUMNS = ("variant", "sweep", "x", "teacher", "fn_rate", "queries_with_fn", "hardness", "mean_rank", "negatives",
           "survivors_median", "short_share", "heldout_rejected")


def mining_config(mining: dict[str, Any], variant: str) -> MineConfig:
    """A variant's ``data.mining`` section as a ``MineConfig`` (errors name the variant)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--mining", type=MineConfig)
    try:
        return parser.instantiate(parser.parse_object({"mining": mining})).mining
    except ConfigError:
        raise
    except Exception as err:  # jsonargparse reports schema problems as its own errors
        raise ConfigError(f"variants[{variant}].data.mining", str(err).splitlines()[0]) from err


def variant_reports(spec: AblationSpec, variants: Sequence[Variant] | None = None) -> dict[str, Any]:
    """``{"rows": [...], "skipped": {variant: reason}, "reports": {variant: full fn report}}``."""
    from nvr.mining.fn_report import build_fn_report

    if spec.fn_report is None:
        raise ConfigError("fn_report", "the spec has no fn_report section")
    base = load_base_config(spec.base_config)
    mining = config_get(base, "data.mining")
    rows, skipped, reports = [], {}, {}
    for v in variants if variants is not None else [v for v in spec.all_variants() if not v.disabled]:
        overrides = run_overrides(spec, v, spec.seeds[0])
        own = {k: val for k, val in overrides.items() if k.startswith("data.mining.") or k == "data.mining"}
        section = effective_mining(mining, own)
        if overrides.get("data.mined_dir") or not section:
            skipped[v.name] = "no data.mining section (a fixed mined set)"
            continue
        report = build_fn_report(mining_config(section, v.name), spec.fn_report)
        reports[v.name] = report
        c = report["configured"]
        rows.append({"variant": v.name, "sweep": v.sweep, "x": v.x, **{k: c.get(k) for k in COLUMNS[3:]}})
    return {"format": "nvr-ablation-fn-report/1", "spec": spec.name, "fn_report_config": _plain(spec.fn_report),
            "rows": rows, "skipped": skipped, "reports": reports}


def _plain(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj)


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# False negatives per variant: {result['spec']}", ""]
    first = next(iter(result["reports"].values()), None)
    if first is not None:
        lines += [f"{first['queries']} queries, {first['heldout_positives']} held-back positives, K={first['k']}.", ""]
    lines += ["| variant | teacher | FN rate | queries w/ FN | hardness | mean rank | survivors median | < K "
              "| held-back rejected |", "|" + "---|" * 9]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['teacher']} | {_f(r['fn_rate'])} | {_f(r['queries_with_fn'], 3)} | "
                     f"{_f(r['hardness'])} | {_f(r['mean_rank'], 1)} | {_f(r['survivors_median'], 0)} | "
                     f"{_f(r['short_share'], 3)} | {_f(r['heldout_rejected'], 3)} |")
    for name, why in result["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | |")
    return "\n".join(lines) + "\n"


def csv_text(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in result["rows"]:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in COLUMNS])
    return buf.getvalue()


def plot(result: dict[str, Any], path: Path) -> None:
    """FN rate vs hardness (mean rank for ensembles, whose scores mix scales), one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rows = [r for r in result["rows"] if r["fn_rate"] is not None]
    use_rank = any(r["hardness"] is None for r in rows)
    for r in rows:
        x = r["mean_rank"] if use_rank else r["hardness"]
        if x is None:
            continue
        ax.scatter([x], [r["fn_rate"]], s=30)
        ax.annotate(r["variant"], (x, r["fn_rate"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if use_rank:
        ax.invert_xaxis()  # harder (lower rank) to the right, as with scores
    ax.set_xlabel("mean rank of the selected negatives" if use_rank else "hardness: mean teacher score of negatives")
    ax.set_ylabel("false-negative rate of the selected negatives")
    ax.set_title(f"{result['spec']}: false negatives vs hardness")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)


def kept_plot(folder: Path, result: dict[str, Any]) -> bytes | None:
    """The earlier ``fn_report.png`` when it was drawn from this very result (so ``--no_plots`` need not drop it)."""
    png, old = folder / "fn_report.png", folder / "fn_report.json"
    if not (png.is_file() and old.is_file()):
        return None
    try:
        same = json.loads(old.read_text(encoding="utf-8")) == json.loads(json.dumps(result, allow_nan=False))
    except (OSError, ValueError):
        return None
    return png.read_bytes() if same else None


def write_fn_reports(spec: AblationSpec, plots: bool = True) -> dict[str, Path]:
    """Compute ``variant_reports`` and write them into ``<output_dir>/fn_report/`` (replacing an earlier one).

    Without ``plots`` an earlier plot survives only if its data is unchanged; a stale one is removed.
    """
    result = variant_reports(spec)
    folder = Path(spec.output_dir) / FOLDER
    old_png = None if plots else kept_plot(folder, result)
    with atomic_dir(folder, overwrite=True) as tmp:
        write_json_atomic(tmp / "fn_report.json", result, ensure_ascii=False, allow_nan=False)
        with atomic_file(tmp / "fn_report.md") as fh:
            fh.write(markdown(result))
        with atomic_file(tmp / "fn_report.csv") as fh:
            fh.write(csv_text(result))
        if plots:
            plot(result, tmp / "fn_report.png")
        elif old_png is not None:
            (tmp / "fn_report.png").write_bytes(old_png)
    written = {"fn_report_markdown": folder / "fn_report.md", "fn_report_csv": folder / "fn_report.csv"}
    if plots or old_png is not None:
        written["fn_report_plot"] = folder / "fn_report.png"
    return written
