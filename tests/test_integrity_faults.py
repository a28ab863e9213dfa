"""Integrity under faults (issue 16): output locks, fail-early location checks, disk full, stale temp cleanup and
OS errors as one line. Each CLI case asserts the message, exit code 2 and the state of the output / cache folders.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _cli import assert_one_line_error, run_cli
from _reliability import copy_beir, leftovers, mine_config, write_yaml

from nvr.cli.main import main as nvr_main
from nvr.utils.atomic import (
    atomic_dir,
    atomic_file,
    clean_stale_siblings,
    owner_tag,
    write_json_atomic,
    write_text_atomic,
)
from nvr.utils.errors import DiskFullError, LockedError, OutputExistsError
from nvr.utils.locking import exclusive_lock, is_locked, lock_path_for

HOLD_LOCK = """
import sys, time
from nvr.utils.locking import exclusive_lock
with exclusive_lock(sys.argv[1], what="output folder"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def beir(tiny_beir_dir: Path, tmp_path: Path) -> Path:
    return copy_beir(tiny_beir_dir, tmp_path / "beir")


@pytest.fixture
def job(beir: Path, tiny_bert_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    def make(**overrides) -> Path:
        cfg = mine_config(beir, tiny_bert_dir, tmp_path / "runs" / "out", tmp_path / "cache", **overrides)
        return write_yaml(tmp_path / "mine.yaml", cfg)

    return make


@pytest.fixture
def no_model_load(monkeypatch) -> None:
    """Any model load fails the test: location errors must come before it."""
    import nvr.modeling.embedder as embedder_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the location check")

    monkeypatch.setattr(embedder_module.Embedder, "from_config", classmethod(refuse))
    monkeypatch.setattr(embedder_module.Embedder, "from_pretrained", classmethod(refuse))


def hold_lock(path: Path, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------- locking
def test_lock_is_exclusive_across_processes_and_freed_when_the_holder_dies(tmp_path: Path) -> None:
    target = tmp_path / "out"
    holder = hold_lock(target)
    try:
        assert is_locked(target)
        with pytest.raises(LockedError, match=rf"output folder {target} is being written by another nvr process "
                                              rf"\(pid {holder.pid}\)"), exclusive_lock(target, what="output folder"):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert not is_locked(target)  # the kernel released the flock of the killed holder
    with exclusive_lock(target) as lock:
        assert lock == lock_path_for(target) and lock.read_text().strip() == str(os.getpid())
    assert not target.exists()


def test_lock_waits_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    holder = hold_lock(target, seconds=1.0)
    started = time.monotonic()
    with exclusive_lock(target, wait=True):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 0.3


def test_second_mine_on_a_locked_output_fails_and_leaves_it_alone(job, tmp_path: Path, no_model_load,
                                                                  capsys) -> None:
    out = tmp_path / "runs" / "out"
    holder = hold_lock(out)
    try:
        code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
        assert_one_line_error(code, err, str(out), "being written by another nvr process", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists() and leftovers(out.parent) == []
    assert not (tmp_path / "cache" / "embeddings").exists()


def test_atomic_dir_rechecks_at_rename_time(tmp_path: Path) -> None:
    """Two writers without overwrite: the one that finishes second fails instead of replacing the first."""
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError), atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("loser")
        with atomic_dir(out) as other:  # a concurrent writer that finishes first
            (other / "mine.txt").write_text("winner")
    assert (out / "mine.txt").read_text() == "winner" and leftovers(tmp_path) == []


def test_concurrent_mine_finishing_first_is_not_replaced(job, tmp_path: Path, monkeypatch, capsys) -> None:
    """A writer that did not take the lock (an older nvr, a copy by hand) lands while this run mines."""
    import nvr.mining.pipeline as pipeline

    out = tmp_path / "runs" / "out"
    real = pipeline.run_mining

    def mine_while_other_lands(cfg):
        res = real(cfg)
        out.mkdir(parents=True)
        (out / "mined.jsonl").write_text("other run\n")
        return res

    monkeypatch.setattr(pipeline, "run_mining", mine_while_other_lands)
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert_one_line_error(code, err, str(out), "output already exists")
    assert (out / "mined.jsonl").read_text() == "other run\n" and leftovers(out.parent) == []


# ------------------------------------------------------------------------------------ fail early: locations
def test_output_whose_parent_is_a_file(job, tmp_path: Path, no_model_load, capsys) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("a file")
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert_one_line_error(code, err, "'output_dir'", str(blocker), "is a file")
    assert blocker.read_text() == "a file" and not (tmp_path / "cache").exists()


def test_output_dir_that_is_a_file(job, tmp_path: Path, no_model_load, capsys) -> None:
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    out.write_text("precious")
    code, err = run_cli("mine", "--config", str(job()), "--overwrite", "true", capsys=capsys)
    assert_one_line_error(code, err, "'output_dir'", str(out), "is a file")
    assert out.read_text() == "precious" and leftovers(out.parent) == []


def test_cache_dir_that_is_a_file(job, tmp_path: Path, no_model_load, capsys) -> None:
    (tmp_path / "cache").write_text("not a folder")
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert_one_line_error(code, err, "'cache_dir'", str(tmp_path / "cache"), "is a file")
    assert not (tmp_path / "runs" / "out").exists()


def test_read_only_output_location(job, tmp_path: Path, no_model_load, monkeypatch, capsys) -> None:
    """EROFS from the write probe (a real read-only mount needs privileges; chmod does not stop root)."""
    import nvr.utils.preflight as preflight

    real = preflight._probe

    def read_only(folder: Path) -> None:
        if Path(folder).resolve() == tmp_path.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(folder))
        real(folder)

    monkeypatch.setattr(preflight, "_probe", read_only)
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert_one_line_error(code, err, "'output_dir'", str(tmp_path / "runs" / "out"), "read-only file system")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_permission_denied_output_location(job, tmp_path: Path, no_model_load, capsys) -> None:
    locked = tmp_path / "runs"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
        assert_one_line_error(code, err, "'output_dir'", "not writable")
    finally:
        locked.chmod(0o755)


def test_export_path_that_is_a_directory(job, tmp_path: Path, no_model_load, capsys) -> None:
    target = tmp_path / "exported"
    target.mkdir()
    code, err = run_cli("mine", "--config", str(job()), "--export", "st", "--export_path", str(target), capsys=capsys)
    assert_one_line_error(code, err, "'export_path'", str(target), "is a directory")
    assert not (tmp_path / "runs" / "out").exists()


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_eval_output_that_is_a_directory(overwrite: str, tiny_bert_dir: Path, beir: Path, tmp_path: Path,
                                         no_model_load, capsys) -> None:
    target = tmp_path / "metrics"
    target.mkdir()
    code, err = run_cli("eval", "--model", str(tiny_bert_dir), "--beir", str(beir), "--output", str(target),
                        "--overwrite", overwrite, "--cache_dir", str(tmp_path / "cache"), capsys=capsys)
    assert_one_line_error(code, err, "'--output'", str(target), "is a directory", command="eval")
    assert target.is_dir() and not any(target.iterdir()) and not (tmp_path / "cache").exists()


def test_eval_cache_dir_that_is_a_file(tiny_bert_dir: Path, beir: Path, tmp_path: Path, no_model_load,
                                       capsys) -> None:
    (tmp_path / "cache").write_text("x")
    code, err = run_cli("eval", "--model", str(tiny_bert_dir), "--beir", str(beir), "--output",
                        str(tmp_path / "m.json"), "--cache_dir", str(tmp_path / "cache"), capsys=capsys)
    assert_one_line_error(code, err, "'--cache_dir'", "is a file", command="eval")
    assert not (tmp_path / "m.json").exists()


def test_ablate_output_dir_under_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "blocker").write_text("x")
    base = write_yaml(tmp_path / "base.yaml", {"trainer": {"max_steps": 1}})
    spec = write_yaml(tmp_path / "spec.yaml", {"name": "s", "base_config": str(base), "seeds": [0],
                                               "output_dir": str(tmp_path / "blocker" / "abl"),
                                               "variants": [{"name": "a"}]})
    code, err = run_cli("ablate", "--config", str(spec), "--dry_run", capsys=capsys)
    assert_one_line_error(code, err, "'output_dir'", "is a file", command="ablate")


# ---------------------------------------------------------------------------------------------- disk full
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("options", [{}, {"ensure_ascii": False}, {"indent": None, "sort_keys": True, "newline": False},
                                     {"allow_nan": False, "ensure_ascii": False}])
def test_write_json_atomic_is_json_dump_in_place(options: dict, tmp_path: Path) -> None:
    """The one JSON writer of every artifact: the bytes json.dump writes with the same options (+ newline)."""
    obj = {"zeta": 1.5, "alpha": ["café", None, True], "n": {"b": 2, "a": 1}}
    out = tmp_path / "x.json"
    write_json_atomic(out, obj, **options)
    newline = options.pop("newline", True)
    expected = json.dumps(obj, **{"indent": 2, **options}) + ("\n" if newline else "")
    assert out.read_bytes() == expected.encode("utf-8")


def test_write_json_atomic_refusing_nan_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    write_json_atomic(out, {"ok": 1})
    with pytest.raises(ValueError):
        write_json_atomic(out, {"bad": float("nan")}, allow_nan=False)
    assert json.loads(out.read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_writers_turn_enospc_into_one_line(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    with pytest.raises(DiskFullError, match=rf"{target}: no space left on device .*needs at least 4096 bytes"):
        with atomic_file(target, "wb", expected_bytes=4096) as fh:
            fh.write(b"x" * 10)
            _enospc()
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []
    folder = tmp_path / "folder"
    with pytest.raises(DiskFullError, match=rf"{folder / 'inner.txt'}: no space left"), atomic_dir(folder) as tmp:
        with atomic_file(tmp / "inner.txt") as fh:
            fh.write("partial")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert not folder.exists() and leftovers(tmp_path) == []


def test_disk_full_while_writing_mine_outputs(job, tmp_path: Path, monkeypatch, capsys) -> None:
    import nvr.mining.pipeline as pipeline

    monkeypatch.setattr(pipeline, "plot_report", _enospc)
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    out = tmp_path / "runs" / "out"
    assert_one_line_error(code, err, str(out), "no space left on device", "bytes")
    assert not out.exists() and leftovers(out.parent) == []


def test_disk_full_while_writing_cache_shards_then_resume(job, tmp_path: Path, monkeypatch, capsys) -> None:
    """ENOSPC on an embedding shard: one line naming the shard, nothing half-written; a re-run completes."""
    real_fsync = os.fsync
    cache = tmp_path / "cache"

    def full_under_cache(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(cache / "embeddings")):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_under_cache)
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert_one_line_error(code, err, str(cache / "embeddings"), "no space left on device")
    assert not (tmp_path / "runs" / "out").exists()
    for folder in (cache / "embeddings").rglob("*"):
        if folder.is_dir():
            assert leftovers(folder) == [], folder
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "out" / "mined.jsonl").is_file()


# ---------------------------------------------------------------------------------------------- stale temps
def _host() -> str:
    return owner_tag().split("-")[0]


def test_stale_temp_siblings_of_dead_writers_are_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = dead_pid()
    stale_dir = tmp_path / f".out.{_host()}-{dead}.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "half.jsonl").write_text("x")
    stale_old = tmp_path / f".out.{_host()}-{dead}.old"
    stale_old.mkdir()
    live = tmp_path / f".out.{_host()}-{os.getppid()}.def456.tmp"  # a running process (pytest's parent)
    live.mkdir()
    foreign = tmp_path / f".out.0000beef-{dead}.aaa.tmp"  # another host on a shared file system
    foreign.mkdir()
    other = tmp_path / f".outer.{_host()}-{dead}.x.tmp"  # another output's temp
    other.mkdir()
    out.mkdir()
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "new.txt").read_text() == "new"
    assert not stale_dir.exists() and not stale_old.exists()
    assert live.exists() and foreign.exists() and other.exists()


