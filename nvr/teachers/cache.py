"""Resumable, fingerprinted embedding cache shared by all mining processes.

Layout: ``root/<key>/manifest.json``, ``shard-00000.npy`` ... while encoding, then one ``embeddings.npy`` once
complete (shards are removed after assembly). Every file is written atomically, so a killed run resumes from its
finished shards; the temp files a killed single-process run leaves behind are deleted when a run resumes. Under
torchrun each rank encodes shards ``i % world_size == rank``; rank 0 assembles and the other ranks wait for the
assembled file, so the result is the same array for any world size.

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

from nvr.utils.atomic import atomic_file, write_text_atomic
from nvr.utils.hashing import sha256_json, sha256_texts

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]
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

        ``encode_fn(list_of_texts) -> [n, H]`` is called once per missing shard owned by this rank. An empty
        ``texts`` gives a ``(0, 0)`` array without calling ``encode_fn``. ``shard_size`` applies to a new folder;
        an interrupted one resumes with the shard size recorded in its manifest.
        """
        if shard_size <= 0:
            raise ValueError(f"shard_size must be > 0, got {shard_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if len(texts) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        folder = self.folder(key, texts)
        final = folder / _FINAL
        if not final.exists():
            if world_size == 1:
                _remove_stale_temp_files(folder)
            shard_size = self._write_manifest(folder, key, texts, shard_size)
            n_shards = -(-len(texts) // shard_size)
            for i in range(rank, n_shards, world_size):
                self._ensure_shard(folder, i, texts[i * shard_size : (i + 1) * shard_size], encode_fn)
            if rank == 0:
                self._wait_for(folder, [_shard_name(i) for i in range(n_shards)], rank)
                self._assemble(folder, n_shards, len(texts))
            else:
                self._wait_for(folder, [_FINAL], rank)
        return np.load(final, mmap_mode="r")

    # ------------------------------------------------------------------------------------------------ internals

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

    def _ensure_shard(self, folder: Path, i: int, texts: Sequence[str], encode_fn: EncodeFn) -> None:
        path = folder / _shard_name(i)
        if _rows_in(path) == len(texts):
            return
        emb = np.asarray(encode_fn(list(texts)), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"encode_fn returned shape {emb.shape} for {len(texts)} texts (shard {i})")
        with atomic_file(path, "wb") as fh:
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

    def _assemble(self, folder: Path, n_shards: int, n_texts: int) -> None:
        """Copy the shards into one ``.npy`` (shard by shard, bounded memory), then drop the shards."""
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
        del out
        os.replace(tmp, folder / _FINAL)
        for i in range(n_shards):
            (folder / _shard_name(i)).unlink(missing_ok=True)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


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


def _rows_in(path: Path) -> int:
    """Rows of a finished shard, or -1 when it is missing or unreadable (then it is encoded again)."""
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (FileNotFoundError, ValueError, OSError):
        return -1
