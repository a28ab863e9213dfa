"""Resumable, fingerprinted, checksummed embedding cache shared by all mining processes.

Layout: ``root/<key>/manifest.json``, ``shard-00000.npy`` ... while encoding, then one ``embeddings.npy`` once
complete (shards are removed after assembly). Every ``.npy`` is written atomically with a checksum sidecar
(``<file>.sum``, see ``nvr.utils.checksum``) and verified before it is used: a shard or assembled file that is
truncated, overwritten with garbage or has no checksum is recomputed with a one-line warning naming it, never used.
A killed run resumes from its finished shards; the temp files a killed single-process run leaves behind are deleted
when a run resumes. Under torchrun each rank encodes shards ``i % world_size == rank``; rank 0 assembles and the
other ranks wait for the (verified) assembled file, so the result is the same array for any world size.

Within one process, a file that verified is not hashed again while its identity and its sidecar's (inode, size,
mtime, ctime; a user cannot set ctime) are unchanged, so a run that reads the corpus embeddings twice (e.g. to
re-build short queries at ``max_depth``) verifies them once.

Writers take an exclusive lock per shard and on the assembled file (``nvr.utils.locking``, waiting for it), so two
processes never write the same file and the second one finds the first one's result. Ranks encode different shards,
so they never wait on each other's locks.

The folder depends on the settings key and the texts only, not on the shard size: the shard size a run started
with is recorded in ``manifest.json`` and a resumed run keeps it (so its finished shards stay valid), and a
finished ``embeddings.npy`` is reused whatever shard size is asked for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nvr.utils.atomic import write_text_atomic
from nvr.utils.checksum import (
    checksummed_file,
    digest_file,
    remove_with_sidecar,
    sidecar,
    verify_sidecar,
    write_sidecar,
)
from nvr.utils.fingerprint import settled
from nvr.utils.hashing import sha256_json, sha256_texts
from nvr.utils.locking import exclusive_lock

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]
RowsFn = Callable[[int, int], np.ndarray]
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 10000
_FINAL = "embeddings.npy"
_FOLDER_SHARD_SIZE = 10000
"""Constant hashed into every folder name: folders were once keyed by the shard size (always 10,000 then), so
hashing the same value keeps those caches valid now that the shard size lives in ``manifest.json`` only."""
_PROCESS_START = time.time()
"""Temp files last modified before this process imported the cache belong to an earlier (killed) run."""


def embedding_key(
    model_fingerprint: str, pooling: str, prefix: str, max_length: int, dtype: str, **extra: object
) -> str:
    """Fingerprint of every setting that changes an embedding (texts are hashed by the cache itself)."""
    settings = {"model": model_fingerprint, "pooling": pooling, "prefix": prefix, "max_length": max_length}
    return sha256_json({**settings, "dtype": dtype, **extra})


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) from the torchrun environment, (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class EmbeddingCache:
    """Embeddings of text lists, keyed by (settings key, texts); see the module docstring for the layout."""

    def __init__(self, root: str | Path, wait_timeout_s: float = 3600.0, poll_s: float = 0.5) -> None:
        self.root = Path(root)
        self.wait_timeout_s = wait_timeout_s
        """Give up waiting for other ranks after this long without any new shard appearing."""
        self.poll_s = poll_s
        self._verified: dict[Path, tuple] = {}
        """File -> ``_stat_pair`` when it last verified in this process (see :meth:`_load_checked`)."""

    def folder(self, key: str, texts: Sequence[str]) -> Path:
        """Folder of one (settings, texts) combination."""
        ident = {"key": key, "texts": sha256_texts(texts), "shard_size": _FOLDER_SHARD_SIZE}
        return self.root / sha256_json(ident)[:32]

    def get_or_encode(
        self,
        key: str,
        texts: Sequence[str],
        encode_fn: EncodeFn,
        shard_size: int = DEFAULT_SHARD_SIZE,
        rank: int = 0,
        world_size: int = 1,
    ) -> np.ndarray:
        """``[N, H]`` float32 embeddings of ``texts`` (a read-only memmap), encoding only the missing shards.

        ``encode_fn(list_of_texts) -> [n, H]`` is called once per missing (or corrupted) shard owned by this rank.
        An empty ``texts`` gives a ``(0, 0)`` array without calling ``encode_fn``. ``shard_size`` applies to a new
        folder; an interrupted one resumes with the shard size recorded in its manifest.
        """
        if shard_size <= 0:
            raise ValueError(f"shard_size must be > 0, got {shard_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if len(texts) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return self._get_or_compute(key, texts, lambda a, b: encode_fn(list(texts[a:b])), shard_size, rank,
                                    world_size)

    def get(self, key: str, texts: Sequence[str]) -> np.ndarray | None:
        """The finished, verified ``[N, H]`` embeddings of ``(key, texts)``, or None (nothing is encoded)."""
        if len(texts) == 0:
            return None
        return self._load_checked(self.folder(key, texts) / _FINAL, len(texts), warn=True)

    def put(self, key: str, texts: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        """Store embeddings computed elsewhere (e.g. gathered by the validation loop) under ``(key, texts)``,
        through the same sharded, checksummed, locked path as :meth:`get_or_encode`; an existing verified entry
        wins (it is returned unchanged)."""
        rows = np.asarray(embeddings, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] != len(texts):
            raise ValueError(f"put: {rows.shape} embeddings for {len(texts)} texts")
        return self._get_or_compute(key, texts, lambda a, b: rows[a:b], len(texts) or 1, 0, 1)

    # ------------------------------------------------------------------------------------------------ internals
    def _get_or_compute(self, key: str, texts: Sequence[str], rows_fn: RowsFn, shard_size: int, rank: int,
                        world_size: int) -> np.ndarray:
        """:meth:`get_or_encode` with ``rows_fn(start, stop)`` giving the rows of ``texts[start:stop]``."""
        folder = self.folder(key, texts)
        final = folder / _FINAL
        loaded = self._load_checked(final, len(texts), warn=True)
        if loaded is not None:
            return loaded
        if rank == 0 and final.exists():
            self._discard_final(final, len(texts))
        if world_size == 1:
            _remove_stale_temp_files(folder)
        shard_size = self._write_manifest(folder, key, texts, shard_size)
        n_shards = -(-len(texts) // shard_size)
        seen = _stat_pair(final)
        for i in range(rank, n_shards, world_size):
            if _stat_pair(final) != seen and final.exists():
                break  # another process assembled the file meanwhile: verify that instead of re-encoding
            self._ensure_shard(folder, i, texts, shard_size, rows_fn)
        if rank != 0:
            return self._wait_for_final(final, len(texts), rank)
        with exclusive_lock(final, wait=True, what="embedding cache file"):
            loaded = _load_verified(final, len(texts), warn=False)  # another process may have assembled it
            if loaded is not None:
                return loaded
            self._wait_for(folder, [_shard_name(i) for i in range(n_shards)], rank)
            for i in range(n_shards):  # re-encode any shard that does not verify (e.g. corrupted on disk)
                self._ensure_shard(folder, i, texts, shard_size, rows_fn)
            self._assemble(folder, n_shards, len(texts))
        return np.load(final, mmap_mode="r")

    def _load_checked(self, path: Path, n_rows: int, warn: bool) -> np.ndarray | None:
        """:func:`_load_verified`, skipping the hash when this process already verified the file and neither it nor
        its sidecar changed since (a file changed within the last clock tick is always hashed again)."""
        state = _stat_pair(path)
        if state[0] is not None and self._verified.get(path) == state:
            arr = _load_array(path, n_rows)
            if arr is not None:
                return arr
        started = time.time_ns()
        arr = _load_verified(path, n_rows, warn)
        self._verified.pop(path, None)
        if arr is not None and _stat_pair(path) == state and all(
            s is not None and settled(s[2], s[3], started) for s in state
        ):
            self._verified[path] = state
        return arr

    def _write_manifest(self, folder: Path, key: str, texts: Sequence[str], shard_size: int) -> int:
        """Record the folder's layout once; returns the shard size in force (an earlier run's, when resuming)."""
        path = folder / "manifest.json"
        recorded = _recorded_shard_size(path)
        if recorded is not None:
            if recorded != shard_size:
                log.info("%s: resuming with the shard size %d it was started with (not %d)", folder, recorded,
                         shard_size)
            return recorded
        manifest = {
            "format_version": FORMAT_VERSION, "key": key, "texts_sha256": sha256_texts(texts),
            "num_texts": len(texts), "shard_size": shard_size, "num_shards": -(-len(texts) // shard_size),
        }
        write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True))
        return _recorded_shard_size(path) or shard_size  # another rank's identical manifest may have won the race

    def _discard_final(self, final: Path, n_texts: int) -> None:
        """Remove an assembled file that failed verification (under its lock: a live writer may be replacing it)."""
        with exclusive_lock(final, wait=True, what="embedding cache file"):
            if final.exists() and _load_verified(final, n_texts, warn=False) is None:
                remove_with_sidecar(final)

    def _ensure_shard(self, folder: Path, i: int, texts: Sequence[str], shard_size: int, rows_fn: RowsFn) -> None:
        """Compute and write shard ``i`` unless a verified copy exists (checked again under the shard's lock)."""
        path = folder / _shard_name(i)
        start, stop = i * shard_size, min((i + 1) * shard_size, len(texts))
        if self._load_checked(path, stop - start, warn=True) is not None:
            return
        with exclusive_lock(path, wait=True, what="embedding cache shard"):
            if _shard_ok(path, stop - start, warn=False):
                return  # written by another process while we waited
            emb = np.asarray(rows_fn(start, stop), dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != stop - start:
                raise ValueError(f"encode_fn returned shape {emb.shape} for {stop - start} texts (shard {i})")
            with checksummed_file(path) as fh:
                np.save(fh, emb, allow_pickle=False)

    def _wait_for(self, folder: Path, names: list[str], rank: int) -> None:
        """Poll until every file exists; the timeout restarts whenever one more file appears."""
        missing = [n for n in names if not (folder / n).exists()]
        deadline = time.monotonic() + self.wait_timeout_s
        while missing:
            if time.monotonic() > deadline:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise TimeoutError(
                    f"rank {rank}: waited {self.wait_timeout_s:.0f}s without progress for {len(missing)} file(s) "
                    f"in {folder} ({shown}) that other ranks should write; did a rank crash? Re-run to resume."
                )
            time.sleep(self.poll_s)
            still = [n for n in missing if not (folder / n).exists()]
            if len(still) < len(missing):
                deadline = time.monotonic() + self.wait_timeout_s
            missing = still

    def _wait_for_final(self, final: Path, n_texts: int, rank: int) -> np.ndarray:
        """Wait until rank 0 has assembled a file that verifies (re-checked whenever its checksum changes)."""
        checked: tuple | None = None
        while True:
            self._wait_for(final.parent, [final.name], rank)
            state = _stat_pair(final)
            if state != checked:
                checked = state
                loaded = _load_verified(final, n_texts, warn=False)
                if loaded is not None:
                    return loaded
            time.sleep(self.poll_s)

    def _assemble(self, folder: Path, n_shards: int, n_texts: int) -> None:
        """Copy the shards into one ``.npy`` (shard by shard, bounded memory) with its checksum, then drop them."""
        shards = [np.load(folder / _shard_name(i), mmap_mode="r") for i in range(n_shards)]
        dims = {s.shape[1] for s in shards}
        if len(dims) != 1 or sum(s.shape[0] for s in shards) != n_texts:
            raise RuntimeError(f"{folder}: inconsistent shards (dims {sorted(dims)}); delete the folder and re-run")
        tmp = folder / f".{_FINAL}.{os.getpid()}.tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_texts, dims.pop()))
        row = 0
        for s in shards:
            out[row : row + s.shape[0]] = s
            row += s.shape[0]
        out.flush()
        del out, shards
        write_sidecar(folder / _FINAL, digest_file(tmp))  # sidecar first: the file never appears unverifiable
        os.replace(tmp, folder / _FINAL)
        for i in range(n_shards):
            remove_with_sidecar(folder / _shard_name(i))


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def _stat_pair(final: Path) -> tuple:
    """Identity of a file and its sidecar (to re-verify only when one of them changed)."""
    out = []
    for p in (final, sidecar(final)):
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def _load_array(path: Path, n_rows: int) -> np.ndarray | None:
    """The ``[n_rows, H]`` float32 array at ``path`` as a read-only memmap, or None (unreadable, other shape)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == n_rows and arr.dtype == np.float32 else None


def _load_verified(path: Path, n_rows: int, warn: bool) -> np.ndarray | None:
    """The ``[n_rows, H]`` float32 array at ``path`` as a read-only memmap when it matches its checksum, else None
    (with a warning naming the file when it exists but is corrupted or unverifiable)."""
    if not path.exists():
        return None
    problem = verify_sidecar(path)
    arr = None
    if problem is None:
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            problem = f"unreadable ({err})"
    if arr is not None and (arr.ndim != 2 or arr.shape[0] != n_rows or arr.dtype != np.float32):
        problem, arr = f"shape {arr.shape} {arr.dtype}, expected ({n_rows}, H) float32", None
    if problem is not None:
        if warn:
            log.warning("%s: %s; recomputing it", path, problem)
        return None
    return arr


def _shard_ok(path: Path, n_rows: int, warn: bool) -> bool:
    return _load_verified(path, n_rows, warn) is not None


def _recorded_shard_size(manifest: Path) -> int | None:
    """The shard size of an existing manifest, or None when there is none (or it is unreadable)."""
    try:
        value = json.loads(manifest.read_text(encoding="utf-8")).get("shard_size")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _remove_stale_temp_files(folder: Path) -> None:
    """Delete the ``.*.tmp`` files a killed run left (a shard or the assembled array being written).

    Called for single-process runs only, and only for files not touched since this process started: a live
    writer (another process sharing the cache) keeps its temp file's mtime current until it renames it.
    """
    for tmp in folder.glob(".*.tmp"):
        try:
            if tmp.stat().st_mtime < _PROCESS_START:
                tmp.unlink()
                log.info("removed %s, left by an interrupted run", tmp)
        except FileNotFoundError:
            continue
