from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from nvr.cli.main import main as nvr_main
from nvr.config.mining import DataSource, FilterConfig, MineConfig, SamplerConfig, TeacherConfig
from nvr.data.beir import load_qrels
from nvr.mining.export import to_flagembedding, to_sentence_transformers
from nvr.mining.mined_set import load_mined
from nvr.mining.pipeline import content_config, mine, mining_fingerprint
from nvr.mining.presets import PRESETS, get_preset
from nvr.mining.report import summary_lines
from nvr.utils.errors import ConfigError, InputError, OutputExistsError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mine_cache")


def make_cfg(beir: Path, bert: Path, out: Path, cache: Path, **kw) -> MineConfig:
    teachers = [TeacherConfig(name="tiny", model_name_or_path=str(bert), device="cpu", batch_size=16)]
    if kw.pop("bm25", False):
        teachers.append(TeacherConfig(name="bm25", kind="bm25"))
    base = dict(
        data=DataSource(beir_dir=str(beir)), teachers=teachers, output_dir=str(out), cache_dir=str(cache),
        depth=8, max_depth=40, filter=FilterConfig(method="topk_percpos", perc=0.99),
    )
    return MineConfig(**{**base, **kw})


def train_positives(beir: Path) -> dict[str, set[str]]:
    return {q: set(d) for q, d in load_qrels(beir / "qrels" / "train.tsv").items()}


def test_end_to_end_single_teacher(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path):
    cfg = make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "out", cache_dir, audit=True)
    out = mine(cfg)
    assert {p.name for p in out.iterdir()} == {"mined.jsonl", "manifest.json", "report.json", "report.png",
                                               "audit.parquet"}
    examples = load_mined(out)
    positives = train_positives(tiny_beir_dir)
    assert [e.query_id for e in examples] == list(positives)  # all 10 train queries, query-file order
    for ex in examples:
        assert set(ex.positive_ids) == positives[ex.query_id]
        assert not set(ex.negative_ids) & positives[ex.query_id]
        assert len(ex.negative_ids) <= 4 and len(set(ex.negative_ids)) == len(ex.negative_ids)
        assert set(ex.negative_teachers) <= {"tiny"}
        assert ex.negative_scores == sorted(ex.negative_scores, reverse=True)
        # PercPos 0.99 against the min positive score, strictly below
        assert all(s < 0.99 * min(ex.positive_scores) + 1e-6 for s in ex.negative_scores)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["written"] == 10 and counts["widened"] > 0 and counts["recovered_by_widening"] > 0
    assert counts["negatives"] == sum(len(e.negative_ids) for e in examples)
    assert "output_dir" not in manifest["config"] and manifest["teachers"][0]["name"] == "tiny"
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["widened"] == counts["widened"]
    assert report["teachers"]["tiny"]["rule_counts"]["above_perc"] > 0
    audit = pq.read_table(out / "audit.parquet").to_pylist()
    assert sum(r["selected"] for r in audit) == counts["negatives"]
    assert {r["reason"] for r in audit} >= {"kept", "positive", "above_perc"}


def test_rerun_is_byte_identical_and_overwrite_is_refused(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path):
    a = mine(make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "a", cache_dir))
    # fresh cache: the embeddings and tables are recomputed, the output must not change
    b = mine(make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "b", tmp_path / "fresh_cache"))
    for name in ("mined.jsonl", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    before = (a / "mined.jsonl").read_bytes()
    with pytest.raises(OutputExistsError):
        mine(make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "a", cache_dir, num_negatives=2))
    assert (a / "mined.jsonl").read_bytes() == before
    mine(make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "a", cache_dir, num_negatives=2, overwrite=True))
    assert max(len(e.negative_ids) for e in load_mined(a)) == 2


def test_drop_policy_never_writes_short_rows(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path):
    out = mine(make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "o", cache_dir, shortfall="drop", audit=True))
    examples = load_mined(out)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert all(len(e.negative_ids) == 4 for e in examples)
    assert counts["dropped_short"] == 10 - len(examples) > 0 and counts["kept_short"] == 0
    audit = pq.read_table(out / "audit.parquet").to_pylist()
    assert {r["query_id"] for r in audit if r["query_written"]} == {e.query_id for e in examples}
    assert len({r["query_id"] for r in audit}) == 10


