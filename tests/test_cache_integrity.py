"""Cached artifacts carry checksums verified on load; a corrupted one is recomputed with a warning, never used.

Also: writers of one cache entry take its lock (a second writer waits and reuses the first one's result), and
``nvr fit`` verifies ``mined.jsonl`` against its manifest before training.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nvr.data.beir import Corpus
from nvr.mining.build import build_candidate_table
from nvr.search.table import CandidateTable, CorruptTableError
from nvr.teachers.cache import EmbeddingCache
from nvr.utils.checksum import sidecar, verify_sidecar
from nvr.utils.errors import InputError

TEXTS = [f"text number {i}" for i in range(10)]


class Encoder:
    """Deterministic fake encoder counting the texts it encodes (optionally slow, to overlap two writers)."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.sleep_s = sleep_s
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            self.calls.append(texts)
        time.sleep(self.sleep_s)
        return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float32)


def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _same_size_garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# ------------------------------------------------------------------------------------------ embedding cache
@pytest.mark.parametrize("damage", [_same_size_garbage, _truncate, _flip_byte], ids=["garbage", "truncated", "flip"])
def test_corrupted_assembled_embeddings_are_recomputed_with_a_warning(tmp_path, caplog, damage) -> None:
    cache = EmbeddingCache(tmp_path)
    good = np.array(cache.get_or_encode("k", TEXTS, Encoder(), shard_size=4))
    final = cache.folder("k", TEXTS) / "embeddings.npy"
    assert verify_sidecar(final) is None
    damage(final)
    again = Encoder()
    with caplog.at_level(logging.WARNING, logger="nvr.teachers.cache"):
        out = cache.get_or_encode("k", TEXTS, again, shard_size=4)
    np.testing.assert_array_equal(out, good)
    assert sum(len(c) for c in again.calls) == len(TEXTS), "every shard is re-encoded (they were assembled)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(final) in warnings[0] and "recomputing" in warnings[0]
    assert verify_sidecar(final) is None


