"""The false-negative report (issue 13 section 1): held-back positives, every filter over one cached table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nvr.config.mining import (
    CalibrateConfig,
    DataSource,
    FilterConfig,
    FnReportConfig,
    MineConfig,
    SamplerConfig,
    TeacherConfig,
)
from nvr.mining.filters import apply_filter
from nvr.mining.fn_report import (
    FILES,
    build_fn_report,
    evaluate_selection,
    holdout_positives,
    qrels_heldout,
    sweep_filters,
    write_fn_report,
)
from nvr.mining.selection import from_positions
from nvr.search.table import CandidateTable
from nvr.utils.errors import ConfigError, InputError
from tests._cli import cli_error, run_cli
from tests.test_false_negatives import write_beir

NAN = np.nan
WORDS = "apple river stone cloud forest engine silver garden winter candle".split()


def test_holdout_positives_split_each_multi_positive_query():
    positives = {"a": ["d1", "d2", "d3", "d4"], "b": ["d5"], "c": ["d6", "d7"]}
    h = holdout_positives(positives, 0.5, seed=3)
    assert h.query_ids == ["a", "c"]  # b has one positive: nothing to hold back
    for q in h.query_ids:
        assert set(h.anchors[q]) | set(h.held[q]) == set(positives[q]) and not set(h.anchors[q]) & set(h.held[q])
        assert h.anchors[q] and h.held[q]
    assert len(h.held["a"]) == 2 and len(h.held["c"]) == 1
    assert holdout_positives(positives, 0.5, seed=3) == h
    assert {tuple(holdout_positives(positives, 0.5, s).held["a"]) for s in range(12)} != {tuple(h.held["a"])}


def test_qrels_heldout_keeps_every_training_positive():
    positives = {"a": ["d1"], "b": ["d2"]}
    qrels = {"a": {"d1": 2, "d3": 1, "d4": 0}, "b": {"d2": 1}, "z": {"d9": 1}}
    h = qrels_heldout(positives, qrels, min_relevance=1)
    assert h.anchors == {"a": ["d1"]} and h.held == {"a": ["d3"]} and h.source == "qrels"
    assert qrels_heldout(positives, qrels, min_relevance=2).held == {}


def hand_table() -> CandidateTable:
    """Two queries over docs d0..d9; q0's held-back positive d2 is its top candidate, q1's (d8) is rank 3."""
    cand = np.array([[2, 3, 4, 5, 6], [7, 9, 8, 1, -1]], np.int64)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.85, 0.8, 0.75, 0.4, NAN]], np.float32)
    return CandidateTable(teacher="t", query_ids=["q0", "q1"], doc_ids=[f"d{i}" for i in range(10)],
                          cand_idx=cand, cand_scores=scores, cand_is_positive=np.zeros(cand.shape, bool),
                          pos_idx=np.array([[0], [1]], np.int64), pos_scores=np.array([[0.95], [0.8]], np.float32))


def select_top(table, cfg, k):
    from nvr.mining.samplers import select

    result = apply_filter(table, cfg)
    return result, from_positions(table, select(result.keep, table.cand_scores, SamplerConfig(), k, 0,
                                                table.query_ids))


def test_metrics_by_hand():
    table = hand_table()
    held = {"q0": ["d2"], "q1": ["d8"]}
    result, sel = select_top(table, FilterConfig(method="naive_topk"), k=2)
    m = evaluate_selection([table], [result], sel, held, k=2)
    # naive picks q0: d2 (held!), d3; q1: d7, d9
    assert (m["negatives"], m["fn_rate"], m["queries_with_fn"], m["fn_per_query"]) == (4, 0.25, 0.5, 0.5)
    assert m["hardness"] == pytest.approx((0.9 + 0.8 + 0.85 + 0.8) / 4, abs=1e-6)
    assert m["mean_rank"] == pytest.approx(1.5)
    assert (m["survivors_mean"], m["survivors_median"], m["short_share"]) == (4.5, 4.5, 0.0)
    assert (m["heldout_in_candidates"], m["heldout_rejected"]) == (2, 0.0)
    # PercPos 0.95: q0 threshold 0.9025 keeps everything (d2 0.9 < 0.9025); q1 threshold 0.76 drops d7, d9
    result, sel = select_top(table, FilterConfig(method="topk_percpos", perc=0.95), k=2)
    m = evaluate_selection([table], [result], sel, held, k=2)
    assert sel.neg_idx.tolist() == [[2, 3], [8, 1]]
    assert (m["fn_rate"], m["heldout_rejected"]) == (0.5, 0.0)
    # MarginPos 0.1: q0 bound 0.85 drops d2, q1 bound 0.7 drops d7, d9 and d8: both held-back positives caught,
    # and q1 is left with one survivor
    result, sel = select_top(table, FilterConfig(method="topk_marginpos", margin=0.1), k=2)
    m = evaluate_selection([table], [result], sel, held, k=2)
    assert sel.neg_idx.tolist() == [[3, 4], [1, -1]]
    assert (m["negatives"], m["fn_rate"], m["heldout_rejected"], m["short_share"]) == (3, 0.0, 1.0, 0.5)
    assert (m["survivors_mean"], m["survivors_median"]) == (2.5, 2.5)  # q0 keeps d3..d6, q1 keeps d1


def test_ensemble_metrics_union_teachers():
    a = hand_table()
    b = CandidateTable(**{**a.__dict__, "teacher": "u", "cand_idx": np.array([[3, 2, 4, 6, 5], [8, 7, 9, 1, -1]])})
    held = {"q0": ["d2"], "q1": ["d8"]}
    cfg = FilterConfig(method="topk_shifted", shift=1)
    (ra, sa), (rb, _) = select_top(a, cfg, 2), select_top(b, cfg, 2)
    m = evaluate_selection([a, b], [ra, rb], sa, held, k=2)
    # a's shift drops q0's d2 but b keeps it (its rank 2): not caught; q1's d8 is b's first (dropped) and a's
    # third (kept): not caught either
    assert m["heldout_in_candidates"] == 2 and m["heldout_rejected"] == 0.0
    assert m["hardness"] is None and set(m["hardness_by_teacher"]) == {"t", "u"}


def test_sweep_defaults_follow_the_teachers_scale():
    fn = FnReportConfig()
    anchors = np.array([0.4, 0.6, 0.8, NAN], np.float32)
    rows = sweep_filters(fn, anchors, FilterConfig(anchor="mean"))
    labels = [r[0] for r in rows]
    assert labels[0] == "naive" and len(labels) == len(set(labels))
    assert {r[3].anchor for r in rows} == {"mean"} and all(r[3].min_score is None for r in rows)
    abs_x = [r[2] for r in rows if r[1] == "abs"]
    assert abs_x == [round(float(np.quantile([0.4, 0.6, 0.8], q)), 4) for q in fn.abs_quantiles]
    margin_x = [r[2] for r in rows if r[1] == "marginpos"]
    assert margin_x == [round(s * 0.6, 4) for s in fn.margin_scales]
    scaled = sweep_filters(fn, anchors * 10, FilterConfig())
    assert [r[2] for r in scaled if r[1] == "marginpos"] == pytest.approx([x * 10 for x in margin_x], abs=1e-3)
    fixed = sweep_filters(FnReportConfig(max_scores=[0.5], margins=[0.1, 0.1]), anchors, FilterConfig())
    assert [r[0] for r in fixed if r[1] in ("abs", "marginpos")] == ["abs=0.5", "marginpos=0.1"]


def test_matched_hardness_interpolates_each_family():
    from nvr.mining.fn_report import matched_hardness

    def row(family, h, fn):
        return {"family": family, "config": f"{family}@{h}", "hardness": h, "fn_rate": fn, "short_share": 0.0}

    rows = [row("shifted", 0.4, 0.0), row("shifted", 0.6, 0.2), row("abs", 0.5, 0.3), row("abs", 0.7, 0.5),
            row("percpos", 0.45, 0.01), row("percpos", 0.55, 0.02), row("percpos", 0.8, 0.1)]
    m = matched_hardness(rows)
    assert [x["reference"] for x in m] == ["percpos@0.45", "percpos@0.55", "percpos@0.8"]
    assert m[0]["fn_rate"]["shifted"] == pytest.approx(0.05) and m[0]["fn_rate"]["abs"] is None
    assert m[1]["fn_rate"]["shifted"] == pytest.approx(0.15) and m[1]["fn_rate"]["abs"] == pytest.approx(0.35)
    assert m[2]["fn_rate"] == {"shifted": None, "abs": None, "percpos": 0.1}


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="fn.holdout"):
        FnReportConfig(holdout=1.0)
    with pytest.raises(ConfigError, match="fn.percs"):
        FnReportConfig(percs=[0.0])
    with pytest.raises(ConfigError, match="fn.shifts"):
        FnReportConfig(shifts=[-1])


# ------------------------------------------------------------------------------------------- pipeline (BM25)
def fn_beir(tmp_path: Path) -> Path:
    """Queries with 4 positives that share the query's words, so BM25 retrieves the held-back ones on top."""
    rng = np.random.default_rng(2)
    docs = {f"f{i}": " ".join(rng.choice(WORDS, size=6)) for i in range(30)}
    queries, qrels = {}, []
    for i, w in enumerate(WORDS[:5]):
        queries[f"q{i}"] = f"{w} {WORDS[i + 1]} {WORDS[i + 2]}"
        for j in range(4):
            docs[f"p{i}-{j}"] = f"{w} {WORDS[i + 1]} {WORDS[i + 2]} " + " ".join(rng.choice(WORDS, size=2))
            qrels.append((f"q{i}", f"p{i}-{j}", 1))
    queries["solo"] = "candle winter"
    qrels.append(("solo", "f0", 1))
    return write_beir(tmp_path / "beir", docs, queries, qrels)