@pytest.mark.parametrize("ensemble", ["intra_sample_nodedup", "intra_sample_dedup", "cross_sample"])
def test_bm25_ensembles(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path, ensemble):
    cfg = make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "o", cache_dir, bm25=True, ensemble=ensemble,
                   filter=FilterConfig(method="naive_topk"))
    examples = load_mined(mine(cfg))
    positives = train_positives(tiny_beir_dir)
    teachers = [set(e.negative_teachers) for e in examples]
    for ex in examples:
        assert not set(ex.negative_ids) & positives[ex.query_id]
    if ensemble == "cross_sample":
        assert all(len(t) == 1 for t in teachers) and set().union(*teachers) == {"tiny", "bm25"}
    else:
        # round robin: tiny, bm25, tiny, bm25 (both have >= 2 survivors under naive top-k)
        assert all(e.negative_teachers == ["tiny", "bm25", "tiny", "bm25"] for e in examples)
        dups = [len(e.negative_ids) - len(set(e.negative_ids)) for e in examples]
        assert (sum(dups) == 0) if ensemble == "intra_sample_dedup" else True


def test_intra_nodedup_keeps_agreed_duplicates_dedup_removes_them(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path):
    def run(ensemble: str) -> list:
        cfg = make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / ensemble, cache_dir, bm25=True, ensemble=ensemble,
                       filter=FilterConfig(method="naive_topk"), num_negatives=8, depth=20)
        return load_mined(mine(cfg))

    nodedup, dedup = run("intra_sample_nodedup"), run("intra_sample_dedup")
    assert sum(len(e.negative_ids) - len(set(e.negative_ids)) for e in nodedup) > 0
    assert all(len(e.negative_ids) == len(set(e.negative_ids)) for e in dedup)


