"""Exclusive locks on outputs and cache entries, so two nvr processes never write the same artifact at once.

The lock is an ``fcntl.flock`` on a sibling file ``.<name>.lock`` holding the owner's pid. ``flock`` is released by
the kernel when the process dies, so a killed run never leaves a lock that blocks the next one; the lock file itself
is left in place (removing it would race with a waiter that already opened it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from nvr.utils.errors import LockedError


def lock_path_for(path: str | Path) -> Path:
    """The sibling lock file of ``path`` (``dir/.name.lock``), outside the artifact so renames do not touch it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text) if text else None
    return None


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))


def is_locked(path: str | Path) -> bool:
    """True when another process holds the lock of ``path`` now (a free or missing lock file is False)."""
    lock = lock_path_for(path)
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, wait: bool = False, what: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the block; raise :class:`LockedError` if another process holds it
    (or block until it is free when ``wait``). ``what`` labels the artifact in the message (e.g. "output folder").

    Yields the lock file's path. The parent folder is created if missing. Re-entrant use from the same process on
    the same path is not supported (flock locks are per open file description, so a second acquire would fail).
    """
    lock = lock_path_for(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.flock(fd, flags)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockedError(path, _read_pid(fd), what) from None
            raise
        _write_pid(fd)
        try:
            yield lock
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def entry_lock_path(entry: Path) -> Path:
    """What to lock for the cache entry ``<cache>/<kind>/<key>``: ``<cache>/.locks/<kind>/<key>`` (its lock file then
    lives there, keeping the entry folders free of lock files)."""
    return entry.parent.parent / ".locks" / entry.parent.name / entry.name