def test_stale_old_is_restored_when_the_output_is_missing(tmp_path: Path) -> None:
    """An --overwrite killed between its two renames leaves the previous result only in .old: put it back."""
    out = tmp_path / "out"
    old = tmp_path / f".out.{_host()}-{dead_pid()}.old"
    old.mkdir()
    (old / "mined.jsonl").write_text("previous result")
    assert clean_stale_siblings(out) == [old]
    assert (out / "mined.jsonl").read_text() == "previous result" and leftovers(tmp_path) == []


def test_next_mine_cleans_temps_of_a_killed_run(job, tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs" / "out"
    out.parent.mkdir(parents=True)
    dead = dead_pid()
    (out.parent / f".out.{_host()}-{dead}.k1ll3d.tmp").mkdir()
    (out.parent / f".mined.jsonl.{_host()}-{dead}.x.tmp").write_text("half")
    write_text_atomic(out.parent / "mined.jsonl", "unrelated file next to it\n")  # cleans its own stale temp
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert code == 0, err
    assert leftovers(out.parent) == [] and (out / "mined.jsonl").is_file()


# ---------------------------------------------------------------------------------------------- OS errors
@pytest.mark.parametrize("err,fragment", [
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/metrics"), "/data/metrics: is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file/x"), "/data/file/x: a parent"),
    (FileExistsError(errno.EEXIST, "File exists", "/data/out"), "/data/out: already exists"),
    (PermissionError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), "/mnt/ro/out: read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/shard.npy"), "/data/shard.npy: no space left"),
])
def test_os_errors_are_one_line_naming_the_path(err: OSError, fragment: str, monkeypatch, capsys) -> None:
    import nvr.cli.eval as eval_cli

    def boom(argv):
        raise err

    monkeypatch.setattr(eval_cli, "main", boom)
    code, out = run_cli("eval", capsys=capsys)
    assert_one_line_error(code, out, fragment, command="eval")
    assert len(out.strip().splitlines()) == 1


def test_os_error_without_a_path_is_still_a_bug(monkeypatch) -> None:
    import nvr.cli.eval as eval_cli

    def boom(argv):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset")

    monkeypatch.setattr(eval_cli, "main", boom)
    with pytest.raises(ConnectionResetError):
        nvr_main(["eval"])


def test_manifest_of_a_locked_run_is_written_once(job, tmp_path: Path, capsys) -> None:
    """A normal run takes and releases the lock; the lock file is left beside the output (not a temp)."""
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert code == 0, err
    out = tmp_path / "runs" / "out"
    assert lock_path_for(out).exists() and not is_locked(out)
    assert json.loads((out / "manifest.json").read_text())["counts"]["written"] > 0
    assert leftovers(out.parent) == []
