"""Bring your own data, through the real ``nvr mine`` CLI: pairs and corpora in every supported format, column
mapping (explicit > nvr names > sentence-transformers names), given negatives, and one test per error class."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _cli import cli_error, run_cli

from nvr.config.mining import DataSource, MineConfig, TeacherConfig
from nvr.data.beir import load_beir, load_corpus, positives_from_qrels
from nvr.data.corpus_file import content_id, load_corpus_file
from nvr.mining.mined_set import load_mined
from nvr.mining.pipeline import input_files, load_data, mining_fingerprint
from nvr.utils.errors import ConfigError

# --------------------------------------------------------------------------------------------------- writers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def write_delimited(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as fh:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter, quoting=quoting, escapechar=None)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_hf(path: Path, rows: list[dict]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return write_jsonl(path, rows)
    if name.endswith(".csv"):
        return write_delimited(path, rows)
    if name.endswith(".tsv"):
        return write_delimited(path, rows, "\t")
    if name.endswith(".parquet"):
        return write_parquet(path, rows)
    return write_hf(path, rows)


def write_lines(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("formats_cache")


@pytest.fixture(scope="module")
def st_rows(tiny_beir_dir: Path) -> list[dict]:
    """sentence-transformers triplets from the tiny BEIR train split: anchor, positive (text), negative (text)."""
    ds = load_beir(tiny_beir_dir, "train")
    pos = positives_from_qrels(ds.qrels, ds.queries)
    corpus = ds.corpus
    rows = []
    for i, (qid, docs) in enumerate(pos.items()):
        other = corpus.index[next(iter(pos[list(pos)[(i + 3) % len(pos)]]))]
        rows.append({"anchor": ds.queries.text(qid), "positive": corpus.passage(corpus.index[docs[0]]),
                     "negative": corpus.passage(other)})
    return rows


def mine_args(pairs: Path | str, out: Path, cache: Path, bert: Path, *extra: str) -> list[str]:
    teacher = f"[{{name: tiny, model_name_or_path: {bert}, device: cpu, batch_size: 16}}]"
    return ["mine", "--data.pairs_file", str(pairs), "--teachers", teacher, "--output_dir", str(out),
            "--cache_dir", str(cache), "--depth", "8", "--max_depth", "8", "--num_negatives", "2",
            "--filter.method", "naive_topk", *extra]


def mine_ok(capsys, *args: str) -> Path:
    code, err = run_cli(*args, capsys=capsys)
    assert code == 0, err[-3000:]
    return Path(args[args.index("--output_dir") + 1])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, st_rows, tiny_bert_dir, cache_dir) -> bytes:
    """mined.jsonl of the JSONL form of the triplets, mined by the Python API (the reference for every format)."""
    tmp = tmp_path_factory.mktemp("baseline")
    pairs = write_jsonl(tmp / "pairs.jsonl", st_rows)
    from nvr.config.mining import FilterConfig
    from nvr.mining.pipeline import mine

    cfg = MineConfig(data=DataSource(pairs_file=str(pairs)), output_dir=str(tmp / "out"), cache_dir=str(cache_dir),
                     teachers=[TeacherConfig(name="tiny", model_name_or_path=str(tiny_bert_dir), device="cpu",
                                             batch_size=16)],
                     depth=8, max_depth=8, num_negatives=2, filter=FilterConfig(method="naive_topk"))
    return (mine(cfg) / "mined.jsonl").read_bytes()


# ------------------------------------------------------------------------------------ every format, same set


@pytest.mark.slow
@pytest.mark.parametrize("name", ["p.csv", "p.csv.gz", "p.tsv", "p.tsv.gz", "p.parquet", "p.json", "p.jsonl.gz",
                                  "hf_folder"])
def test_every_pairs_format_mines_the_same_set(name, st_rows, baseline, tiny_bert_dir, cache_dir, tmp_path, capsys):
    pairs = write_rows(tmp_path / name, st_rows)
    out = mine_ok(capsys, *mine_args(pairs, tmp_path / "out", cache_dir, tiny_bert_dir))
    assert (out / "mined.jsonl").read_bytes() == baseline
    examples = load_mined(out)
    assert [e.query for e in examples] == [r["anchor"] for r in st_rows]
    assert [e.positive_texts for e in examples] == [[r["positive"]] for r in st_rows]


@pytest.mark.slow
def test_datasets_folder_is_read_with_pyarrow_when_datasets_is_missing(st_rows, baseline, tiny_bert_dir, cache_dir,
                                                                        tmp_path, capsys, monkeypatch):
    folder = write_hf(tmp_path / "hf", st_rows)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    out = mine_ok(capsys, *mine_args(folder, tmp_path / "out", cache_dir, tiny_bert_dir))
    assert (out / "mined.jsonl").read_bytes() == baseline


@pytest.mark.slow
def test_explicit_mapping_beats_detection(st_rows, baseline, tiny_bert_dir, cache_dir, tmp_path, capsys):
    # 'anchor' holds decoys and 'question' the real queries: both are query names, so detection refuses ...
    rows = [{"anchor": f"decoy {i}", "question": r["anchor"], "antwort": r["positive"], "schlecht": r["negative"]}
            for i, r in enumerate(st_rows)]
    pairs = write_delimited(tmp_path / "p.csv", rows)
    err = cli_error(mine_args(pairs, tmp_path / "o1", cache_dir, tiny_bert_dir), capsys)
    assert f"{pairs}: columns 'anchor', 'question' could each be the query; set data.columns.query" in err
    # ... and the mapping (a dict flag, or one flag per field) decides
    mapping = "{query: question, positive: antwort, negative: schlecht}"
    out = mine_ok(capsys, *mine_args(pairs, tmp_path / "o2", cache_dir, tiny_bert_dir, "--data.columns", mapping))
    assert (out / "mined.jsonl").read_bytes() == baseline
    out = mine_ok(capsys, *mine_args(pairs, tmp_path / "o3", cache_dir, tiny_bert_dir, "--data.columns.query",
                                     "question", "--data.columns.positive", "antwort",
                                     "--data.columns.negative", "schlecht"))
    assert (out / "mined.jsonl").read_bytes() == baseline


@pytest.mark.slow
@pytest.mark.parametrize("name", ["corpus.txt", "corpus.csv", "corpus.parquet", "corpus.jsonl"])
def test_plain_text_corpus_in_every_format(name, tiny_beir_dir, tiny_bert_dir, cache_dir, tmp_path, capsys):
    beir = load_corpus(tiny_beir_dir / "corpus.jsonl")
    passages = beir.passages()
    corpus = tmp_path / name
    if name.endswith(".txt"):
        write_lines(corpus, "\n".join(passages[:30]) + "\n\n" + "\n".join(passages[30:]) + "\n" + passages[0] + "\n")
    else:  # parquet uses a sentence-transformers-style column name, the others nvr's
        column = "passage" if name.endswith(".parquet") else "text"
        write_rows(corpus, [{column: p} for p in passages])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"query": "wing lift drag", "positive": passages[0]},
                                                   {"query": "rocket nozzle", "positive": passages[31]}])
    out = mine_ok(capsys, *mine_args(pairs, tmp_path / "out", cache_dir, tiny_bert_dir,
                                     "--data.corpus_file", str(corpus)))
    examples = load_mined(out)
    ids = [content_id(p) for p in passages]
    assert [e.positive_ids for e in examples] == [[ids[0]], [ids[31]]]  # matched to the corpus, not appended
    assert all(set(e.negative_ids) <= set(ids) and len(e.negative_ids) == 2 for e in examples)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["num_docs"] == len(set(passages))  # the repeated .txt line is one document
    assert ids[0] == "doc:" + hashlib.sha1(passages[0].encode("utf-8")).hexdigest()[:16]


@pytest.mark.slow
def test_given_negatives_join_the_corpus_as_candidates(st_rows, tiny_bert_dir, cache_dir, tmp_path, capsys):
    rows = [{**r, "negative_1": f"{r['negative']} extra words", "negative_2": r["positive"]} for r in st_rows]
    rows[0]["negative_2"] = rows[1]["positive"]  # a given negative that is another query's positive
    pairs = write_parquet(tmp_path / "p.parquet", rows)
    out = mine_ok(capsys, *mine_args(pairs, tmp_path / "out", cache_dir, tiny_bert_dir))
    data = load_data(DataSource(pairs_file=str(pairs)))
    texts = {r["positive"] for r in rows} | {r["negative"] for r in rows} | {r["negative_1"] for r in rows}
    assert len(data.corpus) == len(texts)  # positives + distinct negatives (negative_2 repeats positives)
    examples = load_mined(out)
    assert all(not set(e.negative_ids) & set(e.positive_ids) for e in examples)  # a positive is never its negative
    mined = {d for e in examples for d in e.negative_ids}
    assert any(d.startswith("neg:") for d in mined) and mined <= set(data.corpus.ids)


# --------------------------------------------------------------------------------------- one test per error


ERRORS = [
    # (file name, content, fragments of the one error line)
    ("p.csv", "anchor,positive\nlift,wing\nshock,wave,extra\n", ["p.csv:3: expected 2 fields (header: anchor, "
                                                                 "positive), got 3"]),
    ("p.csv", 'anchor,positive\nlift,"multi\nline"\nshock,"unterminated\nwave\n', ["p.csv:4: malformed CSV record"]),
    ("p.csv", 'anchor,positive\nlift,"a"b\n', ["p.csv:2: malformed CSV record"]),
    ("p.csv", "anchor,positive\nlift,wing\n,wave\n", ["p.csv:3: 'anchor' must be a non-empty string"]),
    ("p.csv", "anchor,positive\nlift,\n", ["p.csv:2: row has no positive: 'positive' is missing or empty"]),
    ("p.csv", "anchor,positive\nlift,   \n", ["p.csv:2: a positive must be a non-empty string"]),
    ("p.tsv", "anchor\tpositive\nlift\twing\tx\n", ["p.tsv:2: expected 2 fields", "a field cannot hold a tab"]),
    ("p.csv", "anchor,positive\n", ["p.csv: no training pairs"]),
    ("p.csv", "", ["p.csv:1: empty first line: a CSV file starts with a header"]),
    ("p.csv", "anchor,anchor\na,b\n", ["p.csv:1: column 'anchor' appears twice in the header"]),
    ("p.csv", "question,anchor,positive\na,b,c\n", ["columns 'question', 'anchor' could each be the query",
                                                     "columns found: 'question', 'anchor', 'positive'"]),
    ("p.csv", "anchor,answerz\na,b\n", ["p.csv: no positive column", "data.columns.positive",
                                        "columns found: 'anchor', 'answerz'"]),
    ("p.csv", "anchor,answer,text\na,b,c\n", ["columns 'answer', 'text' could each be the positive"]),
    ("p.jsonl", '{"anchor": "a", "positive": "b"}\n{"anchor": "c", "answerz": "d"}\n',
     ["p.jsonl:2: row has no positive", "keys of this row: 'anchor', 'answerz'"]),
    ("p.jsonl", '{"query": "a", "positive": "b", "negative": ""}\n', ["p.jsonl:1: a negative must be a non-empty"]),
    ("p.json", '[{"query": "a", "positive": "b"}]\n', ["p.json:1: a JSON array, not JSON Lines"]),
    ("p.xlsx", "x", ["p.xlsx: unsupported file type '.xlsx'"]),
    ("p.txt", "x", ["p.txt: unsupported file type '.txt'", "a .txt file (one passage per line) can be a "
                                                             "data.corpus_file"]),
]


@pytest.mark.parametrize(("name", "content", "fragments"), ERRORS, ids=[f"{i}-{e[0]}" for i, e in enumerate(ERRORS)])
def test_pairs_errors_are_one_line_with_file_and_line(name, content, fragments, tiny_bert_dir, tmp_path, capsys):
    pairs = write_lines(tmp_path / name, content)
    err = cli_error(mine_args(pairs, tmp_path / "out", tmp_path / "cache", tiny_bert_dir), capsys)
    for fragment in fragments:
        assert f"{tmp_path}/{fragment}" in err if fragment.startswith(name) else fragment in err, err
    assert not (tmp_path / "out").exists()


def test_csv_line_numbers_count_physical_lines_of_quoted_fields(tiny_bert_dir, tmp_path, capsys):
    pairs = write_lines(tmp_path / "p.csv", 'anchor,positive\nlift,"one\ntwo\nthree"\n\nshock,""\n')
    err = cli_error(mine_args(pairs, tmp_path / "out", tmp_path / "cache", tiny_bert_dir), capsys)
    assert f"{pairs}:6: row has no positive" in err


def test_non_utf8_csv_names_the_line(tiny_bert_dir, tmp_path, capsys):
    pairs = tmp_path / "p.csv"
    pairs.write_bytes(b"anchor,positive\nlift,wing\nshock,caf\xe9\n")
    err = cli_error(mine_args(pairs, tmp_path / "out", tmp_path / "cache", tiny_bert_dir), capsys)
    assert f"{pairs}:3: not valid UTF-8" in err


def test_tsv_fields_are_not_quoted(tmp_path):
    pairs = write_lines(tmp_path / "p.tsv", 'anchor\tpositive\n"quoted" query\tsays "hi" there\n')
    data = load_data(DataSource(pairs_file=str(pairs)))
    assert data.queries.texts == ['"quoted" query'] and data.corpus.texts == ['says "hi" there']


def test_typed_format_errors_name_the_row(tiny_bert_dir, tmp_path, capsys):
    rows = [{"anchor": "a", "positive": "b"}, {"anchor": None, "positive": "c"}]
    for pairs in (write_parquet(tmp_path / "p.parquet", rows), write_hf(tmp_path / "hf", rows)):
        err = cli_error(mine_args(pairs, tmp_path / "out", tmp_path / "cache", tiny_bert_dir), capsys)
        assert f"{pairs}:2: 'anchor' must be a non-empty string" in err


def test_folder_errors(st_rows, tiny_beir_dir, tiny_bert_dir, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(st_rows[:2]),
                          "test": datasets.Dataset.from_list(st_rows[2:4])}).save_to_disk(str(dd))
    err = cli_error(mine_args(dd, tmp_path / "out", tmp_path / "cache", tiny_bert_dir), capsys)
    assert f"{dd}: a DatasetDict folder (splits: train, test); point at one split's folder, e.g. {dd}/train" in err
    mine_ok(capsys, *mine_args(dd / "train", tmp_path / "out", tmp_path / "cache", tiny_bert_dir))  # a split works
    plain = tmp_path / "plain"
    plain.mkdir()
    err = cli_error(mine_args(plain, tmp_path / "o2", tmp_path / "cache", tiny_bert_dir), capsys)
    assert f"{plain}: a folder, but not a datasets folder" in err
    err = cli_error(mine_args(tiny_beir_dir, tmp_path / "o2", tmp_path / "cache", tiny_bert_dir), capsys)
    assert "it looks like a BEIR folder: use data.beir_dir" in err
    missing = tmp_path / "missing.csv"
    err = cli_error(mine_args(missing, tmp_path / "o3", tmp_path / "cache", tiny_bert_dir), capsys)
    assert f"{missing}: file not found" in err


def test_unreadable_folder_without_datasets_says_pip_install(st_rows, tiny_bert_dir, tmp_path, capsys, monkeypatch):
    folder = write_hf(tmp_path / "hf", st_rows)
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"] = [{"filename": "gone.arrow"}]
    (folder / "state.json").write_text(json.dumps(state))
    monkeypatch.setitem(sys.modules, "datasets", None)
    err = cli_error(mine_args(folder, tmp_path / "out", tmp_path / "cache", tiny_bert_dir), capsys)
    assert f"{folder}: cannot read this datasets folder without the datasets package" in err
    assert "pip install 'datasets>=2.19'" in err


CORPUS_ERRORS = [
    ("c.txt", b"one passage\ncaf\xe9\n", "c.txt:2: not valid UTF-8"),
    ("c.txt", b"\n\n", "c.txt: corpus has no documents"),
    ("c.jsonl", b'{"text": "a"}\n{"_id": "x", "text": "b"}\n', "c.jsonl:2: row has an '_id' but line 1 has none"),
    ("c.jsonl", b'{"_id": "x", "text": "a"}\n{"text": "b"}\n', "c.jsonl:2: missing '_id'"),
    ("c.csv", b"id,text\nx,a\nx,b\n", "c.csv:3: duplicate id 'x' (first seen on line 2)"),
    ("c.csv", b"text\na\n\"\"\n", "c.csv:3: empty passage (a corpus row without an id needs a text)"),
    ("c.csv", b"id,title\nx,a\n", "c.csv: no text column"),
    ("c.csv", b"pid,passage,body\nx,a,b\n", "columns 'passage', 'body' could each be the text"),
]


@pytest.mark.parametrize(("name", "content", "fragment"), CORPUS_ERRORS,
                         ids=[f"{i}-{e[0]}" for i, e in enumerate(CORPUS_ERRORS)])
def test_corpus_errors(name, content, fragment, tiny_bert_dir, tmp_path, capsys):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "positive": "a"}])
    err = cli_error(mine_args(pairs, tmp_path / "out", tmp_path / "cache", tiny_bert_dir, "--data.corpus_file",
                              str(corpus)), capsys)
    assert f"{tmp_path}/{fragment}" in err if fragment.startswith(name) else fragment in err, err


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--data.columns", "{anchor: query}"], "config key 'data.columns.anchor': unknown field; one of: query_id"),
    (["--data.columns", "{query: [a, b]}"], "config key 'data.columns.query': takes one column"),
    (["--data.columns", "{query: a, positive: a}"], "column 'a' is already mapped to data.columns.query"),
    (["--data.corpus_columns", "{text: body}"], "config key 'data.corpus_columns': maps the columns of "
                                                "data.corpus_file, which is not set"),
    (["--data.corpus_file", "c.txt", "--data.corpus_columns", "{text: body}"], "is a .txt corpus"),
])
def test_mapping_config_errors(extra, fragment, tiny_bert_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "c.txt", "a passage\n")
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "positive": "a"}])
    err = cli_error(mine_args(pairs, tmp_path / "out", tmp_path / "cache", tiny_bert_dir, *extra), capsys)
    assert fragment in err, err


def test_mapped_column_missing_from_the_file(tiny_bert_dir, tmp_path, capsys):
    pairs = write_delimited(tmp_path / "p.csv", [{"anchor": "a", "positive": "b"}])
    err = cli_error(mine_args(pairs, tmp_path / "out", tmp_path / "cache", tiny_bert_dir, "--data.columns.query",
                              "frage"), capsys)
    assert f"{pairs}: column 'frage' of data.columns.query is not in the file; columns found: 'anchor', " \
           "'positive'" in err


# ---------------------------------------------------------------------------------- fingerprints and parity


def _fingerprint(data: DataSource, cache: Path) -> str:
    return mining_fingerprint(MineConfig(data=data, teachers=[TeacherConfig(name="bm25", kind="bm25")],
                                         cache_dir=str(cache)))


def test_fingerprint_covers_folder_content_mapping_and_text_corpus(st_rows, tmp_path):
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "cache"
    cache.mkdir()
    folder = write_hf(tmp_path / "hf", st_rows)
    corpus = write_lines(tmp_path / "c.txt", "one\ntwo\n")
    data = DataSource(pairs_file=str(folder), corpus_file=str(corpus))
    files = input_files(data)
    assert set(files) == {"pairs/data-00000-of-00001.arrow", "pairs/dataset_info.json", "pairs/state.json", "corpus"}
    before = _fingerprint(data, cache)
    assert _fingerprint(data, cache) == before
    mapped = DataSource(pairs_file=str(folder), corpus_file=str(corpus), columns={"query": "anchor"})
    assert _fingerprint(mapped, cache) != before  # the mapping is part of the address even when it changes nothing
    write_lines(corpus, "one\nthree\n")
    after_corpus = _fingerprint(data, cache)
    assert after_corpus != before
    shutil.rmtree(folder)
    datasets.Dataset.from_list([{**r, "anchor": r["anchor"] + " x"} for r in st_rows]).save_to_disk(str(folder))
    assert _fingerprint(data, cache) != after_corpus


def test_beir_corpus_loads_identically_through_the_general_loader(tiny_beir_dir, tmp_path):
    beir = load_corpus(tiny_beir_dir / "corpus.jsonl")
    assert load_corpus_file(tiny_beir_dir / "corpus.jsonl").fingerprint == beir.fingerprint
    rows = [{"_id": i, "title": t, "text": x} for i, t, x in zip(beir.ids, beir.titles, beir.texts)]
    for name in ("c.csv", "c.parquet"):
        assert load_corpus_file(write_rows(tmp_path / name, rows)).fingerprint == beir.fingerprint
    renamed = [{"pid": i, "heading": t, "body": x} for i, t, x in zip(beir.ids, beir.titles, beir.texts)]
    mapped = load_corpus_file(write_rows(tmp_path / "r.tsv", renamed), {"title": "heading"})
    assert mapped.fingerprint == beir.fingerprint  # id <- pid and text <- body detected, title mapped


def test_flagembedding_rows_with_lists(tmp_path):
    pairs = write_jsonl(tmp_path / "fe.jsonl", [{"query": "q one", "pos": ["p1", "p2"], "neg": ["n1"]},
                                               {"query": "q two", "pos": "p3", "neg": ["n1", "n2"]}])
    data = load_data(DataSource(pairs_file=str(pairs)))
    assert [len(data.positives[q]) for q in data.queries.ids] == [2, 1]
    assert sorted(data.corpus.texts) == ["n1", "n2", "p1", "p2", "p3"]


def test_config_rejects_bad_mapping_values():
    with pytest.raises(ConfigError, match="data.columns.query"):
        DataSource(pairs_file="p.csv", columns={"query": ""})
    with pytest.raises(ConfigError, match="'data.columns': maps the columns of data.pairs_file"):
        DataSource(beir_dir="b", columns={"query": "a"})