def test_exports(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path):
    out = mine(make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "o", cache_dir))
    examples = load_mined(out)
    st = to_sentence_transformers(out, tmp_path / "st.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "st.jsonl").read_text().splitlines()]
    full = [e for e in examples if len(e.negative_ids) == 4]
    assert st["rows"] == len(rows) == sum(len(e.positive_ids) for e in full)
    assert st["dropped_short_rows"] == sum(len(e.positive_ids) for e in examples if len(e.negative_ids) < 4)
    assert list(rows[0]) == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4"]
    assert rows[0]["anchor"] == full[0].query and rows[0]["negative_1"] == full[0].negative_texts[0]
    with pytest.raises(OutputExistsError):
        to_sentence_transformers(out, tmp_path / "st.jsonl")
    flag = to_flagembedding(out, tmp_path / "fe.jsonl", prompt="Represent this query: ")
    fe = [json.loads(line) for line in (tmp_path / "fe.jsonl").read_text().splitlines()]
    with_negatives = [e for e in examples if e.negative_ids]  # FlagEmbedding divides by len(neg): others dropped
    assert flag["rows"] == len(fe) == len(with_negatives) and flag["with_scores"]
    assert flag["dropped_without_negatives"] == len(examples) - len(with_negatives)
    assert set(fe[0]) == {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt"}
    assert fe[0]["neg"] == with_negatives[0].negative_texts
    assert fe[0]["neg_scores"] == with_negatives[0].negative_scores


def _write_yaml(path: Path, beir: Path, bert: Path, out: Path, cache: Path, **extra) -> Path:
    cfg = {
        "data": {"beir_dir": str(beir)},
        "teachers": [{"name": "tiny", "model_name_or_path": str(bert), "device": "cpu"}],
        "output_dir": str(out), "cache_dir": str(cache), "depth": 8, "max_depth": 40, **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_with_config_preset_and_export(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path, capsys):
    conf = _write_yaml(tmp_path / "c.yaml", tiny_beir_dir, tiny_bert_dir, tmp_path / "o", cache_dir)
    with pytest.raises(SystemExit) as exit_info:
        nvr_main(["mine", "--config", str(conf), "--preset", "naive_topk", "--export", "st"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "mined ->" in printed and "above_perc" in printed
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["config"]["filter"]["method"] == "naive_topk"
    assert manifest["counts"]["full"] == 10  # naive top-k leaves plenty of survivors
    assert (tmp_path / "o" / "sentence_transformers.jsonl").exists()
    # a flag after the preset overrides it
    with pytest.raises(SystemExit):
        nvr_main(["mine", "--config", str(conf), "--preset", "sampled_topk_10", "--sampler.window", "6",
                  "--output_dir", str(tmp_path / "o2")])
    sampler = json.loads((tmp_path / "o2" / "manifest.json").read_text())["config"]["sampler"]
    assert sampler == {"method": "sampled_topk", "window": 6, "temperature": 1.0}


@pytest.mark.parametrize(
    ("extra", "flags", "needle"),
    [
        ({"filter": {"percc": 0.9}}, [], "percc"),
        ({"colour": "red"}, [], "colour"),
        ({}, ["--filter.perc", "3"], "filter.perc"),
        ({}, ["--preset", "nope"], "preset"),
        ({"ensemble": "intra_sample_dedup", "sampler": {"method": "sampled_topk"}}, [], "sampler.method"),
    ],
)
def test_cli_config_errors_exit_2_naming_the_key(tiny_beir_dir, tiny_bert_dir, tmp_path, capsys, extra, flags, needle):
    conf = _write_yaml(tmp_path / "c.yaml", tiny_beir_dir, tiny_bert_dir, tmp_path / "o", tmp_path / "cache", **extra)
    with pytest.raises(SystemExit) as exit_info:
        nvr_main(["mine", "--config", str(conf), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_load_mined_reports_bad_rows_with_line(tmp_path):
    good = {"query_id": "q", "query": "x", "positives": [{"id": "d", "text": "t", "score": 0.5}],
            "negatives": [{"id": "n", "text": "u", "score": 0.1, "teacher": "a", "rank": 3}]}
    path = tmp_path / "mined.jsonl"
    bad_rank = {**good, "query_id": "q2", "negatives": [{**good["negatives"][0], "rank": "3"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad_rank) + "\n")
    with pytest.raises(InputError, match=r"mined.jsonl:2: negatives\[0\]: 'rank' must be int"):
        load_mined(tmp_path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(InputError, match="duplicate query_id 'q'"):
        load_mined(path)
    path.write_text(json.dumps({**good, "positives": []}) + "\n")
    with pytest.raises(InputError, match=":1: query 'q' has no positives"):
        load_mined(path)
    path.write_text(json.dumps(good) + "\n")
    [ex] = load_mined(path)
    assert (ex.negative_ranks, ex.negative_teachers, ex.positive_scores) == ([3], ["a"], [0.5])


def test_presets_match_the_paper():
    assert set(PRESETS) == {"naive_topk", "topk_shifted_10", "topk_abs_0.7", "topk_marginpos_0.05",
                            "topk_percpos_0.95", "sampled_topk_10", "top1_sampled_10"}
    f, s = get_preset("topk_percpos_0.95")
    assert (f.method, f.perc, s.method) == ("topk_percpos", 0.95, "topk")
    f, s = get_preset("top1_sampled_10")
    assert (f.method, s.method, s.window) == ("topk_percpos", "top1_sampled", 10)
    assert get_preset("topk_shifted_10")[0].shift == 10 and get_preset("topk_abs_0.7")[0].max_score == 0.7
    assert get_preset("naive_topk") != get_preset("topk_percpos_0.95")
    assert isinstance(get_preset("sampled_topk_10")[1], SamplerConfig)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("topk_percpos_0.9")


def test_fingerprint_ignores_output_location(tiny_beir_dir, tiny_bert_dir, tmp_path):
    cfg = make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "a", tmp_path / "c")  # the key hashes the real inputs
    moved = dataclasses.replace(cfg, output_dir=str(tmp_path / "b"), overwrite=True, cache_dir="x")
    assert mining_fingerprint(cfg) == mining_fingerprint(moved)
    assert mining_fingerprint(cfg) != mining_fingerprint(dataclasses.replace(cfg, seed=1))
    # the embedding shard size changes how the work is cut up, not what is mined
    resharded = dataclasses.replace(cfg, teachers=[dataclasses.replace(cfg.teachers[0], shard_size=7)])
    assert mining_fingerprint(resharded) == mining_fingerprint(cfg)
    assert "shard_size" not in content_config(resharded)["teachers"][0]
    from nvr.training.datamodule import mining_fingerprint as mined_set_key

    assert mined_set_key(resharded) == mined_set_key(cfg)


def _recording_build_tables(monkeypatch) -> list[tuple[int, int]]:
    """Patch the pipeline's ``build_tables`` to record (depth, number of query rows) of every call."""
    import nvr.mining.pipeline as pipeline

    calls: list[tuple[int, int]] = []
    real = pipeline.build_tables

    def recording(cfg, teachers, data, depth, rows=None):
        calls.append((depth, len(data.queries) if rows is None else len(rows)))
        return real(cfg, teachers, data, depth, rows)

    monkeypatch.setattr(pipeline, "build_tables", recording)
    return calls


def test_zero_negative_rows_are_kept_and_counted(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path, monkeypatch):
    calls = _recording_build_tables(monkeypatch)
    nothing_passes = FilterConfig(method="topk_abs", max_score=-2.0)  # below every cosine: 0 survivors
    out = mine(make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "o", cache_dir, filter=nothing_passes))
    assert calls == [(8, 10), (40, 10)]  # every query is short, so all are re-searched at max_depth
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["written"] == counts["kept_short"] == counts["kept_without_negatives"] == counts["empty"] == 10
    assert all(e.negative_ids == [] for e in load_mined(out))
    report = json.loads((out / "report.json").read_text())
    assert report["rows_without_negatives"] == 10 and report["short_rows"] == 10
    assert "written 10: 10 with fewer than k negatives, 10 of them with 0 (in-batch negatives only); dropped 0" in (
        summary_lines(report))


def test_no_widening_when_depth_already_covers_the_corpus(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path,
                                                          monkeypatch):
    calls = _recording_build_tables(monkeypatch)
    # 60 docs, 2 positives per query: depth 60 lists the whole corpus, and PercPos leaves < 58 survivors
    cfg = make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "o", cache_dir, depth=60, max_depth=100,
                   num_negatives=58)
    out = mine(cfg)
    assert calls == [(60, 10)]  # short queries were not re-searched: a deeper search cannot find more
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["widened"] == 0 and counts["kept_short"] == counts["short"] > 0
    assert counts["written"] == 10 and counts["kept_without_negatives"] == 0


def test_repo_configs_parse(monkeypatch):
    from nvr.cli.mine import parse_config

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    files = sorted((root / "configs" / "mine").glob("*.yaml"))
    assert len(files) >= 8
    methods = set()
    for f in files:
        cfg, _ = parse_config(["--config", str(f)])
        methods.add((cfg.filter.method, cfg.sampler.method, cfg.ensemble))
        assert Path(cfg.data.beir_dir).is_dir()
    assert len(methods) == len(files)
    assert np.isin(["naive_topk", "topk_shifted", "topk_abs", "topk_marginpos", "topk_percpos"],
                   [m[0] for m in methods]).all()


def test_pairs_file_mode_with_new_positive_text_and_max_queries(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"query_id": "p1", "query": "wing lift", "positive_ids": ["d0-1"]},
        {"query": "shock wave", "positive": "a brand new passage about shock wave supersonic flow"},
        {"query_id": "p3", "query": "rocket nozzle", "positive_ids": ["d5-0"]},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataSource(pairs_file=str(pairs), corpus_file=str(tiny_beir_dir / "corpus.jsonl"), max_queries=2)
    cfg = make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "o", cache_dir, data=data,
                   filter=FilterConfig(method="naive_topk"))
    examples = load_mined(mine(cfg))
    assert [e.query_id for e in examples][0] == "p1" and len(examples) == 2
    assert examples[1].positive_ids[0].startswith("pos:")
    assert examples[1].positive_texts == ["a brand new passage about shock wave supersonic flow"]
    assert all(len(e.negative_ids) == 4 for e in examples)


def test_cross_encoder_rescoring_changes_scores_and_provenance(tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path):
    from nvr.config.mining import CrossEncoderConfig

    ce = CrossEncoderConfig(model_name_or_path=str(tiny_bert_dir), device="cpu", max_length=64)
    cfg = make_cfg(tiny_beir_dir, tiny_bert_dir, tmp_path / "o", cache_dir, cross_encoder=ce,
                   filter=FilterConfig(method="naive_topk"))
    examples = load_mined(mine(cfg))
    assert {t for e in examples for t in e.negative_teachers} == {"tiny+ce"}
    for ex in examples:
        assert all(0.0 < s < 1.0 for s in ex.negative_scores)  # sigmoid of the CE logit
        assert ex.negative_scores == sorted(ex.negative_scores, reverse=True)  # rows re-sorted by CE score