def bm25_mine(tmp_path: Path, beir: Path, **kw) -> MineConfig:
    kw = {"num_negatives": 3, "depth": 20, "max_depth": 20, **kw}
    return MineConfig(data=DataSource(beir_dir=str(beir)), teachers=[TeacherConfig(name="bm25", kind="bm25")],
                      output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), **kw)


def test_report_measures_held_back_positives_that_mining_would_exclude(tmp_path):
    beir = fn_beir(tmp_path)
    cfg = bm25_mine(tmp_path, beir, filter=FilterConfig(method="topk_percpos", perc=0.95))
    assert cfg.data.exclude_judged  # mining excludes judged docs; the report must still see the held-back ones
    report = build_fn_report(cfg, FnReportConfig(holdout=0.5))
    assert report["queries"] == 5 and report["heldout_positives"] == 10 and report["anchor_positives"] == 10
    rows = {r["config"]: r for r in report["teachers"]["bm25"]["rows"]}
    naive = rows["naive"]
    assert naive["heldout_in_candidates"] == 10 and naive["fn_rate"] > 0.5  # held-back positives rank on top
    assert naive["heldout_rejected"] == 0.0
    # a positive-aware filter catches them: they score like the anchors
    assert rows["percpos=0.9"]["heldout_rejected"] > 0.5
    assert rows["percpos=0.9"]["fn_rate"] < naive["fn_rate"]
    assert report["configured"]["config"] == "configured"
    assert {"naive", "shifted=10", "percpos=0.95"} <= set(rows) and any(k.startswith("abs=") for k in rows)
    tables = sorted((tmp_path / "cache" / "tables").iterdir())
    again = build_fn_report(cfg, FnReportConfig(holdout=0.5))
    assert json.dumps(again, sort_keys=True) == json.dumps(report, sort_keys=True)  # deterministic
    assert sorted((tmp_path / "cache" / "tables").iterdir()) == tables  # the second run built no table
    other = build_fn_report(cfg, FnReportConfig(holdout=0.5, seed=9))
    assert other["teachers"] != report["teachers"] or other["seed"] != report["seed"]


