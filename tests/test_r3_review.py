"""Review round R3 (issues 9 and 16): variants of the reported defects, each through the real CLI or the API.

- ``data.min_relevance`` below 1 would make grade-0 ("judged not relevant") documents positives.
- A model folder without any tokenizer vocabulary loads silently with an all-[UNK] tokenizer.
- A stale ``.old`` swap-out of a killed ``--overwrite`` run is restored before the checks, not after encoding.
- ``--preset`` followed by another option, ST triplet export of short rows, FlagEmbedding score provenance,
  pairs-mode merge counts, and qrels ids that differ from a known id only by invisible characters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_false_negatives import bm25_cfg, filler_docs, write_beir

from nvr.cli.main import main as nvr_main
from nvr.config.mining import DataSource, FilterConfig
from nvr.data.beir import load_beir
from nvr.mining.export import to_flagembedding, to_sentence_transformers
from nvr.mining.pipeline import load_data, mine
from nvr.utils.atomic import owner_tag
from nvr.utils.errors import ConfigError, InputError


def run_cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        nvr_main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nvr mine: error:"), err
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


def bm25_yaml(beir: Path, tmp_path: Path, **extra) -> Path:
    cfg = {"data": {"beir_dir": str(beir), "split": "train"}, "teachers": [{"name": "bm25", "kind": "bm25"}],
           "num_negatives": 3, "depth": 20, "max_depth": 20, "cache_dir": str(tmp_path / "cache"),
           "filter": {"method": "naive_topk"}, **extra}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def dead_owner() -> str:
    """An owner tag (``<host>-<pid>``) of this host whose pid is not running."""
    import os

    host = owner_tag().split("-")[0]
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"{host}-{pid}"
        except PermissionError:
            pass
        pid += 1


# ------------------------------------------------------------------------------------------- min_relevance
@pytest.mark.parametrize("grade", [0, -1])
def test_min_relevance_below_one_is_refused(tmp_path: Path, grade: int) -> None:
    """Grade 0 / -1 mean "judged not relevant": with min_relevance 0 they became positives (trained towards)."""
    with pytest.raises(ConfigError, match="data.min_relevance"):
        DataSource(beir_dir=str(tmp_path), min_relevance=grade)


def test_min_relevance_zero_through_the_cli(tiny_beir_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli("mine", "--config", str(bm25_yaml(tiny_beir_dir, tmp_path)), "--data.min_relevance", "0",
                           "--output_dir", str(tmp_path / "out"), capsys=capsys)
    one_line_error(code, err, "data.min_relevance", ">= 1")
    assert not (tmp_path / "out").exists()


def test_negative_grades_are_fine_negatives_not_positives(tmp_path: Path) -> None:
    docs = {"g2": "apple river stone", "g1": "apple river cloud", "gm": "apple river forest", **filler_docs(10)}
    beir = write_beir(tmp_path / "b", docs, {"q1": "apple river"}, [("q1", "g2", 2), ("q1", "g1", 1), ("q1", "gm", -1)])
    data = load_data(DataSource(beir_dir=str(beir), split="train", min_relevance=2))
    assert data.positives == {"q1": ["g2"]} and data.excluded == {"q1": ["g1"]}


# ------------------------------------------------------------------------------------------ tokenizer files
@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)])
def test_model_folder_without_tokenizer_vocabulary_fails_before_encoding(
    tiny_bert_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys, keep: tuple[str, ...]
) -> None:
    """transformers builds an all-[UNK] BertTokenizer from config.json alone: mining then ran on garbage."""
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    for file in model.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab")) and file.name not in keep:
            file.unlink()
    cfg = bm25_yaml(tiny_beir_dir, tmp_path, teachers=[{"name": "t", "kind": "dense",
                                                         "model_name_or_path": str(model)}])
    code, _, err = run_cli("mine", "--config", str(cfg), "--output_dir", str(tmp_path / "out"), capsys=capsys)
    one_line_error(code, err, "teachers[t].model_name_or_path", "tokenizer", str(model))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "embeddings").exists()


# ------------------------------------------------------------------------------------ stale siblings, early
def test_stale_overwrite_swap_out_is_restored_before_any_encoding(
    tiny_bert_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys
) -> None:
    """A killed ``--overwrite`` leaves ``.out.<host>-<pid>.old`` (the previous result) and no ``out``: it is put
    back by the preflight, so a run without --overwrite fails at once instead of after encoding the corpus."""
    out = tmp_path / "runs" / "out"
    stale = out.with_name(f".out.{dead_owner()}.old")
    stale.mkdir(parents=True)
    (stale / "mined.jsonl").write_text("{}\n", encoding="utf-8")
    cfg = bm25_yaml(tiny_beir_dir, tmp_path, teachers=[{"name": "t", "kind": "dense",
                                                         "model_name_or_path": str(tiny_bert_dir)}])
    code, _, err = run_cli("mine", "--config", str(cfg), "--output_dir", str(out), capsys=capsys)
    one_line_error(code, err, str(out), "already exists")
    assert (out / "mined.jsonl").read_text(encoding="utf-8") == "{}\n" and not stale.exists()
    assert not (tmp_path / "cache" / "embeddings").exists()  # failed before the teacher encoded anything


def test_stale_temp_folders_of_dead_writers_are_cleaned_by_the_next_run(tiny_beir_dir: Path, tmp_path: Path,
                                                                          capsys) -> None:
    out = tmp_path / "runs" / "out"
    dead = out.with_name(f".out.{dead_owner()}.x1y2.tmp")
    live = out.with_name(f".out.{owner_tag().split('-')[0]}-1.x1y2.tmp")  # pid 1 is running: left alone
    for folder in (dead, live):
        folder.mkdir(parents=True)
    code, _, err = run_cli("mine", "--config", str(bm25_yaml(tiny_beir_dir, tmp_path)), "--output_dir", str(out),
                           capsys=capsys)
    assert code == 0, err
    assert not dead.exists() and live.exists() and (out / "mined.jsonl").is_file()


# -------------------------------------------------------------------------------------------------- --preset
def test_preset_without_a_name_says_so(tiny_beir_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli("mine", "--config", str(bm25_yaml(tiny_beir_dir, tmp_path)), "--preset",
                           "--output_dir", str(tmp_path / "out"), capsys=capsys)
    last = one_line_error(code, err, "preset", "expected a preset name")
    assert "--output_dir" not in last


# --------------------------------------------------------------------------------------------------- exports
@pytest.fixture
def short_mined(tmp_path: Path) -> Path:
    """Three queries with 3, 1 and 0 negatives (k = 3, keep_short)."""
    docs = {"d1": "apple river", "d2": "stone cloud", "d3": "forest engine", "n1": "apple silver", "n2": "apple garden",
            "n3": "apple winter", "m1": "stone candle", "lone": "xyz"}
    queries = {"qa": "apple", "qb": "stone", "qc": "forest"}
    beir = write_beir(tmp_path / "b", docs, queries, [("qa", "d1", 1), ("qb", "d2", 1), ("qc", "d3", 1)])
    cfg = bm25_cfg(beir, tmp_path, depth=10, max_depth=10, shortfall="keep_short", filter=FilterConfig("naive_topk"))
    return mine(cfg)


def test_st_triplet_export_keeps_the_negatives_of_short_rows(short_mined: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (short_mined / "mined.jsonl").read_text().splitlines()]
    negatives = {r["query_id"]: len(r["negatives"]) for r in rows}
    assert negatives["qa"] == 3 and 0 < negatives["qb"] < 3 and negatives["qc"] == 0
    ntuple = to_sentence_transformers(short_mined, tmp_path / "n.jsonl")
    assert ntuple["format"] == "n-tuple" and ntuple["rows"] == 1 and ntuple["dropped_short_rows"] == 2
    triplet = to_sentence_transformers(short_mined, tmp_path / "t.jsonl", output_format="triplet")
    out = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert triplet == {"format": "triplet", "rows": 3 + negatives["qb"], "dropped_short_rows": 1, "k": 3}
    assert all(set(r) == {"anchor", "positive", "negative"} for r in out)
    assert {r["anchor"] for r in out} == {"apple", "stone"}
    with pytest.raises(ConfigError, match="output_format"):
        to_sentence_transformers(short_mined, tmp_path / "x.jsonl", output_format="pairs")


def test_st_triplet_export_with_no_negative_at_all_fails_clearly(tmp_path: Path) -> None:
    docs = {"d1": "apple river", "other": "xyz"}
    beir = write_beir(tmp_path / "b", docs, {"qa": "apple"}, [("qa", "d1", 1)])
    cfg = bm25_cfg(beir, tmp_path, num_negatives=1, depth=1, max_depth=1, shortfall="keep_short")
    folder = mine(cfg)
    with pytest.raises(InputError, match="no mined row has a negative"):
        to_sentence_transformers(folder, tmp_path / "t.jsonl", output_format="triplet")
    assert not (tmp_path / "t.jsonl").exists()


def test_cli_export_st_triplet(tiny_beir_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli("mine", "--config", str(bm25_yaml(tiny_beir_dir, tmp_path)), "--output_dir", str(out),
                                "--export", "st_triplet", capsys=capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "sentence_transformers_triplet.jsonl").read_text().splitlines()]
    assert rows and all(set(r) == {"anchor", "positive", "negative"} for r in rows)
    assert "'format': 'triplet'" in stdout


def test_flagembedding_summary_names_the_score_scale(short_mined: Path, tmp_path: Path) -> None:
    summary = to_flagembedding(short_mined, tmp_path / "f.jsonl")
    assert summary["with_scores"] and summary["score_teachers"] == ["bm25"]
    assert summary["dropped_without_negatives"] == 1


# ------------------------------------------------------------------------------------------------ data, ids
def test_pairs_mode_counts_queries_merged_by_text(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in filler_docs(10).items()))
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"query_id": "a", "query": "Apple river", "positive_ids": ["f1"]},
            {"query_id": "b", "query": "apple  RIVER", "positive_ids": ["f2"]},
            {"query_id": "a", "query": "Apple river", "positive_ids": ["f3"]},  # a second pair of the same query
            {"query": "ｓｔｏｎｅ cloud", "positive_ids": ["f4"]}, {"query": "stone cloud", "positive_ids": ["f5"]},
            {"query_id": "c", "query": "winter", "positive_ids": ["f6"]}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = load_data(DataSource(pairs_file=str(pairs), corpus_file=str(corpus)))
    assert data.merged_queries == 4  # a+b, and the two spellings of "stone cloud"; not c, not a's second row
    assert data.positives["a"] == ["f1", "f2", "f3"]


@pytest.mark.parametrize(("bad", "good", "column"), [("d0-1\u200b", "d0-1", "corpus"), ("\ufeffq0-0", "q0-0", "query")])
def test_qrels_id_with_invisible_characters_names_the_id_it_resembles(tiny_beir_dir: Path, tmp_path: Path, bad: str,
                                                                      good: str, column: str) -> None:
    beir = tmp_path / "b"
    shutil.copytree(tiny_beir_dir, beir)
    qid, doc = (bad, "d0-1") if column == "query" else ("q0-0", bad)
    (beir / "qrels" / "train.tsv").write_text(f"query-id\tcorpus-id\tscore\nq0-0\td0-0\t1\n{qid}\t{doc}\t1\n",
                                              encoding="utf-8")
    with pytest.raises(InputError, match=f"unknown {column} id.*it has '{good}'") as info:
        load_beir(beir, "train")
    assert info.value.line == 3
