"""nvr ablate: spec parsing, grid expansion, command building, resumable execution, results table and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from nvr.ablation.results import kendall_tau, summarize, write_report
from nvr.ablation.runner import (
    FAILED_FILE,
    RESULT_FILE,
    RunFailedError,
    RunPlan,
    fit_argv,
    inprocess_launcher,
    plan_runs,
    read_series,
    run_grid,
    shard_plans,
    subprocess_launcher,
    summarize_run,
)
from nvr.ablation.spec import load_spec, parse_spec
from nvr.utils.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]


def _base_yaml(path: Path, model: Path, beir: Path, cache: Path, logger: dict | None = None) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_checkpointing": False},
        "model": {"embedder": {"model_name_or_path": str(model), "pooling": "mean"}, "temperature": 0.05,
                  "lr": 1e-3, "warmup_steps": 0},
        "data": {"mining": {"data": {"beir_dir": str(beir), "split": "train"},
                            "teachers": [{"name": "tiny", "kind": "dense", "model_name_or_path": str(model)}],
                            "num_negatives": 2, "depth": 20, "max_depth": 40, "cache_dir": str(cache)},
                 "num_negatives": 2, "batch_size": 4, "eval_sets": [{"name": "tiny", "path": str(beir)}]},
    }
    if logger is not None:
        cfg["trainer"]["logger"] = logger
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _spec(base: Path, out: Path, **extra) -> dict:
    return {
        "name": "mini", "base_config": str(base), "output_dir": str(out), "seeds": [0, 1],
        "variants": [
            {"name": "naive", "overrides": {"data.mining.filter.method": "naive_topk"}},
            {"name": "naive-lr", "overrides": {"data": {"mining": {"filter": {"method": "naive_topk"}}},
                                               "model.lr": 0.01}},
            {"name": "random", "disabled": "needs a random-negative sampler"},
        ],
        "sweeps": [{"name": "percpos", "key": "data.mining.filter.perc", "values": [0.9, 0.95],
                    "overrides": {"data.mining.filter.method": "topk_percpos"}, "paper": {0.95: 0.5856}}],
        "paper": {"naive": 0.5407, "random": 0.5248, "percpos=0.9": 0.58},
        "histograms": ["naive", "percpos=0.95"],
        **extra,
    }


# ---------------------------------------------------------------------------------------------------- spec
def test_spec_expands_sweeps_and_attaches_paper_numbers(tmp_path) -> None:
    spec = parse_spec(_spec(tmp_path / "base.yaml", tmp_path / "out"))
    names = [v.name for v in spec.all_variants()]
    assert names == ["naive", "naive-lr", "random", "percpos=0.9", "percpos=0.95"]
    point = spec.variant("percpos=0.95")
    assert point.overrides == {"data.mining.filter.method": "topk_percpos", "data.mining.filter.perc": 0.95}
    assert (point.sweep, point.x, point.paper) == ("percpos", 0.95, 0.5856)
    assert spec.variant("percpos=0.9").paper == 0.58  # top-level paper entry for a sweep point
    assert spec.variant("naive-lr").overrides == {"data.mining.filter.method": "naive_topk", "model.lr": 0.01}
    assert spec.variant("random").disabled and spec.variant("random").paper == 0.5248
    assert spec.seed_keys == ["seed_everything", "data.seed"]


@pytest.mark.parametrize(("change", "key"), [
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variants"),
    ({"variants": [{"name": "a b"}]}, "variants[0].name"),
    ({"variants": [{"name": "a", "overides": {}}]}, "variants[0].overides"),
    ({"sweeps": [{"name": "s", "key": "x.y", "values": [1], "paper": {2: 0.5}}]}, "sweeps[0].paper"),
    ({"seeds": []}, "seeds"),
    ({"histograms": ["nope"]}, "histograms"),
    ({"select": "last"}, "select"),
    ({"bogus": 1}, "bogus"),
])
def test_spec_errors_name_the_key(tmp_path, change, key) -> None:
    raw = {**_spec(tmp_path / "b.yaml", tmp_path / "o"), "histograms": [], "paper": {}, **change}
    with pytest.raises(ConfigError) as err:
        parse_spec(raw)
    assert err.value.key == key


def test_load_spec_reports_yaml_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseeds: [0\nvariants: []\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_spec(bad)
    assert err.value.path == str(bad) and err.value.line is not None


# --------------------------------------------------------------------------------------------- planning
def test_plan_runs_shares_mined_sets_and_builds_the_fit_command(tmp_path) -> None:
    base = _base_yaml(tmp_path / "base.yaml", tmp_path / "m", tmp_path / "b", tmp_path / "c",
                      logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                              "init_args": {"save_dir": "tb"}})
    spec = parse_spec(_spec(base, tmp_path / "out"))
    plans = plan_runs(spec)
    assert [p.run_id for p in plans] == [f"{v}/seed-{s}" for v in ("naive", "naive-lr", "percpos=0.9",
                                                                      "percpos=0.95") for s in (0, 1)]
    mined = {p.run_id: p.mined_dir for p in plans}
    assert mined["naive/seed-0"] == mined["naive/seed-1"] == mined["naive-lr/seed-0"]  # lr does not change mining
    assert len({mined["naive/seed-0"], mined["percpos=0.9/seed-0"], mined["percpos=0.95/seed-0"]}) == 3

    plan = next(p for p in plans if p.run_id == "percpos=0.95/seed-1")
    argv = fit_argv(spec, plan, attempt=2)
    pairs = dict(zip(argv[1::2], argv[2::2]))
    assert argv[0] == "fit" and pairs["--config"] == str(base)
    assert pairs["--data.mining.filter.perc"] == "0.95" and pairs["--data.mining.filter.method"] == "topk_percpos"
    assert pairs["--seed_everything"] == "1" and pairs["--data.seed"] == "1"
    assert pairs["--data.mined_dir"] == str(plan.mined_dir)
    assert pairs["--trainer.default_root_dir"] == str(plan.run_dir)
    loggers = json.loads(pairs["--trainer.logger"])
    assert loggers[0]["init_args"] == {"save_dir": str(plan.run_dir), "name": "logs", "version": "attempt-2"}
    assert loggers[1]["class_path"].endswith("TensorBoardLogger")  # the base config's logger is kept

    per_seed = plan_runs(parse_spec(_spec(base, tmp_path / "out", seed_keys=["seed_everything",
                                                                             "data.mining.seed"])))
    assert per_seed[0].mined_dir != per_seed[1].mined_dir  # a mining seed key mines once per seed
    with pytest.raises(ConfigError):
        plan_runs(spec, variants=["nope"])

    shards = [shard_plans(plans, i, 3) for i in range(3)]
    assert sorted(p.run_id for s in shards for p in s) == sorted(p.run_id for p in plans)
    for shard in shards:  # a mined set is never split across machines
        others = [p.mined_dir for s in shards if s is not shard for p in s]
        assert not {p.mined_dir for p in shard} & set(others)


def _write_metrics(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    keys = ["epoch", "step", "train/loss", "val/ndcg@10"]
    with open(folder / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in keys} for r in rows)


def test_read_series_merges_resumed_attempts_and_summarizes(tmp_path) -> None:
    spec = parse_spec(_spec(tmp_path / "b.yaml", tmp_path / "o", select="best"))
    run = tmp_path / "run"
    _write_metrics(run / "logs" / "attempt-0", [
        {"epoch": 0, "step": s, "train/loss": 3.0 - s} for s in range(5)] + [
        {"epoch": 0, "step": 1, "val/ndcg@10": 0.30}, {"epoch": 0, "step": 3, "val/ndcg@10": 0.50}])
    _write_metrics(run / "logs" / "attempt-1", [  # resumed from the step-3 checkpoint
        {"epoch": 0, "step": s, "train/loss": 1.0 / (s + 1)} for s in (3, 4, 5)] + [
        {"epoch": 0, "step": 5, "val/ndcg@10": 0.40}])
    series = read_series(run)
    assert [s for s, _ in series["train/loss"]] == [0, 1, 2, 3, 4, 5]
    assert series["train/loss"][3][1] == pytest.approx(0.25)
    assert series["val/ndcg@10"] == [(1, 0.30), (5, 0.40)]
    plan = RunPlan(spec.variants[0], 0, run, None, {})
    result = summarize_run(spec, plan, series)
    assert (result["value"], result["final"], result["best"], result["best_step"]) == (0.40, 0.40, 0.40, 5)
    with pytest.raises(RunFailedError, match="never logged"):
        summarize_run(spec, plan, {"train/loss": [(0, 1.0)]})


# ---------------------------------------------------------------------------------------------- results
def test_kendall_tau_and_summary_ranks(tmp_path) -> None:
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert kendall_tau([1.0], [2.0]) is None
    spec = parse_spec(_spec(tmp_path / "b.yaml", tmp_path / "o"))
    records = [{"variant": "naive", "seed": 0, "value": 0.2}, {"variant": "naive", "seed": 1, "value": 0.4},
               {"variant": "percpos=0.95", "seed": 0, "value": 0.5}, {"variant": "percpos=0.9", "seed": 0,
                                                                      "value": 0.45}]
    res = summarize(spec, records, [{"variant": "percpos=0.9", "seed": 1, "run_dir": "x"}])
    rows = {r.name: r for r in res.rows}
    assert rows["naive"].mean == pytest.approx(0.3) and rows["naive"].std == pytest.approx(0.1414213, abs=1e-6)
    assert rows["percpos=0.95"].std is None and rows["percpos=0.9"].failed_seeds == [1]
    assert [rows[n].rank for n in ("percpos=0.95", "percpos=0.9", "naive")] == [1, 2, 3]
    assert [rows[n].paper_rank for n in ("percpos=0.95", "percpos=0.9", "naive", "random")] == [1, 2, 3, 4]
    assert res.kendall_tau == pytest.approx(1.0)


def test_report_metrics_and_fn_columns_line_up_with_the_metric(tmp_path) -> None:
    from nvr.ablation.results import markdown_table, results_csv

    spec = parse_spec(_spec(tmp_path / "b.yaml", tmp_path / "o", report_metrics=["val/ood/ndcg@10"]))
    records = [{"variant": "naive", "seed": s, "value": v, "metrics_at_final": {"val/ood/ndcg@10": o}}
               for s, v, o in ((0, 0.2, 0.1), (1, 0.4, 0.3))]
    records.append({"variant": "percpos=0.95", "seed": 0, "value": 0.5, "metrics_at_final": {}})  # not logged
    res = summarize(spec, records)
    rows = {r.name: r for r in res.rows}
    assert rows["naive"].extra == {"val/ood/ndcg@10": [0.1, 0.3]} and rows["percpos=0.95"].extra == {}
    text = markdown_table(res, {"naive": {"fn_rate": 0.125, "hardness": 0.5}})
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert header.split(" | ")[5:8] == ["val/ood/ndcg@10", "FN rate", "hardness"]
    naive = next(line for line in text.splitlines() if line.startswith("| naive |")).split(" | ")
    assert naive[5:8] == ["0.2000 ± 0.1414", "0.1250", "0.5000"]
    percpos = next(line for line in text.splitlines() if line.startswith("| percpos=0.95 |")).split(" | ")
    assert percpos[5:8] == ["", "", ""]  # no logged value, no fn row
    assert "FN rate" not in markdown_table(res)  # no fn report: no FN columns
    table = list(csv.DictReader(results_csv(res).splitlines()))
    assert table[0]["val/ood/ndcg@10 mean"] == "0.200000" and table[0]["val/ood/ndcg@10 std"] == "0.141421"
    with pytest.raises(ConfigError, match="report_metrics"):
        parse_spec(_spec(tmp_path / "b.yaml", tmp_path / "o", report_metrics=["val/ndcg@10"]))


# ------------------------------------------------------------------------------------------- launchers
def test_subprocess_launcher_logs_output_and_exit_code(tmp_path) -> None:
    log = tmp_path / "fit.log"
    assert subprocess_launcher(["--help"], log, 60) == 0
    assert "usage: nvr" in log.read_text(encoding="utf-8")
    assert subprocess_launcher(["no-such-command"], log, 60) == 2
    assert "unknown command" in log.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ end to end
def test_miniature_grid_end_to_end_and_resume(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys) -> None:
    base = _base_yaml(tmp_path / "base.yaml", tiny_bert_dir, tiny_beir_dir, tmp_path / "cache")
    raw = _spec(base, tmp_path / "out")
    raw["variants"] = [raw["variants"][0], {"name": "broken", "overrides": {"data.mining.filter.perc": 5.0}}]
    raw["sweeps"][0]["values"] = [0.95]
    raw["paper"] = {"naive": 0.5407}
    spec = parse_spec(raw)
    calls: list[list[str]] = []

    def launcher(argv, log_path, timeout_s):
        calls.append(argv)
        return inprocess_launcher(argv, log_path, timeout_s)

    plans = plan_runs(spec, variants=["naive", "percpos=0.95"])
    outcomes = run_grid(spec, plans, launcher=launcher, echo=lambda _: None)
    assert [o.status for o in outcomes] == ["ok"] * 4, [o.error for o in outcomes]
    for o in outcomes:
        assert 0.0 <= o.result["value"] <= 1.0 and o.result["final_step"] >= 1
        assert (o.plan.run_dir / RESULT_FILE).is_file() and (o.plan.mined_dir / "mined.jsonl").is_file()
    assert len({o.plan.mined_dir for o in outcomes}) == 2

    broken = run_grid(spec, plan_runs(spec, variants=["broken"], seeds=[0]), launcher=launcher, echo=lambda _: None)
    assert broken[0].status == "failed" and "filter.perc" in broken[0].error
    assert (broken[0].plan.run_dir / FAILED_FILE).is_file()

    calls.clear()
    again = run_grid(spec, plans, launcher=launcher, echo=lambda _: None)
    assert calls == [] and [o.status for o in again] == ["done"] * 4
    assert [o.result["value"] for o in again] == [o.result["value"] for o in outcomes]

    written = write_report(spec)
    assert {"markdown", "csv", "runs_csv", "sweeps", "histograms", "loss_curves"} <= set(written)
    for kind in ("sweeps", "histograms", "loss_curves"):
        assert written[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = written["markdown"].read_text(encoding="utf-8")
    assert "| naive | 2 |" in table and "0.5407" in table and "broken seed 0" in table
    assert "| random | 0 | not run" not in table  # not in this spec any more
    with open(written["csv"], encoding="utf-8") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    expected = sum(o.result["value"] for o in outcomes if o.plan.variant.name == "naive") / 2
    assert float(rows["naive"]["mean"]) == pytest.approx(expected, abs=1e-6)
    assert rows["naive"]["n"] == "2" and rows["broken"]["failed"] == "1"

    from nvr.cli.ablate import main as ablate_main

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert ablate_main(["--config", str(spec_file), "--dry_run", "--variants", "naive,percpos=0.95"]) == 0
    printed = capsys.readouterr().out
    assert "[done] naive/seed-0" in printed and "[done] percpos=0.95/seed-1" in printed
    # the dry run checks each variant against the nvr fit schema: the broken one is refused before any run
    with pytest.raises(ConfigError, match=r"overrides\.data\.mining\.filter\.perc.*variant 'broken'.*\(0, 2\]"):
        ablate_main(["--config", str(spec_file), "--dry_run", "--variants", "naive,broken"])


def test_shipped_ablation_configs_parse_and_plan() -> None:
    folder = REPO / "configs" / "ablations"
    specs = sorted(folder.glob("*.yaml"))
    assert len(specs) >= 6
    for path in specs:
        spec = load_spec(path)
        assert spec.all_variants() and spec.seeds, path
        for base in spec.base_config:
            assert (REPO / base).is_file(), f"{path}: {base}"


def test_plan_mined_dir_is_content_addressed(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    """Editing the corpus (or retraining the teacher in place) gives the grid a new mined set, as in `nvr fit`."""
    import shutil

    beir = tmp_path / "beir"
    shutil.copytree(tiny_beir_dir, beir)
    base = _base_yaml(tmp_path / "base.yaml", tiny_bert_dir, beir, tmp_path / "cache")
    spec = parse_spec(_spec(base, tmp_path / "out"))
    before = {p.run_id: p.mined_dir for p in plan_runs(spec)}
    assert before == {p.run_id: p.mined_dir for p in plan_runs(spec)}  # stable while nothing changes
    with open(beir / "corpus.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"_id": "extra", "title": "", "text": "wing lift extra document"}\n')
    after = {p.run_id: p.mined_dir for p in plan_runs(spec)}
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)
    assert len(set(after.values())) == len(set(before.values()))  # variants still share mined sets as before


@pytest.mark.parametrize("table", ["table1", "table2", "table3"])
def test_scifact_specs_parse_every_variant_with_the_fit_parser(table, capsys) -> None:
    """Spec-level smoke test of the issue-15 grids (the runs themselves are hours of CPU: never in CI)."""
    from nvr.cli.ablate import main as ablate_main

    path = REPO / "configs" / "ablations" / f"scifact_{table}.yaml"
    spec = load_spec(path)
    assert len(spec.seeds) >= 3 and spec.metric == "val/scifact/ndcg@10"
    assert spec.report_metrics == ["val/cranfield/ndcg@10"] and spec.fn_report is not None
    assert spec.output_dir == f"docs/results/scifact/{table}"
    base = yaml.safe_load((REPO / spec.base_config[0]).read_text(encoding="utf-8"))
    assert base["trainer"]["precision"] == "32-true"  # fixed: results from different machines must compare
    assert ablate_main(["--config", str(path), "--dry_run"]) == 0
    planned = capsys.readouterr().out
    own = [v for v in spec.all_variants() if v.borrowed is None]
    assert planned.count("--seed_everything") == len(own) * len(spec.seeds)  # borrowed rows are run by their specs
    assert planned.count("[borrowed]") == (len(spec.all_variants()) - len(own)) * len(spec.seeds)
