"""Borrowed ablation rows (``from: {spec, variant}``): another spec's finished runs reported and paired by seed in
this table without re-running them, and refused when those runs were made differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nvr.ablation.results import write_report
from nvr.ablation.runner import RESULT_FILE, describe_plan, plan_runs, run_grid, run_overrides, runnable
from nvr.ablation.spec import load_spec, parse_spec
from nvr.utils.errors import ConfigError


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _specs(tmp_path: Path, **ours) -> tuple[Path, dict]:
    """A methods spec (``methods.yaml``, seeds 0-2, three seed keys) and a raw teachers spec borrowing its PercPos."""
    base = _write(tmp_path / "base.yaml", {"seed_everything": 0, "model": {"lr": 0.001}})
    methods = _write(tmp_path / "methods.yaml", {
        "name": "methods", "base_config": str(base), "output_dir": str(tmp_path / "m"), "seeds": [0, 1, 2],
        "seed_keys": ["seed_everything", "data.seed", "data.mining.seed"], "overrides": {"data.num_negatives": 2},
        "variants": [{"name": "naive", "overrides": {"data.mining.filter.method": "naive_topk"}},
                     {"name": "percpos", "overrides": {"data.mining.filter.method": "topk_percpos"}}]})
    raw = {"name": "teachers", "base_config": str(base), "output_dir": str(tmp_path / "t"), "seeds": [0, 1],
           "overrides": {"data.num_negatives": 2},
           "variants": [{"name": "dense", "from": {"spec": str(methods), "variant": "percpos"}, "paper": 0.58},
                        {"name": "bm25", "overrides": {"data.mining.teachers": [{"name": "bm25", "kind": "bm25"}]},
                         "paper": 0.50}],
           "reference": "dense", **ours}
    return methods, raw


def _finish(plan, value: float) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"variant": plan.run_dir.parent.name, "seed": plan.seed, "value": value, "final": value}
    (plan.run_dir / RESULT_FILE).write_text(json.dumps(record), encoding="utf-8")


def test_a_borrowed_row_is_read_from_the_other_spec_paired_and_never_run_here(tmp_path) -> None:
    methods, raw = _specs(tmp_path)
    spec, other = parse_spec(raw), load_spec(methods)
    plans = plan_runs(spec)
    borrowed = [p for p in plans if p.borrowed_from]
    assert [(p.variant.name, p.seed) for p in borrowed] == [("dense", 0), ("dense", 1)]  # seeds of both specs
    theirs = {p.seed: p for p in plan_runs(other, ["percpos"])}
    for plan in borrowed:  # the other spec's folder and exact settings, its extra seed key included
        assert plan.run_dir == theirs[plan.seed].run_dir == tmp_path / "m" / "runs" / "percpos" / f"seed-{plan.seed}"
        assert plan.overrides == theirs[plan.seed].overrides and plan.overrides["data.mining.seed"] == plan.seed
    assert run_overrides(spec, spec.variant("dense"), 1) == theirs[1].overrides  # what the FN report mines with
    assert [p.variant.name for p in runnable(plans)] == ["bm25", "bm25"]
    assert "[borrowed] dense/seed-0  from" in describe_plan(spec, plans) and "not run yet" in describe_plan(spec, plans)

    for plan in theirs.values():
        _finish(plan, {0: 0.60, 1: 0.62, 2: 0.50}[plan.seed])
    ran: list[list[str]] = []

    def launcher(argv, log_path, timeout_s):
        ran.append(argv)
        run_dir = Path(argv[argv.index("--trainer.default_root_dir") + 1])
        _finish(next(p for p in plans if p.run_dir == run_dir), {0: 0.55, 1: 0.60}[int(run_dir.name[-1])])
        return 0

    outcomes = run_grid(spec, plans, launcher=launcher, echo=lambda _: None)
    assert [o.plan.variant.name for o in outcomes] == ["bm25", "bm25"] and len(ran) == 2
    assert not any(str(tmp_path / "m") in " ".join(argv) for argv in ran)
    table = write_report(spec, plots=False)["markdown"].read_text(encoding="utf-8")
    dense = next(line for line in table.splitlines() if line.startswith("| dense |")).split(" | ")
    assert dense[1] == "2" and dense[2] == "0.6100 ± 0.0141"  # seeds 0-1 only: seed 2 is not in this spec
    assert "- dense: `percpos` of `" in table
    paired = next(line for line in table.split("Paired")[1].splitlines() if line.startswith("| bm25 |"))
    assert "0: -0.0500, 1: -0.0200" in paired and "0 / 2" in paired


@pytest.mark.parametrize(("change", "message"), [
    ({"overrides": {"data.num_negatives": 4}}, r"overrides\.data\.num_negatives"),
    ({"seed_keys": ["seed_everything", "data.seed", "data.sampler_seed"]}, r"seed_keys \(data\.sampler_seed"),
    ({"metric": "val/other/ndcg@10"}, "metric"),
    ({"fit_args": ["--trainer.max_steps", "3"]}, "fit_args"),
    ({"base": {"seed_everything": 0, "model": {"lr": 0.01}}}, "base_config"),
])
def test_runs_made_differently_are_refused(tmp_path, change, message) -> None:
    methods, raw = _specs(tmp_path)
    if "base" in change:
        raw["base_config"] = str(_write(tmp_path / "other_base.yaml", change.pop("base")))
    raw.update(change)
    spec = parse_spec(raw)
    with pytest.raises(ConfigError, match=rf"variants\.dense\.from.*{message}.*would not compare"):
        plan_runs(spec)


def test_bad_sources_are_named(tmp_path) -> None:
    methods, raw = _specs(tmp_path)
    raw["variants"][0]["from"]["variant"] = "percpos-0.95"
    with pytest.raises(ConfigError, match=r"variants\.dense\.from\.variant.*no variant 'percpos-0.95'.*'naive'"):
        plan_runs(parse_spec(raw))
    raw["variants"][0]["from"] = {"spec": str(tmp_path / "missing.yaml"), "variant": "percpos"}
    with pytest.raises(ConfigError, match=r"variants\.dense\.from\.spec.*missing\.yaml"):
        plan_runs(parse_spec(raw))
    nested = _write(tmp_path / "teachers.yaml", _specs(tmp_path)[1])
    again = {**raw, "name": "again", "variants": [{"name": "x", "from": {"spec": str(nested), "variant": "dense"}}],
             "reference": None}
    with pytest.raises(ConfigError, match="itself borrowed: borrow from the spec that runs it"):
        plan_runs(parse_spec(again))


@pytest.mark.parametrize(("variant", "key"), [
    ({"name": "d", "from": {"spec": "a.yaml", "variant": "p"}, "overrides": {"model.lr": 1.0}},
     r"variants\[0\]\.overrides"),
    ({"name": "d", "from": {"spec": "a.yaml"}}, r"variants\[0\]\.from\.variant"),
    ({"name": "d", "from": {"spec": "a.yaml", "variant": "p", "seed": 1}}, r"variants\[0\]\.from\.seed"),
    ({"name": "d", "from": "a.yaml"}, r"variants\[0\]\.from"),
])
def test_malformed_from_entries_name_their_key(tmp_path, variant, key) -> None:
    _, raw = _specs(tmp_path)
    raw["variants"] = [variant]
    raw["reference"] = None
    with pytest.raises(ConfigError, match=key):
        parse_spec(raw)