def test_corrupted_shard_is_re_encoded_alone_on_resume(tmp_path, caplog) -> None:
    cache = EmbeddingCache(tmp_path)
    crashing = Encoder()

    def crash_on_third(texts):
        if len(crashing.calls) == 2:
            raise RuntimeError("simulated crash")
        return crashing(texts)

    with pytest.raises(RuntimeError):
        cache.get_or_encode("k", TEXTS, crash_on_third, shard_size=3)
    folder = cache.folder("k", TEXTS)
    _same_size_garbage(folder / "shard-00001.npy")
    resumed = Encoder()
    with caplog.at_level(logging.WARNING, logger="nvr.teachers.cache"):
        out = cache.get_or_encode("k", TEXTS, resumed, shard_size=3)
    assert resumed.calls == [TEXTS[3:6], TEXTS[6:9], TEXTS[9:]], "the corrupted shard and the missing ones"
    np.testing.assert_array_equal(out, Encoder()(TEXTS))
    assert any("shard-00001.npy" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not list(folder.glob("shard-*")), "shards and their checksums are dropped after assembly"


def test_a_file_without_checksum_is_not_trusted(tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    cache.get_or_encode("k", TEXTS, Encoder(), shard_size=5)
    final = cache.folder("k", TEXTS) / "embeddings.npy"
    sidecar(final).unlink()
    np.save(final, np.zeros((len(TEXTS), 3), np.float32))  # a valid .npy of the right shape, but unverifiable
    again = Encoder()
    out = cache.get_or_encode("k", TEXTS, again, shard_size=5)
    assert len(again.calls) == 2 and float(np.abs(out).sum()) > 0


def test_two_writers_of_one_entry_encode_each_shard_once(tmp_path) -> None:
    """Two processes (here threads: flock locks are per open file) share the work instead of duplicating it."""
    cache = EmbeddingCache(tmp_path)
    enc = Encoder(sleep_s=0.2)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(np.array(cache.get_or_encode("k", TEXTS, enc, shard_size=5)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(c[0] for c in enc.calls) == [TEXTS[0], TEXTS[5]], "each shard encoded exactly once"
    np.testing.assert_array_equal(results[0], results[1])


# -------------------------------------------------------------------------------------- candidate tables
class CountingTeacher:
    name = "vec"
    settings_fingerprint = "vec-v1"

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.calls = 0
        self.sleep_s = sleep_s

    def rank_corpus(self, query_texts, corpus, k, pair_idx, doc_order=None, memory_mb=1024):
        self.calls += 1
        time.sleep(self.sleep_s)
        rng = np.random.default_rng(0)
        q = rng.normal(size=(len(query_texts), 4)).astype(np.float32)
        d = rng.normal(size=(len(corpus), 4)).astype(np.float32)
        from nvr.search.exact import exact_topk, score_pairs

        s, i = exact_topk(q, d, k, doc_order=doc_order)
        rows = np.broadcast_to(np.arange(len(q))[:, None], pair_idx.shape)
        return s, i, score_pairs(q, d, rows, pair_idx)


def _corpus() -> Corpus:
    ids = [f"d{i}" for i in range(12)]
    return Corpus(ids, [""] * 12, [f"document {i} about topic {i % 3}" for i in range(12)])


def _build(teacher, cache: Path) -> CandidateTable:
    return build_candidate_table(teacher, ["q0", "q1"], ["first query", "second query"], {"q0": ["d0"], "q1": ["d5"]},
                                 _corpus(), depth=4, cache_dir=cache)


@pytest.mark.parametrize("target,damage", [("cand_idx.npy", _flip_byte), ("cand_scores.npy", _truncate),
                                           ("ids.json", _same_size_garbage)])
def test_corrupted_cached_table_is_rebuilt_with_a_warning(tmp_path, caplog, target, damage) -> None:
    teacher = CountingTeacher()
    good = _build(teacher, tmp_path)
    (entry,) = [p for p in (tmp_path / "tables").iterdir() if not p.name.startswith(".")]
    damage(entry / target)
    with pytest.raises(CorruptTableError, match=target):
        CandidateTable.load(entry)
    with caplog.at_level(logging.WARNING, logger="nvr.search.table"):
        again = _build(teacher, tmp_path)
    assert teacher.calls == 2
    np.testing.assert_array_equal(again.cand_idx, good.cand_idx)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(entry / target) in warnings[0]
    _build(teacher, tmp_path)
    assert teacher.calls == 2, "the rebuilt table verifies and is reused"


def test_two_builders_of_one_table_rank_once(tmp_path) -> None:
    teacher = CountingTeacher(sleep_s=0.3)
    threads = [threading.Thread(target=_build, args=(teacher, tmp_path)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert teacher.calls == 1, "the second builder waited for the lock and loaded the finished table"


# -------------------------------------------------------------------------------------- cross-encoder scores
@pytest.fixture(scope="module")
def tiny_ce_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from nvr.testing import make_tiny_tokenizer, vocabulary

    out = tmp_path_factory.mktemp("tiny_ce")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocabulary()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    make_tiny_tokenizer(out, "bert")
    return out


def test_corrupted_cross_encoder_scores_are_recomputed(tiny_ce_dir, tmp_path, caplog) -> None:
    from nvr.config.mining import CrossEncoderConfig
    from nvr.teachers.cross_encoder import CrossEncoderRescorer

    table = _build(CountingTeacher(), tmp_path)
    texts = ["wing lift", "shock wave"]
    cfg = CrossEncoderConfig(model_name_or_path=str(tiny_ce_dir), device="cpu")
    first = CrossEncoderRescorer(cfg, cache_dir=tmp_path).rescore(table, texts, _corpus())
    (entry,) = [p for p in (tmp_path / "ce_scores").iterdir() if not p.name.startswith(".")]
    _flip_byte(entry / "cand_scores.npy")
    rescorer = CrossEncoderRescorer(cfg, cache_dir=tmp_path)
    calls: list[int] = []
    real = rescorer.score
    rescorer.score = lambda q, p: calls.append(len(q)) or real(q, p)
    with caplog.at_level(logging.WARNING, logger="nvr.search.table"):
        again = rescorer.rescore(table, texts, _corpus())
    assert calls, "the corrupted scores were recomputed"
    np.testing.assert_array_equal(again.cand_scores, first.cand_scores)
    assert any("cand_scores.npy" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# ------------------------------------------------------------------------------------------------ mined sets
def _mine_small(beir: Path, bert: Path, out: Path, cache: Path) -> Path:
    from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig
    from nvr.mining.pipeline import mine

    teacher = TeacherConfig(name="tiny", model_name_or_path=str(bert), device="cpu", batch_size=16,
                            query_max_length=16, passage_max_length=32)
    return mine(MineConfig(data=DataSource(beir_dir=str(beir)), teachers=[teacher], output_dir=str(out),
                           cache_dir=str(cache), depth=8, max_depth=8, num_negatives=2,
                           filter=FilterConfig(method="naive_topk")))


def _truncate_lines(path: Path, keep: int) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:keep]), encoding="utf-8")


def test_truncated_mined_jsonl_is_refused_before_training(tiny_beir_dir, tiny_bert_dir, tmp_path) -> None:
    from nvr.mining.mined_set import MINED_FILE, mined_problem
    from nvr.training.datamodule import MinedDataModule

    mined = _mine_small(tiny_beir_dir, tiny_bert_dir, tmp_path / "mined", tmp_path / "cache")
    manifest = json.loads((mined / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["files"][MINED_FILE]["rows"] == manifest["counts"]["written"] == 10
    assert mined_problem(mined) is None
    _truncate_lines(mined / MINED_FILE, 4)  # at a line boundary: every remaining row still parses
    data = MinedDataModule(mined_dir=str(mined), tokenizer=str(tiny_bert_dir))
    with pytest.raises(InputError, match=r"mined\.jsonl: 4 rows but .*manifest\.json records 10") as err:
        data.prepare_data()
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="mined.jsonl"):
        MinedDataModule(mined_dir=str(mined), tokenizer=str(tiny_bert_dir)).setup("fit")


def test_edited_mined_jsonl_with_same_row_count_is_refused(tiny_beir_dir, tiny_bert_dir, tmp_path) -> None:
    from nvr.mining.mined_set import MINED_FILE, verify_mined

    mined = _mine_small(tiny_beir_dir, tiny_bert_dir, tmp_path / "mined", tmp_path / "cache")
    text = (mined / MINED_FILE).read_text(encoding="utf-8")
    (mined / MINED_FILE).write_text(text.replace('"rank": 0', '"rank": 1', 1), encoding="utf-8")
    with pytest.raises(InputError, match="sha256 differs"):
        verify_mined(mined)


def test_corrupted_cache_owned_mined_set_is_re_mined(tiny_beir_dir, tiny_bert_dir, tmp_path, caplog) -> None:
    from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig
    from nvr.mining.mined_set import MINED_FILE, load_mined
    from nvr.training.datamodule import MinedDataModule

    teacher = TeacherConfig(name="tiny", model_name_or_path=str(tiny_bert_dir), device="cpu", batch_size=16,
                            query_max_length=16, passage_max_length=32)
    mining = MineConfig(data=DataSource(beir_dir=str(tiny_beir_dir)), teachers=[teacher], cache_dir=str(tmp_path),
                        depth=8, max_depth=8, num_negatives=2, filter=FilterConfig(method="naive_topk"))
    data = MinedDataModule(mining=mining, tokenizer=str(tiny_bert_dir))
    data.prepare_data()
    path = data.mined_path
    assert len(load_mined(path)) == 10
    _truncate_lines(path / MINED_FILE, 4)
    again = MinedDataModule(mining=mining, tokenizer=str(tiny_bert_dir))
    with caplog.at_level(logging.WARNING, logger="nvr.training.datamodule"):
        again.prepare_data()
    assert again.mined_path == path and len(load_mined(path)) == 10
    assert any(str(path / MINED_FILE) in r.getMessage() and "re-mining" in r.getMessage() for r in caplog.records)
    again.setup("fit")
    assert len(again.train_dataset) == 10


def test_verification_cost_is_small(tmp_path) -> None:
    """Verifying a cached 20k x 384 float32 file (30 MB) is a fraction of a second (sha256 at > 300 MB/s)."""
    cache = EmbeddingCache(tmp_path)
    texts = [f"t{i}" for i in range(20_000)]
    rng = np.random.default_rng(0)
    cache.get_or_encode("k", texts, lambda t: rng.normal(size=(len(t), 384)).astype(np.float32), shard_size=20_000)
    started = time.perf_counter()
    cache.get_or_encode("k", texts, lambda t: pytest.fail("cache miss"))
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------------------------- through the real CLI
def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    from nvr.cli.main import main as nvr_main

    with pytest.raises(SystemExit) as exc:
        nvr_main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


def test_nvr_eval_never_uses_garbage_cached_embeddings(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys,
                                                       caplog) -> None:
    cache = tmp_path / "cache"
    args = ["eval", "--model", str(tiny_bert_dir), "--beir", str(tiny_beir_dir), "--cache_dir", str(cache),
            "--batch_size", "8", "--device", "cpu", "--output"]
    assert _run_cli([*args, str(tmp_path / "a.json")], capsys)[0] == 0
    (final,) = cache.glob("embeddings/*/embeddings.npy")
    _same_size_garbage(final)
    with caplog.at_level(logging.WARNING, logger="nvr.teachers.cache"):
        assert _run_cli([*args, str(tmp_path / "b.json")], capsys)[0] == 0
    first, second = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert second["datasets"] == first["datasets"]
    assert any(str(final) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    _truncate(final)  # a truncated .npy: recomputed too, never a traceback
    assert _run_cli([*args, str(tmp_path / "c.json")], capsys)[0] == 0
    assert json.loads((tmp_path / "c.json").read_text())["datasets"] == first["datasets"]


def test_nvr_mine_rebuilds_a_cached_table_with_flipped_bytes(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys) -> None:
    from _reliability import mine_config, write_yaml

    cache = tmp_path / "cache"

    def run(out: str) -> Path:
        cfg = write_yaml(tmp_path / f"{out}.yaml", mine_config(tiny_beir_dir, tiny_bert_dir, tmp_path / out, cache))
        code, err = _run_cli(["mine", "--config", str(cfg)], capsys)
        assert code == 0, err
        return tmp_path / out / "mined.jsonl"

    first = run("a")
    tables = [p for p in (cache / "tables").iterdir() if not p.name.startswith(".")]
    for table in tables:
        _flip_byte(table / "cand_idx.npy", offset=-3)
    assert run("b").read_bytes() == first.read_bytes()


def test_nvr_fit_refuses_a_truncated_mined_set(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys) -> None:
    from _reliability import fit_config, write_yaml

    from nvr.mining.mined_set import MINED_FILE

    mined = _mine_small(tiny_beir_dir, tiny_bert_dir, tmp_path / "mined", tmp_path / "cache")
    _truncate_lines(mined / MINED_FILE, 4)
    cfg = write_yaml(tmp_path / "fit.yaml", fit_config(tmp_path / "run", tiny_bert_dir, mined, max_steps=2))
    code, err = _run_cli(["fit", "--config", str(cfg)], capsys)
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert str(mined / MINED_FILE) in last and "4 rows" in last and "records 10" in last, last
    assert not (tmp_path / "run" / "ckpt").exists(), "nothing was trained"
