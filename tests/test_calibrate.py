"""``filter.calibrate`` and per-teacher filters (issue 13 section 2): thresholds chosen from each teacher's own
positive scores, so one setting means the same on every score scale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nvr.config.mining import CalibrateConfig, DataSource, FilterConfig, MineConfig, TeacherConfig
from nvr.mining.calibrate import (
    calibrate_filter,
    calibration_pairs,
    holdout_count,
    holdout_split,
    resolve_filter,
)
from nvr.mining.filters import apply_filter, method_threshold
from nvr.mining.pipeline import mine, mining_fingerprint
from nvr.search.table import CandidateTable
from nvr.utils.errors import ConfigError
from nvr.utils.seeding import rng_for
from tests.test_false_negatives import write_beir

NAN = np.nan


def pos_table(pos_scores, teacher: str = "t", scale: float = 1.0) -> CandidateTable:
    """A table whose rows only matter through their positives (doc ids p<row>-<col>)."""
    pos = np.asarray(pos_scores, dtype=np.float32) * np.float32(scale)
    q, p = pos.shape
    doc_ids = [f"p{r}-{c}" for r in range(q) for c in range(p)] + ["x0", "x1"]
    pos_idx = np.where(np.isnan(pos), -1, np.arange(q * p).reshape(q, p))
    cand_idx = np.tile(np.array([q * p, q * p + 1], dtype=np.int64), (q, 1))
    return CandidateTable(teacher=teacher, query_ids=[f"q{r}" for r in range(q)], doc_ids=doc_ids,
                          cand_idx=cand_idx, cand_scores=np.full((q, 2), 0.1 * scale, np.float32),
                          cand_is_positive=np.zeros((q, 2), bool), pos_idx=pos_idx.astype(np.int64),
                          pos_scores=pos)


RNG = np.random.default_rng(0)
SCORES = np.round(RNG.uniform(0.3, 0.9, size=(40, 4)), 4).astype(np.float32)
SCORES[::5, 1:] = NAN  # some single-positive queries (never used by the gap-based targets)


def test_holdout_count_keeps_one_and_holds_one():
    assert [holdout_count(n, 0.5) for n in range(6)] == [0, 0, 1, 2, 2, 3]  # half up: 3 -> 2 (1.5 rounds up)
    for n in range(2, 12):
        for f in (0.01, 0.3, 0.5, 0.99):
            assert 1 <= holdout_count(n, f) <= n - 1


def test_holdout_split_is_seeded_and_ignores_input_order():
    docs = [f"d{i}" for i in range(7)]
    a = holdout_split(docs, 0.5, rng_for(3, "k", "q1"))
    b = holdout_split(list(reversed(docs)), 0.5, rng_for(3, "k", "q1"))
    assert a == b and len(a[1]) == 4 and set(a[0]) | set(a[1]) == set(docs) and not set(a[0]) & set(a[1])
    others = {tuple(holdout_split(docs, 0.5, rng_for(s, "k", "q1"))[1]) for s in range(20)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize("method", ["topk_percpos", "topk_marginpos", "topk_abs"])
@pytest.mark.parametrize("target", ["heldout_reject_rate", "positive_quantile"])
@pytest.mark.parametrize("value", [0.5, 0.8, 0.95])
def test_chosen_threshold_rejects_the_target_share(method, target, value):
    table = pos_table(SCORES)
    cfg = FilterConfig(method=method, calibrate=CalibrateConfig(target=target, value=value))
    resolved, record = calibrate_filter(table, cfg, seed=7)
    assert resolved.calibrate is None and record["parameter"] in ("perc", "margin", "max_score")
    assert getattr(resolved, record["parameter"]) == record["chosen"]
    anchors, scores = calibration_pairs(table, cfg, seed=7)
    thr = np.full(scores.shape, record["chosen"], np.float32) if method == "topk_abs" else \
        method_threshold(anchors, resolved)
    rejected = scores >= thr
    assert rejected.mean() >= value - 1e-9
    assert record["achieved_reject_rate"] == pytest.approx(rejected.mean(), abs=1e-6)
    # and the tightest such choice: the next observed gap (score) below it would reject less than the target
    a, s = anchors.astype(np.float64), scores.astype(np.float64)
    if method == "topk_abs":
        looser = s[s > record["chosen"] + 1e-5]
        assert looser.size == 0 or (s >= looser.min()).mean() < value
    elif not record["clipped"]:
        gaps = (a - s) / (np.abs(a) if method == "topk_percpos" else 1.0)
        t = record["chosen"] if method == "topk_marginpos" else 1.0 - record["chosen"]
        below = gaps[gaps < t - 1e-5]  # (the float32 rule may have moved t by a few ulps)
        assert below.size == 0 or (gaps <= below.max()).mean() < value


def test_percpos_by_hand():
    # one query, positives 0.8 / 0.6 / 0.4; leave-one-out with anchor=min of the others
    table = pos_table([[0.8, 0.6, 0.4]])
    cfg = FilterConfig(method="topk_percpos", calibrate=CalibrateConfig(target="positive_quantile", value=1.0))
    anchors, scores = calibration_pairs(table, cfg, seed=0)
    # held 0.4 vs anchor 0.6, held 0.6 vs 0.4, held 0.8 vs 0.4 (docs in sorted order p0-0, p0-1, p0-2)
    np.testing.assert_allclose(sorted(zip(anchors.tolist(), scores.tolist())),
                               sorted([(0.4, 0.8), (0.4, 0.6), (0.6, 0.4)]), rtol=1e-6)
    resolved, record = calibrate_filter(table, cfg, seed=0)
    # the largest relative gap is (0.6 - 0.4) / 0.6 = 1/3: perc = 2/3 rejects all three
    assert resolved.perc == pytest.approx(2 / 3, rel=1e-5) and record["achieved_reject_rate"] == 1.0


def test_abs_positive_quantile_by_hand():
    table = pos_table([[0.9, 0.7], [0.5, NAN], [0.3, NAN]])
    cfg = FilterConfig(method="topk_abs", calibrate=CalibrateConfig(target="positive_quantile", value=0.5))
    resolved, record = calibrate_filter(table, cfg, seed=0)
    assert resolved.max_score == pytest.approx(0.7, rel=1e-6)  # 0.9 and 0.7 score at or above it: half of 4
    assert record["positives_used"] == 4 and record["achieved_reject_rate"] == 0.5


@pytest.mark.parametrize("target", ["heldout_reject_rate", "positive_quantile"])
def test_same_setting_means_the_same_on_any_scale(target):
    """A teacher scoring 25x larger (BM25-like) gets the same PercPos and a 25x MarginPos / Abs threshold, so the
    same share of positives is rejected: the point of calibrating."""
    small, large = pos_table(SCORES, "dense"), pos_table(SCORES, "bm25", scale=25.0)
    for method, param, factor in (("topk_percpos", "perc", 1.0), ("topk_marginpos", "margin", 25.0),
                                  ("topk_abs", "max_score", 25.0)):
        cfg = FilterConfig(method=method, calibrate=CalibrateConfig(target=target, value=0.8))
        a, ra = calibrate_filter(small, cfg, seed=1)
        b, rb = calibrate_filter(large, cfg, seed=1)
        assert getattr(b, param) == pytest.approx(getattr(a, param) * factor, rel=1e-4)
        assert ra["achieved_reject_rate"] == pytest.approx(rb["achieved_reject_rate"], abs=0.03)


def test_clipping_is_flagged():
    # the held-back positive scores far below its anchor: no perc in (0, 2] rejects it
    table = pos_table([[0.9, -0.8]])
    cfg = FilterConfig(method="topk_percpos", calibrate=CalibrateConfig(target="positive_quantile", value=1.0))
    resolved, record = calibrate_filter(table, cfg, seed=0)
    assert record["clipped"] and 0 < resolved.perc <= 2
    cfg = FilterConfig(method="topk_marginpos", calibrate=CalibrateConfig(target="positive_quantile", value=0.5))
    resolved, record = calibrate_filter(pos_table([[0.5, 0.5]]), cfg, seed=0)
    assert resolved.margin == 0.0 and not record["clipped"]


def test_errors_name_the_key():
    single = pos_table([[0.5, NAN], [0.7, NAN]])
    cfg = FilterConfig(method="topk_percpos", calibrate=CalibrateConfig())
    with pytest.raises(ConfigError, match=r"teachers\[bm25\]\.filter\.calibrate.*>= 2 scored positives"):
        calibrate_filter(single, cfg, seed=0, key="teachers[bm25].filter")
    with pytest.raises(ConfigError, match="filter.calibrate"):
        FilterConfig(method="topk_shifted", calibrate=CalibrateConfig())
    with pytest.raises(ConfigError, match="filter.calibrate.value"):
        CalibrateConfig(value=0.0)
    with pytest.raises(ConfigError, match="filter.calibrate.holdout"):
        CalibrateConfig(holdout=1.0)
    with pytest.raises(ValueError, match="resolved"):
        apply_filter(single, cfg)  # never silently run with the uncalibrated value


def test_partial_table_reuses_the_full_tables_choice():
    full = pos_table(SCORES, "memo-teacher")
    cfg = FilterConfig(method="topk_percpos", calibrate=CalibrateConfig(value=0.7))
    ids = full.query_ids
    chosen, _ = resolve_filter(full, cfg, 5, ids)
    part = full.subset(np.array([3, 7]))
    assert resolve_filter(part, cfg, 5, ids)[0] == chosen
    assert calibrate_filter(part, cfg, 5)[0] != chosen  # its own rows would choose another value
    other = CandidateTable(**{**part.__dict__, "pos_scores": part.pos_scores + np.float32(0.05)})
    with pytest.raises(ValueError, match="full table"):
        resolve_filter(other, cfg, 5, ids)  # different scores: not the remembered table
    with pytest.raises(ValueError, match="full table"):
        resolve_filter(part, cfg, 6, ids)  # another seed: nothing remembered


# ------------------------------------------------------------------------------------------- pipeline
WORDS = "apple river stone cloud forest engine silver garden winter candle".split()


def calib_beir(tmp_path):
    rng = np.random.default_rng(1)
    docs = {f"f{i}": " ".join(rng.choice(WORDS, size=6)) for i in range(40)}
    queries, qrels = {}, []
    for i, w in enumerate(WORDS[:6]):
        queries[f"q{i}"] = f"{w} {WORDS[i + 1]}"
        for j in range(3):
            docs[f"p{i}-{j}"] = f"{w} {WORDS[i + 1]} " + " ".join(rng.choice(WORDS, size=3))
            qrels.append((f"q{i}", f"p{i}-{j}", 1))
    return write_beir(tmp_path / "beir", docs, queries, qrels)


def mine_cfg(tmp_path, beir, name="out", **kw):
    teachers = kw.pop("teachers", [TeacherConfig(name="bm25", kind="bm25")])
    return MineConfig(data=DataSource(beir_dir=str(beir)), teachers=teachers, output_dir=str(tmp_path / name),
                      cache_dir=str(tmp_path / "cache"), num_negatives=3, depth=5, max_depth=60, **kw)


def test_pipeline_per_teacher_filters_and_calibration_recorded(tmp_path):
    beir = calib_beir(tmp_path)
    cal = FilterConfig(method="topk_percpos", calibrate=CalibrateConfig(value=0.8))
    teachers = [TeacherConfig(name="a", kind="bm25"),
                TeacherConfig(name="b", kind="bm25", filter=FilterConfig(method="topk_shifted", shift=2))]
    cfg = mine_cfg(tmp_path, beir, teachers=teachers, filter=cal, ensemble="cross_sample")
    out = mine(cfg)  # depth 5 leaves short rows: the deep re-build reuses the choice made on all queries
    report = json.loads((out / "report.json").read_text())
    filters = report["filters"]
    assert filters["a"]["calibration"]["parameter"] == "perc"
    assert filters["a"]["config"]["perc"] == filters["a"]["calibration"]["chosen"]
    assert filters["b"]["config"]["method"] == "topk_shifted" and filters["b"]["calibration"] == {}
    assert report["teachers"]["b"]["rule_counts"]["shifted"] > 0 and report["teachers"]["a"]["rule_counts"][
        "above_perc"] > 0
    assert report["shortfall"]["widened"] > 0
    # the calibration settings are part of the mined set's address
    other = mine_cfg(tmp_path, beir, teachers=teachers, ensemble="cross_sample",
                     filter=FilterConfig(method="topk_percpos", calibrate=CalibrateConfig(value=0.7)))
    own = mine_cfg(tmp_path, beir, ensemble="cross_sample", filter=cal, teachers=[
        teachers[0], TeacherConfig(name="b", kind="bm25", filter=FilterConfig(method="topk_shifted", shift=3))])
    keys = {mining_fingerprint(c) for c in (cfg, other, own)}
    assert len(keys) == 3


def test_calibrated_mining_is_deterministic(tmp_path):
    beir = calib_beir(tmp_path)
    cal = FilterConfig(method="topk_marginpos", calibrate=CalibrateConfig(target="heldout_reject_rate", value=0.6))
    a = mine(mine_cfg(tmp_path, beir, "a", filter=cal))
    b = mine(mine_cfg(tmp_path, beir, "b", filter=cal))
    assert (a / "mined.jsonl").read_bytes() == (b / "mined.jsonl").read_bytes()
    assert json.loads((a / "report.json").read_text())["filters"] == json.loads((b / "report.json").read_text())[
        "filters"]
