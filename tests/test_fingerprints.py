"""Every cache is content-addressed: each input that changes an artifact is in its key, and nothing else is.

Artifacts: embeddings (teacher model files + tokenizer + encoding settings + texts), candidate tables (teacher
settings incl. prefixes / max lengths), cross-encoder scores, mined sets (config + input file contents + teacher and
cross-encoder identities). A warm re-run with nothing changed hits every cache without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from nvr.config.mining import CrossEncoderConfig, DataSource, FilterConfig, MineConfig, TeacherConfig
from nvr.data.beir import load_beir, positives_from_qrels
from nvr.mining.build import build_candidate_table
from nvr.teachers.dense import DenseTeacher
from nvr.utils import fingerprint as fp_module


def _teacher_cfg(model: Path, **kw) -> TeacherConfig:
    base = dict(name="tiny", model_name_or_path=str(model), device="cpu", batch_size=16, query_max_length=16,
                passage_max_length=32)
    return TeacherConfig(**{**base, **kw})


def _mining(beir: Path, model: Path, cache: Path, **kw) -> MineConfig:
    teacher = kw.pop("teacher", None) or _teacher_cfg(model)
    base = dict(data=DataSource(beir_dir=str(beir)), teachers=[teacher], cache_dir=str(cache), depth=8, max_depth=8,
                num_negatives=2, filter=FilterConfig(method="naive_topk"))
    return MineConfig(**{**base, **kw})


def _replace_weights_keeping_size_and_mtime(model_dir: Path, seed: int) -> None:
    """Retrain in place: new weights of the same shapes (same file size), mtime put back as before."""
    from nvr.testing import make_tiny_bert

    target = model_dir / "model.safetensors"
    st = target.stat()
    other = make_tiny_bert(model_dir.parent / f"retrained-{seed}", seed=seed)
    data = (other / "model.safetensors").read_bytes()
    assert len(data) == st.st_size and data != target.read_bytes()
    with open(target, "r+b") as fh:  # in place: same inode, like a trainer overwriting its export
        fh.write(data)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns


@pytest.fixture
def bert_copy(tiny_bert_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))


# ------------------------------------------------------------------------------------ item 1: table key
@pytest.mark.parametrize("change", [{"query_prefix": "query : "}, {"passage_prefix": "passage : "},
                                    {"query_max_length": 4}, {"passage_max_length": 4}],
                         ids=lambda c: next(iter(c)))
def test_prefix_and_max_length_changes_re_encode_and_rebuild_the_table(tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                                      change) -> None:
    data = load_beir(tiny_beir_dir, "train")
    positives = positives_from_qrels(data.qrels, data.queries)
    qids = list(positives)
    texts = [data.queries.text(q) for q in qids]

    def build(cfg: TeacherConfig):
        teacher = DenseTeacher(cfg, tmp_path)
        calls: list[int] = []
        real = teacher.rank_corpus
        teacher.rank_corpus = lambda *a, **k: calls.append(1) or real(*a, **k)
        table = build_candidate_table(teacher, qids, texts, positives, data.corpus, depth=8, cache_dir=tmp_path)
        return table, calls

    base, _ = build(_teacher_cfg(tiny_bert_dir))
    changed, calls = build(_teacher_cfg(tiny_bert_dir, **change))
    assert calls == [1], f"{change}: the cached table of other settings was served"
    assert not np.array_equal(changed.cand_scores, base.cand_scores), "the setting changes the scores"
    _, calls = build(_teacher_cfg(tiny_bert_dir, **change))
    assert calls == [], "the same settings again: served from the cache"


def test_runtime_only_settings_stay_out_of_the_table_key(tiny_bert_dir, tmp_path) -> None:
    base = DenseTeacher(_teacher_cfg(tiny_bert_dir), tmp_path)
    for change in ({"shard_size": 3}, {"batch_size": 2}, {"device": "auto"}):
        other = DenseTeacher(_teacher_cfg(tiny_bert_dir, **change), tmp_path)
        assert other.settings_fingerprint == base.settings_fingerprint, change
    assert DenseTeacher(_teacher_cfg(tiny_bert_dir, dtype="bfloat16"), tmp_path).settings_fingerprint != \
        base.settings_fingerprint


# ----------------------------------------------------------------------- item 3: tokenizer in the key
def _lowercasing_off(model_dir: Path) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok["normalizer"]["type"] == "Lowercase"
    tok["normalizer"] = None
    (model_dir / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")


def test_tokenizer_change_misses_the_embedding_cache(tiny_bert_dir, bert_copy, tmp_path) -> None:
    from nvr.modeling.config import EmbedderConfig
    from nvr.modeling.embedder import Embedder

    _lowercasing_off(bert_copy)
    passages = ["WING Lift Drag", "Heat TRANSFER boundary layer"]
    cache = tmp_path / "cache"
    original = DenseTeacher(_teacher_cfg(tiny_bert_dir), cache)
    cased = DenseTeacher(_teacher_cfg(bert_copy), cache)
    assert cased.fingerprint != original.fingerprint
    a, b = original.encode_passages(passages), cased.encode_passages(passages)
    assert np.abs(a - b).max() > 1e-3, "lower-casing changes the embeddings, so the cache must not be shared"
    assert len(list((cache / "embeddings").glob("*/embeddings.npy"))) == 2
    # the same holds for the loaded-model fingerprint that keys `nvr eval`'s corpus cache
    fps = {Embedder.from_config(EmbedderConfig(model_name_or_path=str(p))).fingerprint() for p in
           (tiny_bert_dir, bert_copy)}
    assert len(fps) == 2


def test_tokenizer_fingerprint_ignores_per_call_state(tiny_bert_dir) -> None:
    from transformers import AutoTokenizer

    from nvr.modeling.embedder import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    before = tokenizer_fingerprint(tok)
    tok(["wing lift", "heat"], truncation=True, max_length=3, padding="max_length")  # sets backend truncation/padding
    assert tokenizer_fingerprint(tok) == before


def test_minilm_copy_with_lower_casing_off_gets_its_own_key(minilm_dir, tmp_path) -> None:
    copy = Path(shutil.copytree(minilm_dir, tmp_path / "minilm-cased"))
    config = json.loads((copy / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["do_lower_case"] = False
    (copy / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    keys = {DenseTeacher(_teacher_cfg(p), tmp_path).settings_fingerprint for p in (minilm_dir, copy)}
    assert len(keys) == 2
    from transformers import AutoTokenizer

    from nvr.modeling.embedder import tokenizer_fingerprint  # part of Embedder.fingerprint (the `nvr eval` key)

    assert len({tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(p))) for p in (minilm_dir, copy)}) == 2


def test_fingerprint_does_not_depend_on_where_the_model_lives(tiny_bert_dir, bert_copy, tmp_path) -> None:
    assert DenseTeacher(_teacher_cfg(bert_copy), tmp_path).fingerprint == \
        DenseTeacher(_teacher_cfg(tiny_bert_dir), tmp_path).fingerprint
    (bert_copy / "README.md").write_text("a model card never changes an embedding", encoding="utf-8")
    assert DenseTeacher(_teacher_cfg(bert_copy), tmp_path).fingerprint == \
        DenseTeacher(_teacher_cfg(tiny_bert_dir), tmp_path).fingerprint


# -------------------------------------------------------------------- weights memo: inode + ctime
def test_weights_replaced_in_place_with_same_size_and_mtime_are_noticed(bert_copy, tmp_path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    before = DenseTeacher(_teacher_cfg(bert_copy), cache)
    emb_before = before.encode_passages(["wing lift drag"])
    _replace_weights_keeping_size_and_mtime(bert_copy, seed=7)
    after = DenseTeacher(_teacher_cfg(bert_copy), cache)
    assert after.fingerprint != before.fingerprint
    assert not np.allclose(after.encode_passages(["wing lift drag"]), emb_before), "stale embeddings were served"


def test_warm_fingerprint_reads_the_memo_and_never_loads_or_rehashes(bert_copy, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cold = DenseTeacher(_teacher_cfg(bert_copy), cache).fingerprint
    assert list((cache / "fingerprints" / "files").glob("*.json"))
    monkeypatch.setattr(fp_module, "sha256_file", lambda p: pytest.fail(f"re-hashed {p}"))
    warm = DenseTeacher(_teacher_cfg(bert_copy), cache)
    assert warm.fingerprint == cold and warm._embedder is None


def test_adapter_folder_fingerprint_covers_its_base_model(tiny_bert_dir, bert_copy, tmp_path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    meta = {"format_version": 1, "backbone": "adapter", "config": {"model_name_or_path": str(bert_copy)}}
    (adapter / "nvr_embedder.json").write_text(json.dumps(meta), encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter weights")
    before = fp_module.model_fingerprint(str(adapter))
    _replace_weights_keeping_size_and_mtime(bert_copy, seed=3)
    assert fp_module.model_fingerprint(str(adapter)) != before, "the base weights are part of the adapter's identity"


# ----------------------------------------------------------------------- item 2: the mined-set key
def test_mined_set_key_covers_input_contents_and_teacher_weights(tiny_beir_dir, bert_copy, tmp_path) -> None:
    from nvr.training.datamodule import MinedDataModule

    beir = Path(shutil.copytree(tiny_beir_dir, tmp_path / "beir"))
    cache = tmp_path / "cache"
    mining = _mining(beir, bert_copy, cache)

    def key(cfg: MineConfig = mining) -> Path:
        return MinedDataModule(mining=cfg, tokenizer=str(bert_copy)).mined_path

    base = key()
    assert key() == base and key(dataclasses.replace(mining, search_memory_mb=7, audit=True)) == base
    seen = {base}
    edits = [
        lambda: (beir / "corpus.jsonl").write_text((beir / "corpus.jsonl").read_text().replace("wing", "wings", 1)),
        lambda: (beir / "queries.jsonl").write_text((beir / "queries.jsonl").read_text().replace("lift", "drag", 1)),
        lambda: (beir / "qrels" / "train.tsv").write_text(
            (beir / "qrels" / "train.tsv").read_text().replace("\t1\n", "\t2\n", 1)),
        lambda: _replace_weights_keeping_size_and_mtime(bert_copy, seed=11),
    ]
    for edit in edits:
        edit()
        new = key()
        assert new not in seen, "an input changed but the mined-set key did not"
        seen.add(new)


def test_pairs_file_content_is_in_the_mined_set_key(tiny_beir_dir, tiny_bert_dir, tmp_path) -> None:
    from nvr.mining.pipeline import mining_fingerprint

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "wing lift", "positive_ids": ["d0-0"]}) + "\n", encoding="utf-8")
    cfg = _mining(tiny_beir_dir, tiny_bert_dir, tmp_path / "cache",
                  data=DataSource(beir_dir=str(tiny_beir_dir), pairs_file=str(pairs)))
    before = mining_fingerprint(cfg)
    pairs.write_text(json.dumps({"query": "wing drag", "positive_ids": ["d0-0"]}) + "\n", encoding="utf-8")
    assert mining_fingerprint(cfg) != before


def test_corpus_edit_and_retrain_in_place_re_mine(tiny_beir_dir, bert_copy, tmp_path) -> None:
    from nvr.mining.mined_set import load_mined
    from nvr.training.datamodule import MinedDataModule

    beir = Path(shutil.copytree(tiny_beir_dir, tmp_path / "beir"))
    mining = _mining(beir, bert_copy, tmp_path / "cache")

    def prepared() -> Path:
        data = MinedDataModule(mining=mining, tokenizer=str(bert_copy))
        data.prepare_data()
        return data.mined_path

    first = prepared()
    corpus = beir / "corpus.jsonl"
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    rows[0]["text"] = "an edited passage about wing lift"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    second = prepared()
    assert second != first
    texts = {n for ex in load_mined(second) for n in ex.negative_texts + ex.positive_texts}
    assert any("an edited passage" in t for t in texts) or rows[0]["_id"] not in {
        i for ex in load_mined(first) for i in ex.negative_ids + ex.positive_ids}
    _replace_weights_keeping_size_and_mtime(bert_copy, seed=5)
    third = prepared()
    assert third not in (first, second)
    assert load_mined(third) != load_mined(second), "new teacher weights give new negatives/scores"


# ------------------------------------------------------------- item 4 + warm run: every cache is hit
def test_cross_encoder_scores_are_cached_and_in_the_manifest(tiny_beir_dir, tiny_bert_dir, tmp_path,
                                                             monkeypatch) -> None:
    from nvr.mining.pipeline import mine
    from nvr.teachers import cross_encoder as ce_module

    ce_dir = Path(shutil.copytree(tiny_bert_dir, tmp_path / "ce"))
    ce = CrossEncoderConfig(model_name_or_path=str(ce_dir), device="cpu", max_length=64)
    cfg = _mining(tiny_beir_dir, tiny_bert_dir, tmp_path / "cache", cross_encoder=ce)
    first = mine(dataclasses.replace(cfg, output_dir=str(tmp_path / "a")))
    manifest = json.loads((first / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["cross_encoder"]["model_name_or_path"] == str(ce_dir)
    ce_fp = manifest["cross_encoder"]["fingerprint"]
    assert ce_fp == ce_module.CrossEncoderRescorer(ce, cache_dir=cfg.cache_dir).fingerprint
    assert set(manifest["input_files"]) == {"corpus", "queries", "qrels/test.tsv", "qrels/train.tsv"}

    monkeypatch.setattr(ce_module.CrossEncoderRescorer, "_load", lambda self: pytest.fail("cross-encoder loaded"))
    second = mine(dataclasses.replace(cfg, output_dir=str(tmp_path / "b")))
    assert (second / "mined.jsonl").read_bytes() == (first / "mined.jsonl").read_bytes()
    monkeypatch.undo()

    for key in ("max_length", "dtype"):
        changed = ce_module.CrossEncoderRescorer(dataclasses.replace(ce, **{key: 32 if key == "max_length" else
                                                                           "bfloat16"}), cache_dir=cfg.cache_dir)
        assert changed.fingerprint != ce_fp, key
    _replace_weights_keeping_size_and_mtime(ce_dir, seed=9)
    assert ce_module.CrossEncoderRescorer(ce, cache_dir=cfg.cache_dir).fingerprint != ce_fp


def test_warm_rerun_hits_every_cache_without_loading_a_model(tiny_beir_dir, tiny_bert_dir, tmp_path,
                                                             monkeypatch) -> None:
    import nvr.modeling.encode as encode_module
    from nvr.mining.pipeline import mine
    from nvr.modeling import embedder as embedder_module
    from nvr.teachers import cross_encoder as ce_module
    from nvr.training.datamodule import MinedDataModule

    ce = CrossEncoderConfig(model_name_or_path=str(tiny_bert_dir), device="cpu", max_length=64)
    mining = _mining(tiny_beir_dir, tiny_bert_dir, tmp_path / "cache", cross_encoder=ce)
    cold = mine(dataclasses.replace(mining, output_dir=str(tmp_path / "cold")))  # a fresh cache: memoizes all

    def refuse(*args, **kwargs):
        pytest.fail("a warm run must not load a model, encode or re-hash a file")

    monkeypatch.setattr(encode_module, "encode_texts", refuse)
    monkeypatch.setattr(embedder_module.Embedder, "from_config", classmethod(refuse))
    monkeypatch.setattr(embedder_module.Embedder, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(ce_module.CrossEncoderRescorer, "_load", refuse)
    monkeypatch.setattr(fp_module, "sha256_file", refuse)
    warm = mine(dataclasses.replace(mining, output_dir=str(tmp_path / "warm")))  # tables + CE scores from cache
    assert (warm / "mined.jsonl").read_bytes() == (cold / "mined.jsonl").read_bytes()
    assert (warm / "manifest.json").read_bytes() == (cold / "manifest.json").read_bytes()
    first = MinedDataModule(mining=mining, tokenizer=str(tiny_bert_dir))
    first.prepare_data()  # mines its cache entry from the cached tables
    again = MinedDataModule(mining=mining, tokenizer=str(tiny_bert_dir))
    monkeypatch.setattr("nvr.mining.pipeline.mine", refuse)
    again.prepare_data()  # reuses the mined set
    assert again.mined_path == first.mined_path
    assert (again.mined_path / "mined.jsonl").read_bytes() == (cold / "mined.jsonl").read_bytes()
