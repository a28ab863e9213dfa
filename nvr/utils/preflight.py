"""Writability checks run before any model is loaded, so a bad output or cache location fails in a second with
one line naming it, instead of with a traceback after the whole corpus was encoded.

Each check walks up to the nearest existing ancestor of the location: every existing part must be a folder
(``NotADirectoryError`` otherwise) and the first existing folder must accept a new entry (a real probe: a temp file
created and removed, which catches read-only file systems, permissions and ACLs alike).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from nvr.utils.atomic import clean_stale_siblings
from nvr.utils.errors import OutputExistsError, PathError


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists; a file on the way up is an error."""
    for part in [path, *path.parents]:
        if part.exists():
            return part
    return Path(".")


def _probe(folder: Path) -> None:
    """Create and remove a temp file in ``folder``; raises OSError when that is not allowed."""
    fd, name = tempfile.mkstemp(prefix=".nvr-write-probe.", dir=folder)
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def _check_creatable(path: Path, key: str | None) -> None:
    """``path`` (absent) can be created: its nearest existing ancestor is a writable folder."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise PathError(path, f"cannot create it: {base} is a file, not a folder", key)
    _check_writable_folder(base, key, shown=path)


def _check_writable_folder(folder: Path, key: str | None, shown: Path | None = None) -> None:
    try:
        _probe(folder)
    except OSError as err:
        reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on device",
                  errno.EDQUOT: "disk quota exceeded"}.get(err.errno or -1, err.strerror or str(err))
        target = shown if shown is not None else folder
        where = "" if shown is None or folder == shown else f" (in {folder})"
        raise PathError(target, f"not writable: {reason}{where}", key) from err


def check_output_dir(path: str | Path, key: str | None = None, overwrite: bool = False) -> None:
    """An output folder: absent (creatable) or, with ``overwrite``, an existing folder beside which a new one
    can be built. Temp siblings left by killed runs are cleaned first (a stale ``.old`` swap-out is put back
    when the folder is missing), so the checks see the state the final rename will see."""
    path = Path(path).expanduser()
    clean_stale_siblings(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise PathError(path, "exists and is a file; an output folder is needed here", key)
        if not overwrite:
            raise OutputExistsError(path)
        _check_writable_folder(path.parent if str(path.parent) else Path("."), key, shown=path)
        return
    _check_creatable(path, key)


def check_output_file(path: str | Path, key: str | None = None, overwrite: bool = False) -> None:
    """An output file: not an existing folder, absent unless ``overwrite``, in a writable folder (temp siblings
    of killed writers are cleaned first)."""
    path = Path(path).expanduser()
    clean_stale_siblings(path)
    if path.is_dir():
        raise PathError(path, "is a directory; give a file path", key)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    if path.exists():
        _check_writable_folder(path.parent if str(path.parent) else Path("."), key, shown=path)
        return
    _check_creatable(path, key)


def check_cache_dir(path: str | Path, key: str | None = None) -> None:
    """A cache folder: an existing writable folder, or creatable."""
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise PathError(path, "is a file; the cache needs a folder", key)
        _check_writable_folder(path, key)
        return
    _check_creatable(path, key)


# ---------------------------------------------------------------------------------------------- nvr mine
