"""Atomic writes: a reader (or a crashed run) never sees a half-written file or folder.

Temp names carry the writer's host and pid (``.<name>.<host>-<pid>.<random>.tmp``; the swap-out of an overwritten
folder is ``.<name>.<host>-<pid>.old``) so the next writer of the same path removes what a killed process left
behind (:func:`clean_stale_siblings`). Outputs get the usual permissions (files ``0666 & ~umask``, folders
``0777 & ~umask``), not mkstemp's private 0600/0700, so teammates on a shared file system can read them.
A full disk (ENOSPC / EDQUOT) while writing becomes a one-line :class:`DiskFullError` naming the path, with
nothing partial left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from nvr.utils.errors import DiskFullError, OutputExistsError

log = logging.getLogger(__name__)
_FULL = (errno.ENOSPC, errno.EDQUOT)
_OWNER_RE = re.compile(r"^(?P<host>[0-9a-f]{8})-(?P<pid>\d+)$")


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``), else by the set-and-restore idiom."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def owner_tag() -> str:
    """``<host>-<pid>`` of this process, embedded in temp names so stale ones can be told from live ones."""
    return f"{_host_tag()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _stale_owner(owner: str) -> bool:
    """True when ``owner`` is a process of this host that is no longer running (other hosts are left alone)."""
    match = _OWNER_RE.match(owner)
    if match is None or match["host"] != _host_tag():
        return False
    pid = int(match["pid"])
    return pid != os.getpid() and not _pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_siblings(path: str | Path) -> list[Path]:
    """Remove the temp files/folders of ``path`` left by killed writers; returns what was removed or restored.

    A stale ``.old`` (the previous output, moved aside by an ``overwrite`` that died before the new one was in
    place) is put back when ``path`` is missing, since it is the user's last complete result; otherwise removed.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    prefix = f".{path.name}."
    touched: list[Path] = []
    try:
        siblings = list(parent.iterdir())
    except OSError:  # an unreadable folder: nothing can be cleaned (the writability checks report it)
        return []
    for sibling in siblings:
        name = sibling.name
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if rest.endswith(".tmp") and _stale_owner(rest.split(".", 1)[0]):
            _remove(sibling)
            touched.append(sibling)
        elif rest.endswith(".old") and _stale_owner(rest[: -len(".old")]):
            if not path.exists():
                with contextlib.suppress(OSError):
                    os.replace(sibling, path)
                    log.warning("%s: restored from %s, the previous result left aside by a killed --overwrite run",
                                path, sibling.name)
            _remove(sibling)
            touched.append(sibling)
    return touched


def _fs_free(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    return None


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _disk_full(err: BaseException, target: Path, tmp: Path, expected: int | None) -> DiskFullError | None:
    """The DiskFullError to raise for ``err`` (None when it is not an out-of-space error)."""
    if not isinstance(err, OSError) or err.errno not in _FULL:
        return None
    written = 0
    with contextlib.suppress(OSError):
        written = _tree_size(tmp)
    needed = max(expected or 0, written + 1)
    return DiskFullError(target, needed, _fs_free(target.parent))


def _chmod_default(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def _mkdir_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in _FULL:
            raise DiskFullError(path.parent, None, None) from err
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8",
                expected_bytes: int | None = None) -> Iterator[IO]:
    """Write to a temp file beside ``path`` and rename it into place only if the block succeeds.

    ``expected_bytes`` (optional) is the size about to be written, reported when the disk fills up.
    """
    path = Path(path)
    _mkdir_parent(path)
    clean_stale_siblings(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _chmod_default(tmp, is_dir=False)
        enc = None if "b" in mode else encoding
        with open(tmp, mode, encoding=enc) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = _disk_full(err, path, tmp, expected_bytes)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            raise full from err
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path, "w", expected_bytes=len(text.encode("utf-8"))) as fh:
        fh.write(text)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2, ensure_ascii: bool = True,
                      sort_keys: bool = False, allow_nan: bool = True, newline: bool = True) -> None:
    """``json.dump(obj, **options)`` (+ a final newline) written atomically: every JSON artifact goes through here,
    so a killed run never leaves a truncated one. ``allow_nan=False`` turns a NaN into a ValueError, not bad JSON."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, allow_nan=allow_nan)
        if newline:
            fh.write("\n")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb", expected_bytes=len(data)) as fh:
        fh.write(data)


def _swap_in(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` onto ``path``; without ``overwrite`` re-check here, at rename time, so a
    concurrent writer that finished first is never replaced (the loser gets OutputExistsError)."""
    if not overwrite:
        if path.exists() or path.is_symlink():
            raise OutputExistsError(path)
        try:
            os.rename(tmp, path)  # onto a non-empty folder this fails instead of replacing it
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise OutputExistsError(path) from err
            raise
        return
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.{owner_tag()}.old")
    _remove(old)
    os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temp name and swap it in at the end; refuse an existing one unless ``overwrite``
    (checked before the block and again at rename time)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    _mkdir_parent(path)
    clean_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent))
    try:
        _chmod_default(tmp, is_dir=True)
        yield tmp
        _swap_in(tmp, path, overwrite)
    except BaseException as err:
        full = _disk_full(err, path, tmp, None) or _inside_to_target(err, tmp, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from err
        raise


def _inside_to_target(err: BaseException, tmp: Path, path: Path) -> DiskFullError | None:
    """A DiskFullError of a file inside the temp folder, re-named to where that file was going."""
    if not isinstance(err, DiskFullError):
        return None
    try:
        rel = Path(err.path).relative_to(tmp)
    except ValueError:
        return None
    return DiskFullError(path / rel, err.needed, err.free)
