"""Resumable, fingerprinted, checksummed embedding cache shared by all mining processes.

Layout: ``root/<key>/manifest.json``, ``shard-00000.npy`` ... while encoding, then one ``embeddings.npy`` once
complete (shards are removed after assembly). Every ``.npy`` is written atomically with a checksum sidecar
(``<file>.sum``, see ``nvr.utils.checksum``) and verified before it is used: a shard or assembled file that is
truncated, overwritten with garbage or has no checksum is recomputed with a one-line warning naming it, never used.
A killed run resumes from its finished shards; the temp files a killed single-process run leaves behind are deleted
when a run resumes. Under torchrun each rank encodes the shards :func:`shard_owners` gives it (balanced by
token count, not by text count); rank 0 assembles and the
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

Storage dtype (``dtype`` of :meth:`EmbeddingCache.get_or_encode`, ``TeacherConfig.cache_dtype``): ``float32``
(default), ``float16`` or ``bfloat16`` (stored as its raw ``uint16`` bits, since numpy has no bfloat16, and
returned as a :class:`Bfloat16Rows` that converts rows to float32 on read). A half-precision cache halves the disk,
RAM and search traffic of a 7B teacher's corpus; the rounding changes the embeddings, so the storage dtype is part
of the folder identity (float32 folders keep their old names).
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
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
"""Storage dtype name -> the numpy dtype of the files (bfloat16 as its raw 16 bits)."""
_PROCESS_START = time.time()
"""Temp files last modified before this process imported the cache belong to an earlier (killed) run."""


def embedding_key(
    model_fingerprint: str, pooling: str, prefix: str, max_length: int, dtype: str, **extra: object
) -> str:
    """Fingerprint of every setting that changes an embedding (texts are hashed by the cache itself)."""
    settings = {"model": model_fingerprint, "pooling": pooling, "prefix": prefix, "max_length": max_length}
    return sha256_json({**settings, "dtype": dtype, **extra})


class Bfloat16Rows:
    """Read-only ``[N, H]`` bfloat16 matrix over its ``uint16`` bit pattern (e.g. a memmap): indexing returns
    float32 rows (exact: every bfloat16 is a float32), slicing with ``.rows(a, b)`` returns another view."""

    dtype_name = "bfloat16"

    def __init__(self, bits: np.ndarray) -> None:
        if bits.dtype != np.uint16 or bits.ndim != 2:
            raise ValueError(f"Bfloat16Rows needs a 2-D uint16 array, got {bits.dtype} {bits.shape}")
        self.bits = bits

    @property
    def shape(self) -> tuple[int, int]:
        return self.bits.shape

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def __len__(self) -> int:
        return self.bits.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return bfloat16_to_float32(self.bits[index])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = bfloat16_to_float32(self.bits)
        return out if dtype is None else out.astype(dtype)

    def rows(self, start: int, stop: int) -> Bfloat16Rows:
        return Bfloat16Rows(self.bits[start:stop])


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """The float32 values of raw bfloat16 bits (exact); one 4-byte buffer per value, shifted in place."""
    out = np.asarray(bits, dtype=np.uint16).astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits of float32 values, rounded to nearest even (what ``torch.bfloat16`` does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def to_storage(emb: np.ndarray, dtype: str) -> np.ndarray:
    """float32 embeddings in the storage dtype; values a half type cannot hold (fp16 beyond 65504) are an error."""
    emb = np.asarray(emb, dtype=np.float32)
    if dtype == "float32":
        return emb
    with np.errstate(over="ignore"):  # reported below with the dtype named
        out = emb.astype(np.float16) if dtype == "float16" else float32_to_bfloat16(emb)
    back = out if dtype == "float16" else bfloat16_to_float32(out)
    if not np.isfinite(back).all() and np.isfinite(emb).all():
        raise ValueError(f"embeddings overflow cache_dtype {dtype} (max |x| {float(np.abs(emb).max()):.3g}); "
                         "use cache_dtype float32 or bfloat16")
    return out


def from_storage(arr: np.ndarray, dtype: str):
    """What readers get for a stored array: the array itself (float32 / float16), or :class:`Bfloat16Rows`."""
    return Bfloat16Rows(arr) if dtype == "bfloat16" else arr


def _check_dtype(dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")


class EmbeddingCache:
    """Embeddings of text lists, keyed by (settings key, texts); see the module docstring for the layout."""

    def __init__(self, root: str | Path, wait_timeout_s: float = 3600.0, poll_s: float = 0.5) -> None:
        self.root = Path(root)
        self.wait_timeout_s = wait_timeout_s
        """Give up waiting for other ranks after this long without any new shard appearing."""
        self.poll_s = poll_s
        self._verified: dict[Path, tuple] = {}
        """File -> ``_stat_pair`` when it last verified in this process (see :meth:`_load_checked`)."""

    def folder(self, key: str, texts: Sequence[str], dtype: str = "float32") -> Path:
        """Folder of one (settings, texts, storage dtype) combination."""
        ident = {"key": key, "texts": sha256_texts(texts), "shard_size": _FOLDER_SHARD_SIZE}
        if dtype != "float32":  # float32 folders keep the names they had before storage dtypes existed
            ident["storage_dtype"] = dtype
        return self.root / sha256_json(ident)[:32]

    def get_or_encode(
        self,
        key: str,
        texts: Sequence[str],
        encode_fn: EncodeFn,
        shard_size: int = DEFAULT_SHARD_SIZE,
        rank: int = 0,
        world_size: int = 1,
        dtype: str = "float32",
        text_cost: TextCost | None = None,
    ) -> np.ndarray:
        """``[N, H]`` embeddings of ``texts`` (a read-only memmap, or :class:`Bfloat16Rows` for ``dtype:
        bfloat16``) stored in ``dtype``, encoding only the missing shards (``text_cost``: see
        :func:`shard_owners`; only called with ``world_size > 1``).

        ``encode_fn(list_of_texts) -> [n, H]`` is called once per missing (or corrupted) shard owned by this rank.
        An empty ``texts`` gives a ``(0, 0)`` array without calling ``encode_fn``. ``shard_size`` applies to a new
        folder; an interrupted one resumes with the shard size recorded in its manifest.
        """
        if shard_size <= 0:
            raise ValueError(f"shard_size must be > 0, got {shard_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        _check_dtype(dtype)
        if len(texts) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return self._get_or_compute(key, texts, lambda a, b: encode_fn(list(texts[a:b])), shard_size, rank,
                                    world_size, dtype, text_cost)

    def get(self, key: str, texts: Sequence[str], dtype: str = "float32") -> np.ndarray | None:
        """The finished, verified ``[N, H]`` embeddings of ``(key, texts)``, or None (nothing is encoded)."""
        _check_dtype(dtype)
        if len(texts) == 0:
            return None
        arr = self._load_checked(self.folder(key, texts, dtype) / _FINAL, len(texts), warn=True, dtype=dtype)
        return None if arr is None else from_storage(arr, dtype)

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
                        world_size: int, dtype: str = "float32", text_cost: TextCost | None = None):
        """:meth:`get_or_encode` with ``rows_fn(start, stop)`` giving the rows of ``texts[start:stop]``."""
        return from_storage(self._stored(key, texts, rows_fn, shard_size, rank, world_size, dtype, text_cost), dtype)

    def _stored(self, key: str, texts: Sequence[str], rows_fn: RowsFn, shard_size: int, rank: int,
                world_size: int, dtype: str, text_cost: TextCost | None = None) -> np.ndarray:
        """The assembled file's array in its storage dtype (see :meth:`_get_or_compute`)."""
        folder = self.folder(key, texts, dtype)
        final = folder / _FINAL
        loaded = self._load_checked(final, len(texts), warn=True, dtype=dtype)
        if loaded is not None:
            return loaded
        if rank == 0 and final.exists():
            self._discard_final(final, len(texts), dtype)
        if world_size == 1:
            _remove_stale_temp_files(folder)
        shard_size = self._write_manifest(folder, key, texts, shard_size)
        n_shards = -(-len(texts) // shard_size)
        seen = _stat_pair(final)
        owners = shard_owners(texts, shard_size, world_size, text_cost)
        mine = [i for i in range(n_shards) if owners[i] == rank]
        started, done = time.monotonic(), 0
        for i in mine:
            if _stat_pair(final) != seen and final.exists():
                break  # another process assembled the file meanwhile: verify that instead of re-encoding
            self._ensure_shard(folder, i, texts, shard_size, rows_fn, dtype)
            done += min(shard_size, len(texts) - i * shard_size)
        if world_size > 1 and done:
            elapsed = max(time.monotonic() - started, 1e-9)
            log.info("rank %d/%d: %d of %d shards (%d texts) in %.1fs: %.1f docs/s", rank, world_size, len(mine),
                     n_shards, done, elapsed, done / elapsed)
        if rank != 0:
            return self._wait_for_final(final, len(texts), rank, dtype)
        with exclusive_lock(final, wait=True, what="embedding cache file"):
            loaded = _load_verified(final, len(texts), warn=False, dtype=dtype)  # assembled by another process?
            if loaded is not None:
                return loaded
            self._wait_for(folder, [_shard_name(i) for i in range(n_shards)], rank)
            for i in range(n_shards):  # re-encode any shard that does not verify (e.g. corrupted on disk)
                self._ensure_shard(folder, i, texts, shard_size, rows_fn, dtype)
            self._assemble(folder, n_shards, len(texts), dtype)
        return np.load(final, mmap_mode="r")

    def _load_checked(self, path: Path, n_rows: int, warn: bool, dtype: str = "float32") -> np.ndarray | None:
        """:func:`_load_verified`, skipping the hash when this process already verified the file and neither it nor
        its sidecar changed since (a file changed within the last clock tick is always hashed again)."""
        state = _stat_pair(path)
        if state[0] is not None and self._verified.get(path) == state:
            arr = _load_array(path, n_rows, dtype)
            if arr is not None:
                return arr
        started = time.time_ns()
        arr = _load_verified(path, n_rows, warn, dtype)
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

    def _discard_final(self, final: Path, n_texts: int, dtype: str = "float32") -> None:
        """Remove an assembled file that failed verification (under its lock: a live writer may be replacing it)."""
        with exclusive_lock(final, wait=True, what="embedding cache file"):
            if final.exists() and _load_verified(final, n_texts, warn=False, dtype=dtype) is None:
                remove_with_sidecar(final)

    def _ensure_shard(self, folder: Path, i: int, texts: Sequence[str], shard_size: int, rows_fn: RowsFn,
                      dtype: str = "float32") -> None:
        """Compute and write shard ``i`` unless a verified copy exists (checked again under the shard's lock)."""
        path = folder / _shard_name(i)
        start, stop = i * shard_size, min((i + 1) * shard_size, len(texts))
        if self._load_checked(path, stop - start, warn=True, dtype=dtype) is not None:
            return
        with exclusive_lock(path, wait=True, what="embedding cache shard"):
            if _shard_ok(path, stop - start, warn=False, dtype=dtype):
                return  # written by another process while we waited
            emb = np.asarray(rows_fn(start, stop), dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != stop - start:
                raise ValueError(f"encode_fn returned shape {emb.shape} for {stop - start} texts (shard {i})")
            with checksummed_file(path) as fh:
                np.save(fh, to_storage(emb, dtype), allow_pickle=False)

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

    def _wait_for_final(self, final: Path, n_texts: int, rank: int, dtype: str = "float32") -> np.ndarray:
        """Wait until rank 0 has assembled a file that verifies (re-checked whenever its checksum changes)."""
        checked: tuple | None = None
        while True:
            self._wait_for(final.parent, [final.name], rank)
            state = _stat_pair(final)
            if state != checked:
                checked = state
                loaded = _load_verified(final, n_texts, warn=False, dtype=dtype)
                if loaded is not None:
                    return loaded
            time.sleep(self.poll_s)

    def _assemble(self, folder: Path, n_shards: int, n_texts: int, dtype: str = "float32") -> None:
        """Copy the shards into one ``.npy`` (shard by shard, bounded memory) with its checksum, then drop them."""
        shards = [np.load(folder / _shard_name(i), mmap_mode="r") for i in range(n_shards)]
        dims = {s.shape[1] for s in shards}
        if len(dims) != 1 or sum(s.shape[0] for s in shards) != n_texts:
            raise RuntimeError(f"{folder}: inconsistent shards (dims {sorted(dims)}); delete the folder and re-run")
        tmp = folder / f".{_FINAL}.{os.getpid()}.tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORAGE_DTYPES[dtype], shape=(n_texts, dims.pop()))
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


TextCost = Callable[[Sequence[str]], Sequence[int]]
"""Work of each text (e.g. its token count after truncation, what its encoder forward costs)."""


def char_costs(texts: Sequence[str]) -> list[int]:
    """Characters + 1 per text: the tokenizer-free proxy of tokens."""
    return [len(t) + 1 for t in texts]


def shard_owners(texts: Sequence[str], shard_size: int, world_size: int,
                 text_cost: TextCost | None = None) -> list[int]:
    """Rank that encodes each shard, balancing the ranks by token count rather than text count: shards are taken
    in order and each goes to the rank with the least work so far (ties: lowest rank), the work of a shard being
    the sum of ``text_cost`` over its texts (a dense teacher passes its tokenizer's truncated token counts; default
    :func:`char_costs`). The busiest rank ends at most one shard's work above the idlest (list scheduling); equal
    shards give round robin. A pure function of the texts (the same on every rank) that never changes the
    embeddings, only who computes them."""
    n_shards = -(-len(texts) // shard_size)
    if world_size == 1:
        return [0] * n_shards
    costs = list((text_cost or char_costs)(texts))
    if len(costs) != len(texts):
        raise ValueError(f"text_cost gave {len(costs)} costs for {len(texts)} texts")
    load = [0] * world_size
    owners = []
    for i in range(n_shards):
        r = min(range(world_size), key=lambda j: (load[j], j))
        owners.append(r)
        load[r] += int(sum(costs[i * shard_size : (i + 1) * shard_size]))
    return owners


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


def _load_array(path: Path, n_rows: int, dtype: str = "float32") -> np.ndarray | None:
    """The ``[n_rows, H]`` array (of the storage ``dtype``) at ``path`` as a read-only memmap, or None (unreadable,
    other shape or dtype)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == n_rows and arr.dtype == STORAGE_DTYPES[dtype] else None


def _load_verified(path: Path, n_rows: int, warn: bool, dtype: str = "float32") -> np.ndarray | None:
    """The ``[n_rows, H]`` array (storage ``dtype``) at ``path`` as a read-only memmap when it matches its
    checksum, else None (with a warning naming the file when it exists but is corrupted or unverifiable)."""
    if not path.exists():
        return None
    problem = verify_sidecar(path)
    arr = None
    if problem is None:
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            problem = f"unreadable ({err})"
    expected = np.dtype(STORAGE_DTYPES[dtype])
    if arr is not None and (arr.ndim != 2 or arr.shape[0] != n_rows or arr.dtype != expected):
        problem, arr = f"shape {arr.shape} {arr.dtype}, expected ({n_rows}, H) {expected}", None
    if problem is not None:
        if warn:
            log.warning("%s: %s; recomputing it", path, problem)
        return None
    return arr


def _shard_ok(path: Path, n_rows: int, warn: bool, dtype: str = "float32") -> bool:
    return _load_verified(path, n_rows, warn, dtype) is not None


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
