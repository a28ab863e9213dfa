"""Content fingerprints of input files and model folders, memoized by file identity so a warm run does not re-hash.

A file's sha256 is memoized in ``<memo_dir>/files/<sha256(resolved path)[:32]>.json`` together with the file's
identity ``(resolved path, size, mtime_ns, inode, ctime_ns)``. A user can set the size and mtime of a file (``cp -p``,
``os.utime``) but not its inode change time, so a file replaced in place with the same size and mtime is hashed
again; an unchanged file costs one ``stat`` and one small JSON read. A file changed less than
:data:`SETTLE_NS` before it was hashed is "racy" (as in git): on a file system with coarse timestamps a later write in
the same clock tick would leave its identity unchanged, so it is hashed again once that tick has passed before the
memo is written. Settled digests are also kept in memory for the rest of the process under the same rule, so a
caller without a cache folder (an adapter save, an export) hashes a 7B base once per process.

A model's fingerprint is the content of every file of its folder (weights, ``config.json``, every tokenizer file:
vocabulary, normalizer / lower-casing, special tokens), plus the base model's fingerprint for an nvr LoRA adapter
folder (whose base weights live elsewhere). It never loads the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvr.utils.atomic import write_text_atomic
from nvr.utils.hashing import sha256_json

log = logging.getLogger(__name__)

MEMO_VERSION = 1
_CHUNK = 1 << 22
_IGNORED_SUFFIXES = (".md", ".lock", ".tmp")
"""Files of a model folder that never change an embedding (model cards, lock and temp files)."""
NVR_META_FILE = "nvr_embedder.json"
SETTLE_NS = 50_000_000
"""Timestamps closer than this to the start of hashing may share a clock tick with a later write (coarse kernel
timestamps tick every 1-10 ms); file systems with whole-second timestamps get 2 s."""


def file_identity(path: str | Path) -> dict[str, Any]:
    """What identifies a file's current content without reading it (``ctime_ns`` cannot be set by a user)."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return {"path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "dev": st.st_dev, "ctime_ns": st.st_ctime_ns}