def test_qrels_file_mode_and_errors(tmp_path):
    beir = fn_beir(tmp_path)
    second = tmp_path / "more.tsv"
    second.write_text("query-id\tcorpus-id\tscore\nq0\tf3\t1\nq0\tp0-0\t1\nq1\tf4\t0\n")
    cfg = bm25_mine(tmp_path, beir, filter=FilterConfig(method="naive_topk"))
    report = build_fn_report(cfg, FnReportConfig(qrels=str(second)))
    assert report["source"] == "qrels" and report["queries"] == 1 and report["heldout_positives"] == 1
    assert report["anchor_positives"] == 4 and report["qrels"]["name"] == "more.tsv"
    empty = tmp_path / "none.tsv"
    empty.write_text("query-id\tcorpus-id\tscore\nq0\tp0-0\t1\n")
    with pytest.raises(InputError, match="none.tsv"):
        build_fn_report(cfg, FnReportConfig(qrels=str(empty)))
    single = write_beir(tmp_path / "single", {"a": "apple", "b": "river", "c": "stone"}, {"q": "apple"},
                        [("q", "a", 1)])
    with pytest.raises(InputError, match=">= 2 positives"):
        build_fn_report(bm25_mine(tmp_path, single, num_negatives=1), FnReportConfig())


def test_configured_row_uses_the_calibration_of_the_run(tmp_path):
    beir = fn_beir(tmp_path)
    cal = FilterConfig(method="topk_percpos", calibrate=CalibrateConfig(value=0.9))
    report = build_fn_report(bm25_mine(tmp_path, beir, filter=cal), FnReportConfig())
    rec = report["teachers"]["bm25"]["calibration"]
    assert rec["parameter"] == "perc" and report["teachers"]["bm25"]["filter"]["perc"] == rec["chosen"]
    assert rec["multi_positive_queries"] == 5  # chosen on the full positives (mining's table), not the anchors


