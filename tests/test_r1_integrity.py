"""Review R1: content-addressed caches and artifact integrity, variants of issues 9 and 16.

- the file-hash memo is safe on file systems with coarse timestamps (a same-size rewrite in the same clock tick);
- a verified cached embedding file is hashed once per process, and a later rewrite is still caught;
- a cache-owned mined set whose manifest is missing is re-mined, a hand-made mined set without one still trains,
  and the refusal of an edited user set says how to go on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from nvr.config.mining import DataSource, FilterConfig, MineConfig, TeacherConfig
from nvr.mining.mined_set import MANIFEST_FILE, MINED_FILE, load_mined, mined_problem, verify_mined
from nvr.teachers import cache as cache_module
from nvr.teachers.cache import EmbeddingCache
from nvr.utils import fingerprint as fp_module
from nvr.utils.errors import InputError

TICK_NS = 40_000_000
"""A simulated coarse timestamp granularity (older kernels stamp files with a clock that ticks every few ms)."""


def _coarse_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    real = fp_module.file_identity

    def coarse(path):
        ident = real(path)
        return {**ident, "mtime_ns": ident["mtime_ns"] // TICK_NS * TICK_NS,
                "ctime_ns": ident["ctime_ns"] // TICK_NS * TICK_NS}

    monkeypatch.setattr(fp_module, "file_identity", coarse)


def _rewrite_same_size(path: Path, data: bytes) -> None:
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as fh:  # in place: same inode
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_memo_survives_coarse_timestamps(tmp_path, monkeypatch) -> None:
    """A file hashed right after it was written and then rewritten (same size, mtime put back) in the same clock
    tick keeps its identity on such file systems: the memo must not serve the old digest."""
    _coarse_identity(monkeypatch)
    memo = tmp_path / "cache" / "fingerprints"
    memo.parent.mkdir()
    target = tmp_path / "weights.bin"
    target.write_bytes(b"a" * 4096)
    assert fp_module.file_sha256(target, memo) == fp_module.sha256_file(target)
    _rewrite_same_size(target, b"b" * 4096)
    assert fp_module.file_sha256(target, memo) == fp_module.sha256_file(target), "stale digest served"


def test_settled_file_is_memoized_and_not_rehashed(tmp_path, monkeypatch) -> None:
    memo = tmp_path / "cache" / "fingerprints"
    memo.parent.mkdir()
    target = tmp_path / "corpus.jsonl"
    target.write_bytes(b"x" * 100)
    digest = fp_module.file_sha256(target, memo)  # fresh file: hashed twice once its tick is over, then memoized
    monkeypatch.setattr(fp_module, "sha256_file", lambda p: pytest.fail(f"re-hashed {p}"))
    assert fp_module.file_sha256(target, memo) == digest


def test_future_timestamps_are_hashed_but_not_memoized(tmp_path) -> None:
    memo = tmp_path / "cache" / "fingerprints"
    memo.parent.mkdir()
    target = tmp_path / "f.bin"
    target.write_bytes(b"y" * 10)
    future = time.time_ns() + 3600 * 10**9
    os.utime(target, ns=(future, future))
    started = time.monotonic()
    assert fp_module.file_sha256(target, memo) == fp_module.sha256_file(target)
    assert time.monotonic() - started < 1.0, "must not wait for a tick an hour away"
    assert not (memo / "files").exists() or not any((memo / "files").iterdir())


def test_cached_embeddings_are_hashed_once_per_process_and_rewrites_still_caught(tmp_path, monkeypatch) -> None:
    cache = EmbeddingCache(tmp_path)
    texts = [f"t{i}" for i in range(30)]
    rng = np.random.default_rng(0)
    calls = []

    def encode(chunk: list[str]) -> np.ndarray:
        calls.append(len(chunk))
        return rng.random((len(chunk), 4), dtype=np.float32)

    first = np.array(cache.get_or_encode("k", texts, encode, shard_size=10))
    time.sleep(fp_module.SETTLE_NS / 1e9 + 0.01)  # the file's clock tick is over
    hashed = []
    real = cache_module.verify_sidecar

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(cache_module, "verify_sidecar", counting)
    for _ in range(3):  # e.g. the table at depth, then the short queries re-built at max_depth
        np.testing.assert_array_equal(cache.get_or_encode("k", texts, encode, shard_size=10), first)
    assert hashed == ["embeddings.npy"] and calls == [10, 10, 10]
    final = cache.folder("k", texts) / "embeddings.npy"
    data = final.read_bytes()
    _rewrite_same_size(final, data[:-16] + bytes(16))  # corrupted in place, mtime put back: ctime still changes
    again = cache.get_or_encode("k", texts, encode, shard_size=10)
    assert hashed[1] == "embeddings.npy" and calls == [10] * 6, "the rewritten file was re-verified and rebuilt"
    assert again.shape == first.shape


# ---------------------------------------------------------------------------------------------- mined sets
def _mining(beir: Path, bert: Path, cache: Path) -> MineConfig:
    teacher = TeacherConfig(name="tiny", model_name_or_path=str(bert), device="cpu", batch_size=16,
                            query_max_length=16, passage_max_length=32)
    return MineConfig(data=DataSource(beir_dir=str(beir)), teachers=[teacher], cache_dir=str(cache), depth=8,
                      max_depth=8, num_negatives=2, filter=FilterConfig(method="naive_topk"))


def test_cache_owned_mined_set_without_manifest_is_re_mined(tiny_beir_dir, tiny_bert_dir, tmp_path, caplog) -> None:
    from nvr.training.datamodule import MinedDataModule

    mining = _mining(tiny_beir_dir, tiny_bert_dir, tmp_path / "cache")
    data = MinedDataModule(mining=mining, tokenizer=str(tiny_bert_dir))
    data.prepare_data()
    path = data.mined_path
    clean = (path / MINED_FILE).read_bytes()
    lines = clean.splitlines(keepends=True)
    (path / MINED_FILE).write_bytes(b"".join(lines[:4]))  # truncated at a line boundary ...
    (path / MANIFEST_FILE).unlink()  # ... and nothing left to check it against
    again = MinedDataModule(mining=mining, tokenizer=str(tiny_bert_dir))
    with caplog.at_level(logging.WARNING, logger="nvr.training.datamodule"):
        again.prepare_data()
    assert any("no manifest.json" in r.getMessage() and "re-mining" in r.getMessage() for r in caplog.records)
    assert (path / MINED_FILE).read_bytes() == clean and (path / MANIFEST_FILE).is_file()
    again.setup("fit")
    assert len(again.train_dataset) == 10


def test_hand_made_mined_set_without_manifest_still_trains(tiny_beir_dir, tiny_bert_dir, tmp_path) -> None:
    from nvr.mining.pipeline import mine
    from nvr.training.datamodule import MinedDataModule

    mined = mine(dataclasses.replace(_mining(tiny_beir_dir, tiny_bert_dir, tmp_path / "cache"),
                                     output_dir=str(tmp_path / "mined")))
    hand = tmp_path / "hand"
    hand.mkdir()
    lines = (mined / MINED_FILE).read_bytes().splitlines(keepends=True)
    (hand / MINED_FILE).write_bytes(b"".join(lines[:6]))  # a user's own subset, no manifest
    assert mined_problem(hand) is None and mined_problem(hand, require_manifest=True) is not None
    data = MinedDataModule(mined_dir=str(hand), tokenizer=str(tiny_bert_dir))
    data.prepare_data()
    data.setup("fit")
    assert len(data.train_dataset) == 6

    # the same subset next to nvr's manifest is refused, with the way out in the one-line message
    (hand / MANIFEST_FILE).write_bytes((mined / MANIFEST_FILE).read_bytes())
    with pytest.raises(InputError, match=r"6 rows but .*records 10.*re-run nvr mine.*delete .*manifest\.json") as err:
        verify_mined(hand)
    assert "\n" not in str(err.value)
    (hand / MANIFEST_FILE).unlink()
    assert len(load_mined(hand)) == 6
