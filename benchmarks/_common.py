"""Shared helpers for benchmarks: run a role in a fresh subprocess and read back its wall time and peak RSS, record
the machine and its load, and print verdicts the same way in every script."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def default_beir_dir() -> Path:
    """../shared/data/cranfield when present, else the copy embedded in the package."""
    shared = SHARED_DATA / "cranfield"
    return shared if (shared / "corpus.jsonl").exists() else REPO / "nvr" / "resources" / "cranfield"


def shared_beir_dir(name: str) -> Path | None:
    """../shared/data/<name> when it holds a BEIR corpus, else None (the caller skips what needs it)."""
    folder = SHARED_DATA / name
    return folder if (folder / "corpus.jsonl").exists() else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    """Print one JSON line that the parent process picks up (last line of stdout)."""
    result = {**result, "peak_rss_mb": round(peak_rss_mb(), 1)}
    print("RESULT " + json.dumps(result), flush=True)


def run_role(script: Path, role: str, *args: str) -> dict:
    """Run ``script --role role`` in a subprocess (own peak RSS) and return its RESULT dict plus wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--role", role, *args], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds (user + sys) of the child: far less sensitive than wall time to other jobs on a shared machine
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"role {role} failed with exit code {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT "):]), "process_wall_s": round(wall, 2), "process_cpu_s": round(cpu, 2)}


def verdict(ok: bool) -> str:
    """'met' or 'MISSED': a missed target is printed, never hidden."""
    return "met" if ok else "MISSED"


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def machine_info() -> dict:
    """CPU model, cores, bf16 support, load average and UTC date: recorded with every result (load changes them)."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    return {
        "cpu": model, "cores": os.cpu_count(), "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "load_avg": [round(x, 2) for x in os.getloadavg()], "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "python": platform.python_version(), "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "sentence-transformers", "lightning", "beir", "faiss-cpu"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def print_machine(info: dict) -> None:
    print(f"machine: {info['cpu']}, {info['cores']} cores, bf16 flags {info['bf16_flags'] or 'none'}; "
          f"load average {info['load_avg']} at {info['date_utc']} UTC; {info['versions']}", flush=True)


def resolve_auto_precision() -> str:
    """What nvr's ``dtype: auto`` resolves to on this CPU (``bfloat16`` or ``float32``): asks nvr's own detector
    (``nvr.utils.precision.resolve_dtype``), else reads the same CPU flags it reads."""
    try:
        from nvr.utils.precision import resolve_dtype
    except ImportError:
        return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"
    return resolve_dtype("auto", "cpu")