def test_written_report_files(tmp_path):
    beir = fn_beir(tmp_path)
    report = build_fn_report(bm25_mine(tmp_path, beir), FnReportConfig())
    folder = write_fn_report(report, tmp_path / "rep", title="tiny")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert json.loads((folder / "fn_report.json").read_text()) == report
    csv_lines = (folder / "fn_report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("teacher,config,family") and len(csv_lines) == 1 + len(
        report["teachers"]["bm25"]["rows"]) + 1
    assert "| naive |" in (folder / "fn_report.md").read_text()
    with pytest.raises(Exception, match="exists"):
        write_fn_report(report, folder)


# ------------------------------------------------------------------------------------------- CLI (tiny model)
def test_cli_mine_with_fn_report(tmp_path, tiny_bert_dir, tiny_beir_dir, capsys):
    out = tmp_path / "mined"
    args = ["mine", "--data.beir_dir", str(tiny_beir_dir), "--teachers", json.dumps([{
        "name": "tiny", "kind": "dense", "model_name_or_path": str(tiny_bert_dir), "query_max_length": 32,
        "passage_max_length": 32, "dtype": "float32"}]), "--output_dir", str(out), "--cache_dir",
        str(tmp_path / "cache"), "--num_negatives", "2", "--depth", "10", "--max_depth", "10"]
    code, _ = run_cli(*args, "--fn_report", "--fn.holdout", "0.5", "--fn.percs", "[0.9, 0.95]", capsys=capsys)
    assert code == 0
    folder = out / "fn_report"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    report = json.loads((folder / "fn_report.json").read_text())
    assert [r["config"] for r in report["teachers"]["tiny"]["rows"] if r["family"] == "percpos"] == [
        "percpos=0.9", "percpos=0.95"]
    embeddings = sorted((tmp_path / "cache" / "embeddings").iterdir())
    assert len(embeddings) == 2  # queries + passages, encoded once, shared by mining and the report
    # a second qrels file naming an extra relevant doc for one query: only that row is evaluated, yet all queries
    # are searched with mining's texts, so nothing is encoded again
    extra = tmp_path / "extra.tsv"
    extra.write_text("query-id\tcorpus-id\tscore\nq0-0\td1-0\t1\n")
    code, _ = run_cli(*args, "--overwrite", "true", "--fn_report", "--fn.qrels", str(extra), capsys=capsys)
    assert code == 0
    report = json.loads((folder / "fn_report.json").read_text())
    assert report["queries"] == 1 and report["source"] == "qrels"
    assert sorted((tmp_path / "cache" / "embeddings").iterdir()) == embeddings
    line = cli_error([*args, "--overwrite", "true", "--fn.holdout", "0.3"], capsys)
    assert "fn" in line and "--fn_report" in line


