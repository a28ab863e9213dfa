"""Bad input suite: every fault gives one clear line naming file:line or the config key, exit 2, no partial output.

Most cases go through the real dispatcher (``nvr.cli.main.main``) in-process, which is what ``python -m nvr`` runs;
a few run ``python -m nvr`` in a child process to check the exit code and that no traceback reaches the user.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from _reliability import (
    append_line,
    copy_beir,
    fit_config,
    leftovers,
    mine_config,
    read_jsonl,
    replace_line,
    run_nvr,
    write_yaml,
)

from nvr.cli.main import main as nvr_main
from nvr.mining.mined_set import load_mined
from nvr.utils.atomic import atomic_dir, atomic_file
from nvr.utils.errors import InputError


@pytest.fixture
def beir(tiny_beir_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny BEIR set (60 docs, 10 train queries) that a test may corrupt."""
    return copy_beir(tiny_beir_dir, tmp_path / "beir")


@pytest.fixture
def job(beir: Path, tiny_bert_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """Write a mine config (overrides replace top-level keys) and return its path."""

    def make(**overrides) -> Path:
        cfg = mine_config(beir, tiny_bert_dir, tmp_path / "runs" / "out", tmp_path / "cache", **overrides)
        return write_yaml(tmp_path / "mine.yaml", cfg)

    return make


def run_mine(cfg: Path, *extra: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``nvr mine --config cfg EXTRA`` through the real dispatcher: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exc:
        nvr_main(["mine", "--config", str(cfg), *extra])
    return int(exc.value.code or 0), capsys.readouterr().err


def assert_refused(code: int, err: str, *fragments: str, out: Path) -> None:
    """Exit 2, a final ``error:`` line holding every fragment, no traceback, and no (partial) output folder."""
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nvr mine: error:"), err
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    assert not out.exists()
    if out.parent.exists():
        assert leftovers(out.parent) == []


# ---------------------------------------------------------------------------------------------- data files
def _corpus_malformed(beir: Path) -> tuple[str, str]:
    replace_line(beir / "corpus.jsonl", 3, '{"_id": "d0-2", "text": "unterminated')
    return "corpus.jsonl:3:", "malformed JSON"


def _corpus_missing_id(beir: Path) -> tuple[str, str]:
    replace_line(beir / "corpus.jsonl", 5, json.dumps({"title": "wing", "text": "lift drag"}))
    return "corpus.jsonl:5:", "missing '_id'"


def _corpus_not_an_object(beir: Path) -> tuple[str, str]:
    replace_line(beir / "corpus.jsonl", 2, '["d0-1", "a list, not an object"]')
    return "corpus.jsonl:2:", "expected a JSON object"


def _corpus_duplicate_id(beir: Path) -> tuple[str, str]:
    line = append_line(beir / "corpus.jsonl", json.dumps({"_id": "d0-0", "text": "again"}))
    return f"corpus.jsonl:{line}:", "duplicate _id 'd0-0' (first seen on line 1)"


def _corpus_non_utf8(beir: Path) -> tuple[str, str]:
    replace_line(beir / "corpus.jsonl", 4, b'{"_id": "d0-3", "text": "caf\xe9 latin-1"}')
    return "corpus.jsonl:4:", "not valid UTF-8"


def _corpus_text_not_a_string(beir: Path) -> tuple[str, str]:
    replace_line(beir / "corpus.jsonl", 6, json.dumps({"_id": "d0-5", "text": 42}))
    return "corpus.jsonl:6:", "'text' must be a string"


def _query_empty_text(beir: Path) -> tuple[str, str]:
    replace_line(beir / "queries.jsonl", 2, json.dumps({"_id": "q0-1", "text": "   "}))
    return "queries.jsonl:2:", "empty text"


def _query_missing_id(beir: Path) -> tuple[str, str]:
    replace_line(beir / "queries.jsonl", 3, json.dumps({"text": "wing lift"}))
    return "queries.jsonl:3:", "missing '_id'"


def _qrels_unknown_doc(beir: Path) -> tuple[str, str]:
    line = append_line(beir / "qrels" / "train.tsv", "q0-0\td99-99\t1")
    return f"train.tsv:{line}:", "unknown corpus id 'd99-99'"


def _qrels_unknown_query(beir: Path) -> tuple[str, str]:
    line = append_line(beir / "qrels" / "train.tsv", "q404\td0-0\t1")
    return f"train.tsv:{line}:", "unknown query id 'q404'"


def _qrels_bad_score(beir: Path) -> tuple[str, str]:
    replace_line(beir / "qrels" / "train.tsv", 2, "q0-0\td0-1\thigh")
    return "train.tsv:2:", "score must be an integer"


def _qrels_non_utf8(beir: Path) -> tuple[str, str]:
    replace_line(beir / "qrels" / "train.tsv", 3, b"q0-0\td0-\xff\t1")
    return "train.tsv:3:", "not valid UTF-8"


def _qrels_missing_header(beir: Path) -> tuple[str, str]:
    replace_line(beir / "qrels" / "train.tsv", 1, "q0-0\td0-5\t1")
    return "train.tsv:1:", "missing header"


def _qrels_missing_split(beir: Path) -> tuple[str, str]:
    (beir / "qrels" / "train.tsv").unlink()
    return "train.tsv:", "qrels for split 'train' not found"


DATA_FAULTS = [
    _corpus_malformed, _corpus_missing_id, _corpus_not_an_object, _corpus_duplicate_id, _corpus_non_utf8,
    _corpus_text_not_a_string, _query_empty_text, _query_missing_id, _qrels_unknown_doc, _qrels_unknown_query,
    _qrels_bad_score, _qrels_non_utf8, _qrels_missing_header, _qrels_missing_split,
]


@pytest.mark.parametrize("fault", DATA_FAULTS, ids=lambda f: f.__name__.lstrip("_"))
def test_bad_data_file_names_file_and_line(fault, beir: Path, job, tmp_path: Path, capsys) -> None:
    where, what = fault(beir)
    code, err = run_mine(job(), capsys=capsys)
    assert_refused(code, err, where, what, out=tmp_path / "runs" / "out")


def test_no_query_with_positives_is_fatal(job, tmp_path: Path, capsys) -> None:
    code, err = run_mine(job(data={"beir_dir": str(tmp_path / "beir"), "min_relevance": 3}), capsys=capsys)
    assert_refused(code, err, str(tmp_path / "beir"), "no query has a positive document", out=tmp_path / "runs" / "out")


# ---------------------------------------------------------------------------------------------- config
CONFIG_FAULTS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "unknown_key": ({"filtr": {"perc": 0.9}}, ("filtr",)),
    "unknown_nested_key": ({"filter": {"method": "topk_percpos", "percent": 0.9}},
                           ("'filter.percent'", "did you mean 'filter.perc'")),
    "wrong_type": ({"num_negatives": "four"}, ("num_negatives", "four")),
    "bad_choice": ({"filter": {"method": "topk_margin"}}, ("filter.method", "topk_margin")),
    "perc_zero": ({"filter": {"method": "topk_percpos", "perc": 0.0}}, ("'filter.perc'", "(0, 2]")),
    "perc_negative": ({"filter": {"method": "topk_percpos", "perc": -0.5}}, ("'filter.perc'",)),
    "margin_negative": ({"filter": {"method": "topk_marginpos", "margin": -0.1}}, ("'filter.margin'", ">= 0")),
    "depth_above_max_depth": ({"depth": 50, "max_depth": 10}, ("'depth'",)),
    "no_teacher": ({"teachers": []}, ("'teachers'",)),
    "sampler_window": ({"sampler": {"method": "sampled_topk", "window": 2}}, ("'sampler.window'",)),
    "teacher_path_missing": (
        {"teachers": [{"name": "tiny", "model_name_or_path": "/nonexistent/teacher", "device": "cpu"}]},
        ("'teachers[tiny].model_name_or_path'", "/nonexistent/teacher"),
    ),
    "k_above_corpus_for_every_query": ({"num_negatives": 59}, ("'num_negatives'", "59")),
    "random_teacher_with_percpos": (
        {"teachers": [{"name": "rnd", "kind": "random"}]}, ("'filter.method'", "naive_topk"),
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_FAULTS))
def test_bad_config_names_the_key(case: str, job, tmp_path: Path, capsys) -> None:
    overrides, fragments = CONFIG_FAULTS[case]
    code, err = run_mine(job(**overrides), capsys=capsys)
    assert_refused(code, err, *fragments, out=tmp_path / "runs" / "out")


def test_config_file_missing_or_not_yaml(job, tmp_path: Path, capsys) -> None:
    code, err = run_mine(tmp_path / "nowhere.yaml", capsys=capsys)
    assert_refused(code, err, "nowhere.yaml", "does not exist", out=tmp_path / "runs" / "out")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: {beir_dir: x\n", encoding="utf-8")
    code, err = run_mine(broken, capsys=capsys)
    assert_refused(code, err, f"{broken}:2: invalid YAML", "line 2", out=tmp_path / "runs" / "out")
    assert "<unicode string>" not in err
    misindented = tmp_path / "misindented.yaml"
    misindented.write_text("seed: 1\nnum_negatives: 4\n  depth: 8\n", encoding="utf-8")
    code, err = run_mine(misindented, capsys=capsys)
    assert_refused(code, err, f"{misindented}:3: invalid YAML", "column 8", out=tmp_path / "runs" / "out")


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.slow
def test_existing_output_is_refused_then_replaced_with_overwrite(job, beir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs" / "out"
    out.mkdir(parents=True)
    (out / "mined.jsonl").write_text("precious\n", encoding="utf-8")
    # a positive-less query is not an error: it is skipped and counted
    append_line(beir / "queries.jsonl", json.dumps({"_id": "lonely", "text": "wing lift"}))
    append_line(beir / "qrels" / "train.tsv", "lonely\td0-0\t0")
    cfg = job(num_negatives=40, shortfall="drop")
    code, err = run_mine(cfg, capsys=capsys)
    assert code == 2 and "output already exists" in err and str(out) in err
    assert (out / "mined.jsonl").read_text(encoding="utf-8") == "precious\n"

    code, err = run_mine(cfg, "--overwrite", "true", "--shortfall", "keep_short", capsys=capsys)
    assert code == 0, err
    assert leftovers(out.parent) == []
    counts = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["counts"]
    rows = read_jsonl(out / "mined.jsonl")
    # K=40 of 60 docs: possible in principle, so not an error, but PercPos leaves every query short
    assert counts["skipped_without_positives"] == 1 and "lonely" not in {r["query_id"] for r in rows}
    assert counts["written"] == len(rows) == 10 and counts["kept_short"] == 10 and counts["dropped_short"] == 0
    assert all(len(r["negatives"]) < 40 for r in rows)  # never padded
    assert counts["negatives"] == sum(len(r["negatives"]) for r in rows) > 0


@pytest.mark.slow
def test_shortfall_drop_that_drops_everything_is_an_error(job, tmp_path: Path, capsys) -> None:
    code, err = run_mine(job(num_negatives=40, shortfall="drop"), capsys=capsys)
    assert_refused(code, err, "'shortfall'", "num_negatives", out=tmp_path / "runs" / "out")


@pytest.mark.slow
def test_failure_while_writing_leaves_no_output(job, tmp_path: Path, monkeypatch, capsys) -> None:
    import nvr.mining.pipeline as pipeline

    def broken_plot(*args, **kwargs) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pipeline, "plot_report", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        nvr_main(["mine", "--config", str(job())])
    out = tmp_path / "runs" / "out"
    assert not out.exists() and leftovers(out.parent) == []


def test_atomic_writers_keep_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text(encoding="utf-8") == "old" and leftovers(tmp_path) == []
    folder = tmp_path / "folder"
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "a.txt").write_text("partial", encoding="utf-8")
        raise RuntimeError("crash mid-folder")
    assert not folder.exists() and leftovers(tmp_path) == []


def test_bad_mined_file_names_line(tmp_path: Path) -> None:
    good = {"query_id": "q1", "query": "wing", "positives": [{"id": "d1", "text": "lift", "score": 0.9}],
            "negatives": [{"id": "d2", "text": "drag", "score": 0.5, "teacher": "t", "rank": 0}]}
    (tmp_path / "mined.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "positives": []}) + "\n",
                                          encoding="utf-8")
    with pytest.raises(InputError, match=r"mined\.jsonl:2: .*no positives"):
        load_mined(tmp_path)


# ---------------------------------------------------------------------------------------------- nvr fit
@pytest.mark.slow
def test_fit_unknown_key_and_missing_mined_set(tiny_bert_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    def fit(config: Path) -> None:
        monkeypatch.setattr(sys, "argv", ["nvr", "fit", "--config", str(config)])  # as the console script sees it
        nvr_main(sys.argv[1:])

    cfg = fit_config(tmp_path / "run", tiny_bert_dir, tmp_path / "no_mined_set", max_steps=2)
    cfg["model"]["lrr"] = 1e-3
    with pytest.raises(SystemExit) as exc:
        fit(write_yaml(tmp_path / "typo.yaml", cfg))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "model.lrr" in err.strip().splitlines()[-1], err

    del cfg["model"]["lrr"]
    with pytest.raises(SystemExit) as exc:
        fit(write_yaml(tmp_path / "fit.yaml", cfg))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and last.startswith("nvr fit: error:"), last
    assert "no_mined_set" in last and "no mined set here" in last
    assert not (tmp_path / "run" / "ckpt").exists()


# ---------------------------------------------------------------------------------------------- real process
@pytest.mark.parametrize("fault", ["data", "config", "unknown_command"])
def test_real_cli_process_exits_2_with_one_line(fault: str, beir: Path, job, tmp_path: Path) -> None:
    """``python -m nvr``: exit status 2, a single ``error:`` line on stderr, nothing on stdout, no output."""
    if fault == "data":
        where, what = _corpus_malformed(beir)
        args, fragments = ["mine", "--config", str(job())], (where, what)
    elif fault == "config":
        args, fragments = ["mine", "--config", str(job(filter={"method": "topk_percpos", "perc": 0}))], ("perc",)
    else:
        args, fragments = ["mnie"], ("unknown command 'mnie'",)
    proc = run_nvr(args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""
    assert all(f in proc.stderr for f in fragments), proc.stderr
    if fault != "unknown_command":
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs" / "out").exists()
