"""Errors that tell the user what to fix: every input error names its file and line, or its config key."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


class NvrError(Exception):
    """Base class for errors caused by user input or configuration (not by bugs)."""


class InputError(NvrError, ValueError):
    """A bad input file: carries the file and 1-based line number so the message points at the row."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class ConfigError(NvrError, ValueError):
    """A bad configuration value: carries the dotted key (e.g. ``filter.perc``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"config key '{key}': {message}")


class OutputExistsError(NvrError, FileExistsError):
    """Refuse to clobber a previous result unless the user asked for ``overwrite``."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"{path}: output already exists; pass --overwrite true (or choose another path)")


class LockedError(NvrError):
    """Another nvr process holds the lock on an output or cache entry: running both would let one replace the other."""

    def __init__(self, path: str | Path, pid: int | None = None, what: str = "") -> None:
        self.path = str(path)
        self.pid = pid
        owner = f"pid {pid}" if pid is not None else "pid unknown"
        label = f"{what} " if what else ""
        super().__init__(
            f"{label}{path} is being written by another nvr process ({owner}); wait for it to finish, "
            "or choose another path"
        )


class DiskFullError(NvrError):
    """The file system ran out of space (or quota) while writing an output: nothing partial was left behind."""

    def __init__(self, path: str | Path, needed: int | None = None, free: int | None = None) -> None:
        self.path = str(path)
        self.needed = needed
        self.free = free
        need = f"needs at least {needed} bytes" if needed is not None else "needs more space"
        have = f", {free} bytes free" if free is not None else ""
        super().__init__(f"{path}: no space left on device while writing ({need}{have}); free some space or "
                         "choose another location, then re-run (finished cache shards are kept)")


class PathError(NvrError, OSError):
    """An output or cache location that cannot be used (a file where a folder is needed, read-only, ...)."""

    def __init__(self, path: str | Path, message: str, key: str | None = None) -> None:
        self.path = str(path)
        self.key = key
        label = f"config key '{key}': " if key else ""
        super().__init__(f"{label}{path}: {message}")


_OS_ERRNO_TEXT = {
    errno.EEXIST: "already exists",
    errno.EISDIR: "is a directory (a file is needed here)",
    errno.ENOTDIR: "a parent of this path is a file, not a folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "no such file or folder",
    errno.ENOTEMPTY: "folder is not empty",
}

USER_ERRNOS = frozenset(_OS_ERRNO_TEXT)
"""errno values that mean "this path cannot be used as given" (the CLI reports them as one line)."""


def os_error_message(err: OSError) -> str:
    """One line for an OS error that names the path (``<path>: <what>``), for the CLI's last-resort handler."""
    what = _OS_ERRNO_TEXT.get(err.errno or -1) or (err.strerror or type(err).__name__)
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(str(os.fsdecode(p)) for p in paths)
    return f"{where}: {what}" if where else f"{what} ({err})"


@contextlib.contextmanager
def config_key_scope(prefix: str, replacement: str) -> Iterator[None]:
    """Re-key ``ConfigError``s raised inside the block: ``prefix.x`` becomes ``replacement.x``.

    Shared loaders report generic keys (``embedder.model_name_or_path``); a caller that knows where the value came
    from (``teachers[<name>]`` of a mine config) wraps the call so the message names the key the user wrote.
    """
    try:
        yield
    except ConfigError as err:
        if err.key == prefix or err.key.startswith(f"{prefix}."):
            new_key = replacement + err.key[len(prefix):]
            raise ConfigError(new_key, err.message) from err
        raise


def nvr_error_in(err: BaseException) -> NvrError | None:
    """The first nvr error in ``err``'s cause/context chain (jsonargparse re-raises while handling it, wrapping a
    config dataclass's own ``ConfigError`` in its Union / parse errors)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, NvrError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