# ------------------------------------------------------------------------------------------- nvr ablate step
def ablation_spec(tmp_path: Path, beir: Path, fn_report) -> dict:
    import yaml

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"mining": {
        "data": {"beir_dir": str(beir)}, "teachers": [{"name": "bm25", "kind": "bm25"}], "num_negatives": 3,
        "depth": 20, "max_depth": 20, "cache_dir": str(tmp_path / "cache"),
        "filter": {"method": "topk_percpos", "perc": 0.95}}}}))
    return {"name": "fn", "base_config": str(base), "output_dir": str(tmp_path / "abl"), "seeds": [0],
            "fn_report": fn_report,
            "variants": [{"name": "naive", "overrides": {"data.mining.filter.method": "naive_topk"}},
                         {"name": "fixed", "overrides": {"data.mined_dir": str(tmp_path / "somewhere")}},
                         {"name": "calibrated", "overrides": {"data.mining.filter.calibrate": {"value": 0.9}}}],
            "sweeps": [{"name": "percpos", "key": "data.mining.filter.perc", "values": [0.8, 0.95]}]}


def test_ablation_report_step_rows_per_variant(tmp_path):
    from nvr.ablation.results import write_report
    from nvr.ablation.spec import parse_spec

    beir = fn_beir(tmp_path)
    spec = parse_spec(ablation_spec(tmp_path, beir, {"holdout": 0.5}))
    assert spec.fn_report == FnReportConfig(holdout=0.5)
    written = write_report(spec, plots=True)
    folder = tmp_path / "abl" / "fn_report"
    assert written["fn_report_markdown"] == folder / "fn_report.md" and (folder / "fn_report.png").is_file()
    result = json.loads((folder / "fn_report.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["naive", "calibrated", "percpos=0.8", "percpos=0.95"]
    assert "fixed" in result["skipped"]
    # every variant is measured on the same held-back positives, so the rows compare
    assert len({json.dumps(result["reports"][v]["teachers"]["bm25"]["rows"][0]) for v in rows}) == 1
    assert rows["naive"]["fn_rate"] > rows["percpos=0.8"]["fn_rate"]
    assert rows["percpos=0.8"]["x"] == 0.8 and rows["percpos=0.8"]["sweep"] == "percpos"
    cal = result["reports"]["calibrated"]["teachers"]["bm25"]["calibration"]
    assert cal["parameter"] == "perc" and cal["value"] == 0.9
    assert "| calibrated | bm25 |" in (folder / "fn_report.md").read_text()


def test_ablation_report_without_plots_keeps_only_a_current_fn_plot(tmp_path):
    from nvr.ablation.results import write_report
    from nvr.ablation.spec import parse_spec

    beir = fn_beir(tmp_path)
    raw = ablation_spec(tmp_path, beir, {"holdout": 0.5})
    png = tmp_path / "abl" / "fn_report" / "fn_report.png"
    write_report(parse_spec(raw), plots=True)
    drawn = png.read_bytes()
    assert "fn_report_plot" in write_report(parse_spec(raw), plots=False)
    assert png.read_bytes() == drawn  # same FN data: the plot still shows it
    raw["variants"] = raw["variants"][:1]  # the data changes: the old plot would be stale
    assert "fn_report_plot" not in write_report(parse_spec(raw), plots=False)
    assert not png.exists() and (png.parent / "fn_report.md").is_file()


@pytest.mark.parametrize(("value", "key"), [({"holdot": 0.5}, "fn_report.holdot"),
                                            ({"holdout": 2}, "fn_report.holdout"), ("yes", "fn_report")])
def test_ablation_spec_fn_report_errors(tmp_path, value, key):
    from nvr.ablation.spec import parse_spec

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_spec(ablation_spec(tmp_path, tmp_path, value))
    assert parse_spec(ablation_spec(tmp_path, tmp_path, True)).fn_report == FnReportConfig()
    assert parse_spec(ablation_spec(tmp_path, tmp_path, None)).fn_report is None
