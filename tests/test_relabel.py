"""Relabel (issue 13 section 3): which rejected candidates are judged, which become extra positives, the C2 row
format, the judge-score cache and the mining fingerprint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from _judge import make_tiny_judge

from nvr.config.mining import DataSource, FilterConfig, MineConfig, RelabelConfig, TeacherConfig
from nvr.data.beir import Corpus
from nvr.mining.filters import Reason, apply_filter
from nvr.mining.mined_set import MinedExample, example_to_row, load_mined
from nvr.mining.relabel import PoolEntry, accept, rejected_pool
from nvr.search.table import CandidateTable
from nvr.utils.errors import ConfigError, InputError

NAN = float("nan")


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory) -> Path:
    return make_tiny_judge(tmp_path_factory.mktemp("tiny_judge"))


def _corpus(texts: list[str]) -> Corpus:
    ids = [f"d{i}" for i in range(len(texts))]
    return Corpus(ids=ids, titles=[""] * len(texts), texts=texts, index={d: i for i, d in enumerate(ids)})


def _table(teacher: str, qids: list[str], cand: list[list[int]], scores: list[list[float]],
           flagged: list[list[bool]], pos: list[list[int]], pos_scores: list[list[float]], n_docs: int = 10):
    return CandidateTable(
        teacher=teacher, query_ids=qids, doc_ids=[f"d{i}" for i in range(n_docs)],
        cand_idx=np.array(cand, dtype=np.int64), cand_scores=np.array(scores, dtype=np.float32),
        cand_is_positive=np.array(flagged, dtype=bool), pos_idx=np.array(pos, dtype=np.int64),
        pos_scores=np.array(pos_scores, dtype=np.float32),
    )


# ------------------------------------------------------------------------------------------------ pool rules
def _one_query_table():
    # anchor 1.0, PercPos 0.95 -> threshold 0.95; col 0 is the positive, col 2 a judged-relevant exclusion
    return _table("t", ["q"], [[0, 1, 2, 3, 4, 5, -1]], [[1.0, 0.99, 0.98, 0.97, 0.96, 0.5, NAN]],
                  [[True, False, True, False, False, False, False]], [[0]], [[1.0]])


def test_pool_is_exactly_the_score_rule_rejections_in_rank_order() -> None:
    table = _one_query_table()
    labels = np.zeros(table.cand_idx.shape, np.uint8)
    labels[0, 2] = Reason.JUDGED_RELEVANT
    result = apply_filter(table, FilterConfig(method="topk_percpos", perc=0.95, min_score=0.6), labels)
    assert result.reason[0].tolist()[:6] == [Reason.POSITIVE, Reason.ABOVE_PERC, Reason.JUDGED_RELEVANT,
                                             Reason.ABOVE_PERC, Reason.ABOVE_PERC, Reason.BELOW_MIN]
    pool = rejected_pool([([table], [result])], ["q"], max_candidates=10)["q"]
    assert [(e.doc, e.rank) for e in pool] == [(1, 1), (3, 3), (4, 4)]  # not the positive, judged, below_min, pad
    assert [e.score for e in pool] == pytest.approx([0.99, 0.97, 0.96])
    assert [e.doc for e in rejected_pool([([table], [result])], ["q"], 2)["q"]] == [1, 3]
    assert [e.doc for e in rejected_pool([([table], [result])], ["q"], 10, {"q": {3}})["q"]] == [1, 4]


@pytest.mark.parametrize(("method", "kw", "code"), [
    ("topk_abs", {"max_score": 0.965}, Reason.ABOVE_MAX),
    ("topk_marginpos", {"margin": 0.025}, Reason.ABOVE_MARGIN),
    ("topk_shifted", {"shift": 2}, Reason.SHIFTED),
])
def test_every_score_rule_method_pools_its_own_rejections(method, kw, code) -> None:
    table = _one_query_table()
    result = apply_filter(table, FilterConfig(method=method, **kw))
    expected = [int(table.cand_idx[0, c]) for c in np.flatnonzero(result.reason[0] == code)]
    assert expected  # the case is not vacuous
    assert [e.doc for e in rejected_pool([([table], [result])], ["q"], 10)["q"]] == expected


def test_naive_topk_pools_nothing_and_relabel_with_it_is_a_config_error() -> None:
    table = _one_query_table()
    result = apply_filter(table, FilterConfig(method="naive_topk"))
    assert rejected_pool([([table], [result])], ["q"], 10) == {"q": []}
    with pytest.raises(ConfigError, match="relabel"):
        MineConfig(data=DataSource(beir_dir="x"), teachers=[TeacherConfig(kind="bm25")],
                   filter=FilterConfig(method="naive_topk"), relabel=RelabelConfig(model_name_or_path="m"))


def test_per_teacher_filters_pool_each_teachers_own_rule_rejections() -> None:
    a = _table("a", ["q"], [[1, 2, 5]], [[0.9, 0.8, 0.1]], [[False] * 3], [[0]], [[1.0]])
    b = _table("b", ["q"], [[3, 4, 5]], [[0.99, 0.5, 0.1]], [[False] * 3], [[0]], [[1.0]])
    res = [apply_filter(a, FilterConfig(method="topk_abs", max_score=0.85)),
           apply_filter(b, FilterConfig(method="topk_percpos", perc=0.95))]
    assert res[0].reason[0, 0] == Reason.ABOVE_MAX and res[1].reason[0, 0] == Reason.ABOVE_PERC
    assert [e.doc for e in rejected_pool([([a, b], res)], ["q"], 10)["q"]] == [1, 3]
    # the run's filter may be naive_topk when a teacher's own filter has a score rule
    MineConfig(data=DataSource(beir_dir="x"), teachers=[
        TeacherConfig(kind="bm25", filter=FilterConfig(method="topk_percpos"))],
        filter=FilterConfig(method="naive_topk"), relabel=RelabelConfig(model_name_or_path="m"))


def test_teachers_merge_by_best_rank_and_deep_tables_replace_widened_queries() -> None:
    cfg = FilterConfig(method="topk_abs", max_score=0.5)
    # teacher a rejects 1 (rank 0) and 2 (rank 1); teacher b rejects 3 (rank 0) and 1 (rank 1), and lists 3 only
    a = _table("a", ["q", "r"], [[1, 2, 5], [6, 7, 8]], [[0.9, 0.8, 0.1], [0.9, 0.1, 0.1]],
               [[False] * 3] * 2, [[0], [9]], [[1.0], [1.0]])
    b = _table("b", ["q", "r"], [[3, 1, 5], [7, 6, 8]], [[0.7, 0.6, 0.1], [0.1, 0.1, 0.1]],
               [[False] * 3] * 2, [[0], [9]], [[1.0], [1.0]])
    res = [apply_filter(t, cfg) for t in (a, b)]
    pools = rejected_pool([([a, b], res)], ["q", "r"], 10)
    assert [(e.doc, e.rank) for e in pools["q"]] == [(1, 0), (3, 0), (2, 1)]  # rank ties: teacher order
    assert np.isnan(pools["q"][1].score) and pools["q"][0].score == pytest.approx(0.9)  # a's scale; 3 not in a
    assert [e.doc for e in pools["r"]] == [6]
    deep = _table("a", ["r"], [[8, 6, 7, 4]], [[0.95, 0.9, 0.1, 0.1]], [[False] * 4], [[9]], [[1.0]])
    deep_b = _table("b", ["r"], [[7, 6, 8, 4]], [[0.1] * 4], [[False] * 4], [[9]], [[1.0]])
    groups = [([a, b], res), ([deep, deep_b], [apply_filter(t, cfg) for t in (deep, deep_b)])]
    pools = rejected_pool(groups, ["q", "r"], 10)
    assert [e.doc for e in pools["r"]] == [8, 6] and [e.doc for e in pools["q"]] == [1, 3, 2]


def test_accept_threshold_order_duplicates_and_cap() -> None:
    corpus = _corpus(["alpha", "beta", "alpha", "gamma", "delta"])
    pool = [PoolEntry(d, r, 0.9 - r / 10) for r, d in enumerate([0, 1, 2, 3, 4])]
    judge = np.array([0.7, 0.5, 0.9, 0.49999, NAN], dtype=np.float32)
    cfg = RelabelConfig(model_name_or_path="m", threshold=0.5)
    got = accept(pool, judge, cfg, corpus)
    # >= threshold passes (0.5 exactly), nan and 0.49999 do not; d0 repeats d2's text and d2 scores higher
    assert [e.doc for e in got] == [2, 1]
    assert [e.judge_score for e in got] == pytest.approx([0.9, 0.5])
    assert [e.doc for e in accept(pool, judge, dataclasses.replace(cfg, max_extra_positives=1), corpus)] == [2]
    assert accept(pool, judge, dataclasses.replace(cfg, threshold=0.95), corpus) == []


@pytest.mark.parametrize(("key", "kw"), [
    ("relabel.threshold", {"threshold": float("nan")}), ("relabel.max_candidates", {"max_candidates": 0}),
    ("relabel.max_extra_positives", {"max_extra_positives": 0}), ("relabel.batch_size", {"batch_size": 0}),
    ("relabel.model_name_or_path", {"model_name_or_path": ""}),
])
def test_relabel_config_rejects_bad_values_naming_the_key(key, kw) -> None:
    with pytest.raises(ConfigError) as err:
        RelabelConfig(**{"model_name_or_path": "m", **kw})
    assert err.value.key == key


# ------------------------------------------------------------------------------------------------ C2 rows
def _example(**kw) -> MinedExample:
    base = dict(query_id="q", query="wing lift", positive_ids=["p"], positive_texts=["wing"], negative_ids=["n"],
                negative_texts=["drag"], negative_scores=[0.3], negative_teachers=["t"], negative_ranks=[2],
                positive_scores=[0.9])
    return MinedExample(**{**base, **kw})


def test_extra_positives_round_trip_and_old_rows_stay_valid(tmp_path) -> None:
    ex = _example(extra_positive_ids=["e1", "e2"], extra_positive_texts=["lift", "airfoil"],
                  extra_positive_scores=[0.95, NAN], extra_positive_judge_scores=[0.8, 0.7])
    old = _example(query_id="q2")
    rows = [example_to_row(ex), example_to_row(old)]
    assert "extra_positives" not in rows[1] and rows[0]["extra_positives"][1]["score"] is None
    (tmp_path / "mined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    back = load_mined(tmp_path)
    assert back[0].extra_positive_ids == ["e1", "e2"] and back[0].extra_positive_texts == ["lift", "airfoil"]
    assert back[0].extra_positive_scores[0] == pytest.approx(0.95) and np.isnan(back[0].extra_positive_scores[1])
    assert back[0].extra_positive_judge_scores == pytest.approx([0.8, 0.7])
    assert back[1].extra_positive_ids == [] and back[1].extra_positive_scores == []
    assert example_to_row(back[0]) == rows[0]


@pytest.mark.parametrize(("extra", "message"), [
    ("nope", "'extra_positives' must be list"),
    (["x"], "extra_positives[0]: must be an object"),
    ([{"text": "a", "score": 1.0}], "extra_positives[0]: missing key 'id'"),
    ([{"id": "e", "text": "a", "score": "high"}], "'score' must be a number or null"),
    ([{"id": "p", "text": "a", "score": 1.0}], "'p' is also a positive"),
    ([{"id": "n", "text": "a", "score": 1.0}], "'n' is also a negative"),
    ([{"id": "e", "text": "a"}, {"id": "e", "text": "a"}], "extra_positives[1]: 'e' is also a extra positive"),
])
def test_bad_extra_positives_are_one_line_errors_with_the_line(tmp_path, extra, message) -> None:
    good = example_to_row(_example(query_id="q0"))
    bad = {**example_to_row(_example()), "extra_positives": extra}
    path = tmp_path / "mined.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError) as err:
        load_mined(path)
    assert message in str(err.value) and ":2" in str(err.value)


# ------------------------------------------------------------------------------------------------ mining
def _mine_cfg(beir: Path, bert: Path, judge: Path, out: Path, cache: Path, **relabel) -> MineConfig:
    return MineConfig(
        data=DataSource(beir_dir=str(beir)), output_dir=str(out), cache_dir=str(cache), depth=8, max_depth=40,
        teachers=[TeacherConfig(name="tiny", model_name_or_path=str(bert), device="cpu", batch_size=16,
                                dtype="float32")],
        filter=FilterConfig(method="topk_percpos", perc=0.99), audit=True,
        relabel=RelabelConfig(model_name_or_path=str(judge), device="cpu", dtype="float32", max_length=64,
                              **{"threshold": 0.5, "max_candidates": 4, **relabel}),
    )


def test_mining_with_relabel_writes_judged_extra_positives(tiny_beir_dir, tiny_bert_dir, tiny_judge_dir,
                                                           tmp_path) -> None:
    import pyarrow.parquet as pq

    from nvr.mining.pipeline import mine, mining_fingerprint
    from nvr.teachers.cross_encoder import CrossEncoderRescorer

    cache = tmp_path / "cache"
    probe = _mine_cfg(tiny_beir_dir, tiny_bert_dir, tiny_judge_dir, tmp_path / "probe", cache, threshold=0.0)
    every = load_mined(mine(probe))  # threshold 0: every judged candidate becomes an extra positive
    judged = {(e.query_id, d): j for e in every for d, j in zip(e.extra_positive_ids, e.extra_positive_judge_scores)}
    assert len(judged) >= 6, "the tiny teacher must reject candidates above PercPos 0.99"
    values = sorted(set(judged.values()))
    threshold = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2  # between two scores: no rounding tie
    cfg = dataclasses.replace(probe, output_dir=str(tmp_path / "out"),
                              relabel=dataclasses.replace(probe.relabel, threshold=threshold))
    out = mine(cfg)
    examples = load_mined(out)
    audit = pq.read_table(out / "audit.parquet").to_pylist()
    judge = CrossEncoderRescorer(cfg.relabel.judge_config())
    corpus_text = {e.query_id: e.query for e in examples}
    n_extra = 0
    for ex in examples:
        rejected = sorted((r["rank"], r["doc_id"]) for r in audit
                          if r["query_id"] == ex.query_id and r["reason"] == "above_perc")
        pool = [d for _, d in rejected][: cfg.relabel.max_candidates]
        want = [d for d in pool if judged[(ex.query_id, d)] >= threshold]
        assert sorted(ex.extra_positive_ids) == sorted(want)
        assert not set(ex.extra_positive_ids) & (set(ex.positive_ids) | set(ex.negative_ids))
        if ex.extra_positive_ids:  # the stored judge score is the judge's score of that (query, passage) pair
            direct = judge.score([corpus_text[ex.query_id]] * len(ex.extra_positive_ids), ex.extra_positive_texts)
            assert direct == pytest.approx(ex.extra_positive_judge_scores, abs=1e-5)
            assert ex.extra_positive_judge_scores == sorted(ex.extra_positive_judge_scores, reverse=True)
        n_extra += len(ex.extra_positive_ids)
    assert 0 < n_extra < len(judged)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["relabel_extra_positives"] == n_extra
    assert manifest["counts"]["relabel_judged_candidates"] == len(judged)
    assert manifest["counts"]["relabel_still_rejected"] == len(judged) - n_extra
    assert manifest["relabel"]["fingerprint"]
    report = json.loads((out / "report.json").read_text())
    assert report["shortfall"]["relabel_extra_positives"] == n_extra
    rows = [json.loads(line) for line in (out / "mined.jsonl").read_text().splitlines()]
    assert all("extra_positives" in r for r in rows)  # C2: present on every row of a relabelled set
    # the fingerprint covers the relabel config and is unchanged by runtime-only keys
    fp = mining_fingerprint(cfg)
    assert mining_fingerprint(dataclasses.replace(cfg, relabel=dataclasses.replace(
        cfg.relabel, threshold=threshold + 0.01))) != fp
    assert mining_fingerprint(dataclasses.replace(cfg, relabel=dataclasses.replace(
        cfg.relabel, max_tokens_per_batch=64))) == fp
    assert mining_fingerprint(dataclasses.replace(cfg, relabel=None)) != fp


def test_judge_scores_are_cached_and_keyed_by_the_judge(tiny_beir_dir, tiny_bert_dir, tiny_judge_dir, tmp_path,
                                                        monkeypatch) -> None:
    import shutil

    from nvr.mining.pipeline import mine
    from nvr.teachers import cross_encoder as ce

    cache = tmp_path / "cache"
    cfg = _mine_cfg(tiny_beir_dir, tiny_bert_dir, tiny_judge_dir, tmp_path / "a", cache)
    first = (mine(cfg) / "mined.jsonl").read_bytes()

    def no_load(self):
        raise AssertionError("a warm run must not load the judge")

    monkeypatch.setattr(ce.CrossEncoderRescorer, "_load", no_load)
    again = mine(dataclasses.replace(cfg, output_dir=str(tmp_path / "b")))
    assert (again / "mined.jsonl").read_bytes() == first  # byte-identical, served from the pair-score cache
    monkeypatch.undo()
    # another judge (same architecture, other weights) at the same path: the scores are recomputed
    judge2 = tmp_path / "judge2"
    shutil.copytree(tiny_judge_dir, judge2)
    cfg2 = _mine_cfg(tiny_beir_dir, tiny_bert_dir, judge2, tmp_path / "c", cache)
    calls = []
    original = ce.CrossEncoderRescorer.score
    monkeypatch.setattr(ce.CrossEncoderRescorer, "score", lambda self, q, p: calls.append(len(q)) or original(
        self, q, p))
    mine(cfg2)
    assert not calls  # same content = same fingerprint: served from the cache
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(judge2))
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    model.save_pretrained(str(judge2))
    mine(dataclasses.replace(cfg2, output_dir=str(tmp_path / "d")))
    assert calls  # edited weights: judged again


# ------------------------------------------------------------------------------------------------ relabel -> fit
class BatchSpy:
    """Records the extra-positive columns of every training batch (contract C1)."""

    seen: list[tuple[int, list[list[int]]]] = []


def _spy_callback():
    from lightning.pytorch.callbacks import Callback

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            extra = int(batch.get("num_extra_positives", 0) or 0)
            BatchSpy.seen.append((extra, batch["passage_ids"][:, 1 : 1 + extra].tolist()))

    return Spy()


@pytest.mark.slow
@pytest.mark.parametrize("multi_positive", ["each", "logsumexp"])
def test_relabelled_extra_positives_train_with_the_multi_positive_loss(multi_positive, tiny_beir_dir, tiny_bert_dir,
                                                                       tiny_judge_dir, tmp_path) -> None:
    import lightning as L
    import torch

    from nvr.mining.pipeline import mine
    from nvr.modeling.config import EmbedderConfig
    from nvr.training.collate import doc_hash
    from nvr.training.datamodule import MinedDataModule
    from nvr.training.module import BiEncoderModule

    cfg = _mine_cfg(tiny_beir_dir, tiny_bert_dir, tiny_judge_dir, tmp_path / "mined", tmp_path / "cache",
                    threshold=0.0, max_extra_positives=3)
    out = mine(cfg)
    examples = load_mined(out)
    extras = {doc_hash(d) for e in examples for d in e.extra_positive_ids}
    assert extras and all(len(e.extra_positive_ids) <= 3 for e in examples)

    def fit(max_extra: int) -> dict[str, torch.Tensor]:
        BatchSpy.seen = []
        L.seed_everything(0)
        module = BiEncoderModule(EmbedderConfig(model_name_or_path=str(tiny_bert_dir), pooling="mean"), lr=1e-3,
                                 warmup_steps=0, seed=1, multi_positive=multi_positive)
        data = MinedDataModule(mined_dir=str(out), tokenizer=str(tiny_bert_dir), num_negatives=2, batch_size=2,
                               query_max_length=16, passage_max_length=32, max_extra_positives=max_extra)
        trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, precision="32-true",
                            callbacks=[_spy_callback()], default_root_dir=str(tmp_path / f"run{max_extra}"))
        trainer.fit(module, datamodule=data)
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        return {k: v.clone() for k, v in module.state_dict().items()}

    with_extra = fit(2)
    assert BatchSpy.seen and all(e == 2 for e, _ in BatchSpy.seen)
    collated = {d for _, cols in BatchSpy.seen for row in cols for d in row if d != -1}
    assert collated and collated <= extras  # the extra-positive columns hold the relabelled documents
    without = fit(0)
    assert all(e == 0 for e, _ in BatchSpy.seen)
    assert any(not torch.equal(with_extra[k], without[k]) for k in with_extra)  # the extra targets change training


def test_a_missing_judge_folder_is_a_one_line_error_naming_the_key(tiny_beir_dir, tiny_bert_dir, tmp_path,
                                                                   capsys) -> None:
    import yaml
    from _cli import cli_error

    cfg = {"data": {"beir_dir": str(tiny_beir_dir)}, "output_dir": str(tmp_path / "out"),
           "cache_dir": str(tmp_path / "cache"), "depth": 8,
           "teachers": [{"name": "tiny", "model_name_or_path": str(tiny_bert_dir), "device": "cpu"}],
           "relabel": {"model_name_or_path": str(tmp_path / "no-such-judge")}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    line = cli_error(["mine", "--config", str(path)], capsys)
    assert "relabel.model_name_or_path" in line and "no-such-judge" in line
