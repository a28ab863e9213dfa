"""Interruption: SIGKILL during corpus encoding or training, re-run, and get exactly the uninterrupted result.

Each test runs the uninterrupted reference and the run to be killed at the same time (two child processes), then
resumes the killed one: finished embedding shards / checkpoints must be reused and the final output identical.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from _reliability import finish, fit_config, kill, mine_config, start_nvr, subprocess_env, wait_until, write_yaml
from _training_data import write_fake_mined

pytestmark = pytest.mark.slow

SHARD_SIZE = 8  # 60 tiny docs -> 8 passage shards; 10 queries -> 2 query shards


def passage_shards(cache: Path) -> dict[str, tuple[int, int]]:
    """``{shard name: (inode, mtime_ns)}`` of the corpus embedding folder (the one with more than 2 shards)."""
    for folder in sorted((cache / "embeddings").glob("*")):
        shards = sorted(folder.glob("shard-*.npy"))
        if len(shards) > 2:
            return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    return {}


def encoded(log: Path, what: str) -> int:
    """Shards of ``what`` ('queries' / 'passages') that the instrumented encoder encoded, from its log."""
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text(encoding="utf-8").splitlines() if line.split("\t")[0].endswith(what))


def test_kill_during_corpus_encoding_resumes_from_finished_shards(tiny_beir_dir, tiny_bert_dir, tmp_path) -> None:
    ref_out, out = tmp_path / "ref" / "out", tmp_path / "run" / "out"
    ref_cfg = write_yaml(tmp_path / "ref.yaml", mine_config(tiny_beir_dir, tiny_bert_dir, ref_out, tmp_path / "c0",
                                                            shard_size=SHARD_SIZE))
    cfg = write_yaml(tmp_path / "run.yaml", mine_config(tiny_beir_dir, tiny_bert_dir, out, tmp_path / "c1",
                                                        shard_size=SHARD_SIZE))
    ref_log, log1, log2 = tmp_path / "ref.log", tmp_path / "run1.log", tmp_path / "run2.log"
    enc1, enc2 = tmp_path / "encode1.tsv", tmp_path / "encode2.tsv"

    ref = start_nvr(["--config", str(ref_cfg)], subprocess_env(), "reliability_mine.py", ref_log)
    victim = start_nvr(["--config", str(cfg)], subprocess_env(
        NVR_TEST_ENCODE_LOG=str(enc1), NVR_TEST_ENCODE_SLEEP="0.4"), "reliability_mine.py", log1)
    wait_until(lambda: len(passage_shards(tmp_path / "c1")) >= 3, victim, timeout=240, log=log1)
    kill(victim)
    finished = passage_shards(tmp_path / "c1")
    assert 3 <= len(finished) < 8, "killed too late: the corpus was fully encoded"
    assert not out.exists()

    resumed = start_nvr(["--config", str(cfg)], subprocess_env(NVR_TEST_ENCODE_LOG=str(enc2)),
                        "reliability_mine.py", log2)
    finish(resumed, log2)
    finish(ref, ref_log)
    # finished shards were reused: the resumed run encoded only the rest of the corpus
    assert encoded(enc2, "passages") == 8 - len(finished), log2.read_text()
    assert encoded(enc1, "passages") >= len(finished)
    for name in ("mined.jsonl", "manifest.json"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name


def final_state(root: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = torch.load(root / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["global_step"], ckpt["state_dict"]


def test_kill_during_fit_then_ckpt_path_last_gives_the_same_weights(tiny_beir_dir, tiny_bert_dir, tmp_path) -> None:
    steps = 7  # 10 train queries / batch 4 -> 3 batches per epoch: the kill lands mid-epoch, the end in epoch 3
    mined = write_fake_mined(tiny_beir_dir, tmp_path / "mined", num_negatives=3)
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    ref_cfg = write_yaml(tmp_path / "ref.yaml", fit_config(ref_root, tiny_bert_dir, mined, steps))
    cfg = write_yaml(tmp_path / "run.yaml", fit_config(root, tiny_bert_dir, mined, steps))
    ref_log, log1, log2 = tmp_path / "ref.log", tmp_path / "run1.log", tmp_path / "run2.log"

    ref = start_nvr(["--config", str(ref_cfg)], subprocess_env(), "reliability_fit.py", ref_log)
    victim = start_nvr(["--config", str(cfg)], subprocess_env(NVR_TEST_STEP_SLEEP="1.0"), "reliability_fit.py", log1)
    wait_until(lambda: (root / "ckpt" / "step=2.ckpt").exists(), victim, timeout=240, log=log1)
    time.sleep(0.3)  # let last.ckpt follow step=2.ckpt; the kill then lands in step 3's pause
    kill(victim)
    killed_at, _ = final_state(root)
    assert 2 <= killed_at < steps

    resumed = start_nvr(["--config", str(cfg), "--ckpt_path", "last"], subprocess_env(), "reliability_fit.py", log2)
    finish(resumed, log2)
    finish(ref, ref_log)
    assert "Restored all states from the checkpoint" in log2.read_text(), log2.read_text()
    ref_step, ref_state = final_state(ref_root)
    got_step, got_state = final_state(root)
    assert got_step == ref_step == steps
    assert ref_state.keys() == got_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(got_state[key], value, rtol=0, atol=1e-6, msg=key)
    saved = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    assert saved["trainer"]["max_steps"] == steps
