"""Helpers shared by the reliability tests: tiny BEIR folders with injected faults, mine configs, CLI runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from nvr.testing import make_tiny_beir

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Offline, single-threaded children (the CI box has 2 cores shared by many jobs)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONHASHSEED="0")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def copy_beir(src: Path, dst: Path) -> Path:
    """A private, editable copy of a (session-scoped) tiny BEIR folder."""
    shutil.copytree(src, dst)
    return dst


def fresh_beir(dst: Path, **kw: Any) -> Path:
    return make_tiny_beir(dst, **kw)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_lines(path: Path, lines: Sequence[str | bytes]) -> None:
    """Write raw lines (bytes are written as they are, to inject invalid UTF-8)."""
    with open(path, "wb") as fh:
        for line in lines:
            fh.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")


def replace_line(path: Path, line_no: int, new: str | bytes) -> None:
    """Replace the 1-based line ``line_no`` of a text file."""
    lines: list[str | bytes] = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines[line_no - 1] = new
    write_lines(path, lines)


def append_line(path: Path, new: str | bytes) -> int:
    """Append one line and return its 1-based number."""
    with open(path, "ab") as fh:
        fh.write((new if isinstance(new, bytes) else new.encode("utf-8")) + b"\n")
    return len(path.read_bytes().rstrip(b"\n").split(b"\n"))


def mine_config(beir: Path, model: Path, out: Path, cache: Path, shard_size: int | None = None,
                **overrides: Any) -> dict[str, Any]:
    """A small ``nvr mine`` config (one tiny dense teacher) as a plain dict; ``overrides`` replace top-level keys.

    ``shard_size`` sets the teacher's embedding cache shard size (small shards let a test kill a run between two
    shards, or split them across two ranks).
    """
    teacher: dict[str, Any] = {"name": "tiny", "model_name_or_path": str(model), "device": "cpu", "batch_size": 8}
    if shard_size is not None:
        teacher["shard_size"] = shard_size
    cfg: dict[str, Any] = {
        "data": {"beir_dir": str(beir)},
        "teachers": [teacher],
        "output_dir": str(out),
        "cache_dir": str(cache),
        "num_negatives": 3,
        "depth": 8,
        "max_depth": 30,
        "filter": {"method": "topk_percpos", "perc": 0.99},
        "seed": 7,
    }
    cfg.update(overrides)
    return cfg


def fit_config(root: Path, bert: Path, mined: Path, max_steps: int) -> dict:
    """A 2-layer BERT trained a few steps on a fake mined set, checkpointing after every step."""
    return {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 0, "deterministic": True, "default_root_dir": str(root),
            "callbacks": [{
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_last": True,
                              "save_top_k": -1, "filename": "{step}"},
            }],
        },
        "model": {"embedder": {"model_name_or_path": str(bert), "pooling": "mean"}, "lr": 1e-3, "warmup_steps": 2,
                  "seed": 7},
        "data": {"mined_dir": str(mined), "query_max_length": 16, "passage_max_length": 32, "num_negatives": 2,
                 "batch_size": 4, "seed": 3},
    }


def write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


def run_nvr(args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300,
            script: str | None = None) -> subprocess.CompletedProcess:
    """``python -m nvr ARGS`` (or ``python tests/scripts/SCRIPT ARGS``) in a child process, output captured."""
    entry = [str(SCRIPTS / script)] if script else ["-m", "nvr"]
    return subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=dict(env or subprocess_env()),
                          capture_output=True, text=True, timeout=timeout)


def start_nvr(args: Sequence[str], env: Mapping[str, str], script: str, log: Path) -> subprocess.Popen:
    """Start a helper script in the background; its output goes to ``log`` (read it when a test fails)."""
    fh = open(log, "w")  # noqa: SIM115 - closed by the child's exit; kept open for the child
    return subprocess.Popen([sys.executable, str(SCRIPTS / script), *args], cwd=REPO, env=dict(env),
                            stdout=fh, stderr=subprocess.STDOUT)


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll ``condition`` while ``proc`` runs; fail with the child's log if it exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode} before the condition held:\n{log.read_text()}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"condition not met after {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL (no cleanup handlers run: the crash we want to survive) and reap."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait for a background child and fail with its log unless it exited 0."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise AssertionError(f"child timed out:\n{log.read_text()}") from None
    assert code == 0, f"child exited {code}:\n{log.read_text()}"


def leftovers(folder: Path) -> list[str]:
    """Temp files / folders that an atomic write would leave behind if it were not atomic."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp" in p.name or
                                                                               p.name.endswith(".old")))
