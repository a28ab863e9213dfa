"""Shared helpers for benchmarks: run a role in a fresh subprocess and read back its wall time and peak RSS."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_beir_dir() -> Path:
    """../shared/data/cranfield when present, else the copy embedded in the package."""
    shared = REPO.parent / "shared" / "data" / "cranfield"
    return shared if (shared / "corpus.jsonl").exists() else REPO / "nvr" / "resources" / "cranfield"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    """Print one JSON line that the parent process picks up (last line of stdout)."""
    result = {**result, "peak_rss_mb": round(peak_rss_mb(), 1)}
    print("RESULT " + json.dumps(result), flush=True)


def run_role(script: Path, role: str, *args: str) -> dict:
    """Run ``script --role role`` in a subprocess (own peak RSS) and return its RESULT dict plus wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--role", role, *args], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"role {role} failed with exit code {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT "):]), "process_wall_s": round(wall, 2)}