def sha256_file(path: str | Path) -> str:
    """Streaming sha256 of a file's bytes (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _memo_file(memo_dir: Path, resolved: str) -> Path:
    return memo_dir / "files" / f"{hashlib.sha256(resolved.encode('utf-8')).hexdigest()[:32]}.json"


_PROCESS_MEMO: dict[str, tuple[dict[str, Any], str]] = {}
"""resolved path -> (identity, sha256): the same rule as the on-disk memo, for callers without a cache folder (an
adapter save or an export hashing a 7B base once per process, not once per save)."""


def file_sha256(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """sha256 of ``path``'s content, read from the memo when the file's identity is unchanged since it was hashed.

    The on-disk memo is written only when ``memo_dir``'s parent (the cache folder) exists; settled digests are also
    kept for the rest of the process.
    """
    ident = file_identity(path)
    known = _PROCESS_MEMO.get(ident["path"])
    if known is not None and known[0] == ident:
        return known[1]
    memo = _memo_file(Path(memo_dir), ident["path"]) if memo_dir is not None else None
    if memo is not None:
        try:
            record = json.loads(memo.read_text(encoding="utf-8"))
            if record.get("version") == MEMO_VERSION and record.get("identity") == ident:
                _PROCESS_MEMO[ident["path"]] = (ident, str(record["sha256"]))
                return str(record["sha256"])
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    started = time.time_ns()
    digest = sha256_file(ident["path"])
    unchanged = file_identity(path) == ident
    if unchanged and not _racy(ident, started):
        _PROCESS_MEMO[ident["path"]] = (ident, digest)
    # memoize only when the file did not change while it was read, and never create a cache folder just for this
    if memo is None or not Path(memo_dir).parent.is_dir() or not unchanged:
        return digest
    if _racy(ident, started):
        # a write in the tick of the file's last change would keep its identity: wait for that tick to pass, then
        # hash again, so the memoized digest is the content any later identity-preserving write would change
        wait_ns = _last_change(ident) + _settle_ns(ident) - time.time_ns()
        if wait_ns > _settle_ns(ident):  # timestamps in the future (clock skew, utime): no tick to wait for
            return digest
        time.sleep(max(0, wait_ns) / 1e9)
        digest = sha256_file(ident["path"])
        if file_identity(path) != ident:
            return digest
        _PROCESS_MEMO[ident["path"]] = (ident, digest)
    try:
        write_text_atomic(memo, json.dumps({"version": MEMO_VERSION, "identity": ident, "sha256": digest}))
    except OSError as err:  # a read-only cache only costs a re-hash next time
        log.debug("cannot memoize the hash of %s in %s: %s", path, memo, err)
    return digest


def _last_change(ident: Mapping[str, Any]) -> int:
    return max(int(ident["mtime_ns"]), int(ident["ctime_ns"]))


def _settle_ns(ident: Mapping[str, Any]) -> int:
    whole_seconds = ident["mtime_ns"] % 1_000_000_000 == 0 and ident["ctime_ns"] % 1_000_000_000 == 0
    return 2_000_000_000 if whole_seconds else SETTLE_NS


def _racy(ident: Mapping[str, Any], started_ns: int) -> bool:
    """True when the file changed so shortly before ``started_ns`` that a later write could share its timestamps."""
    return started_ns < _last_change(ident) + _settle_ns(ident)


def settled(mtime_ns: int, ctime_ns: int, started_ns: int) -> bool:
    """True when a file last changed at (``mtime_ns``, ``ctime_ns``) cannot be rewritten later without changing
    them, as seen from a check that started at ``started_ns`` (the tick of its last change is over)."""
    return not _racy({"mtime_ns": mtime_ns, "ctime_ns": ctime_ns}, started_ns)


def files_fingerprint(files: Mapping[str, str | Path], memo_dir: str | Path | None = None) -> dict[str, dict]:
    """``{role: {"sha256", "bytes"}}`` of named input files (e.g. ``corpus``, ``queries``, ``qrels/train.tsv``)."""
    out: dict[str, dict] = {}
    for role, path in sorted(files.items()):
        out[role] = {"sha256": file_sha256(path, memo_dir), "bytes": Path(path).stat().st_size}
    return out


def folder_files(folder: str | Path) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of every file under ``folder`` that can change a model's output, sorted.

    Hidden entries (``.git``, ``.cache``, lock files) and model cards (``*.md``) are left out.
    """
    folder = Path(folder)
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.name.endswith(_IGNORED_SUFFIXES):
            continue
        if path.is_file():
            found.append((rel.as_posix(), path))
    return sorted(found)


def folder_fingerprint(folder: str | Path, memo_dir: str | Path | None = None) -> str:
    """sha256 over the (relative name, content sha256) of every file of ``folder`` (see :func:`folder_files`)."""
    return sha256_json([[name, file_sha256(path, memo_dir)] for name, path in folder_files(folder)])


def model_folder(name_or_path: str) -> Path | None:
    """The local folder of a model: a folder, a packaged copy of a known HF id, or the HF cache snapshot of an id
    already downloaded; None when the model is not on this machine yet."""
    from nvr.utils.models import resolve_model_path

    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not cached, not a repo id, no huggingface_hub: the caller loads the model instead
        return None


def model_fingerprint(
    name_or_path: str, memo_dir: str | Path | None = None, _seen: frozenset[str] = frozenset()
) -> str | None:
    """Content fingerprint of a model folder (+ the base model of an nvr adapter folder); None when not local."""
    folder = model_folder(name_or_path)
    if folder is None:
        return None
    parts: dict[str, Any] = {"files": folder_fingerprint(folder, memo_dir)}
    base = _adapter_base(folder)
    resolved = str(folder.resolve())
    if base is not None and resolved not in _seen:
        parts["base"] = model_fingerprint(base, memo_dir, _seen | {resolved}) or f"unresolved:{base}"
    return sha256_json(parts)


def _adapter_base(folder: Path) -> str | None:
    """The base model an nvr LoRA adapter folder is applied to (its weights are not in the folder)."""
    meta_path = folder / NVR_META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("backbone") != "adapter":
        return None
    base = (meta.get("config") or {}).get("model_name_or_path")
    return str(base) if base else None


def memo_dir_for(cache_dir: str | Path | None) -> Path | None:
    """Where fingerprints are memoized for a cache folder (``<cache_dir>/fingerprints``)."""
    return None if cache_dir is None else Path(os.path.expanduser(str(cache_dir))) / "fingerprints"
