"""Dense teacher: an Embedder used as trained (causal unless ``bidirectional``) with cached, sharded embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nvr.data.beir import Corpus
from nvr.mining.config import TeacherConfig
from nvr.mining.search import exact_topk, score_pairs
from nvr.teachers.cache import EmbeddingCache, dist_rank_world, embedding_key
from nvr.utils.atomic import write_text_atomic
from nvr.utils.hashing import sha256_json
from nvr.utils.models import check_model_source, resolve_model_path

log = logging.getLogger(__name__)
# TeacherConfig fields that change the embeddings (the memoized fingerprint is keyed by them).
_FINGERPRINT_SETTINGS = ("pooling", "normalize", "dtype", "add_eos", "bidirectional", "trust_remote_code")


def pick_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible (the local rank's GPU under torchrun), else 'cpu'."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    import os

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"


class DenseTeacher:
    """Encode queries / passages with ``cfg``'s model through an :class:`EmbeddingCache` under ``cache_dir``.

    The model loads lazily (first fingerprint or encode). A folder saved by ``Embedder.save_pretrained`` (an nvr
    checkpoint, e.g. for iterative self-mining) is loaded with its own pooling head, ``add_eos`` and attention
    direction; anything else is an HF model with ``cfg.pooling``, ``add_eos``, ``bidirectional`` and
    ``trust_remote_code``.
    """

    kind = "dense"

    def __init__(self, cfg: TeacherConfig, cache_dir: str | Path, shard_size: int | None = None) -> None:
        if not cfg.model_name_or_path:
            from nvr.utils.errors import ConfigError

            raise ConfigError(f"teachers[{cfg.name}].model_name_or_path", "required for a dense teacher")
        check_model_source(cfg.model_name_or_path, f"teachers[{cfg.name}].model_name_or_path")
        self.cfg = cfg
        self.name = cfg.name
        self.cache = EmbeddingCache(Path(cache_dir) / "embeddings")
        self.fingerprint_dir = Path(cache_dir) / "fingerprints"
        self.shard_size = cfg.shard_size if shard_size is None else shard_size
        """Texts per embedding cache shard (``cfg.shard_size`` unless given): the unit of resuming."""
        self._device: str | None = None
        self._embedder = None
        self._fingerprint: str | None = None

    @property
    def device(self) -> str:
        """Resolved on first use: 'auto' needs torch, which a run served from the cache never imports."""
        if self._device is None:
            self._device = pick_device(self.cfg.device)
        return self._device

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = self._load()
        return self._embedder

    def _load(self):
        from nvr.modeling.config import EmbedderConfig
        from nvr.modeling.embedder import META_FILE, Embedder

        path = resolve_model_path(self.cfg.model_name_or_path)
        if (Path(path) / META_FILE).exists():
            embedder = Embedder.from_pretrained(path, dtype=self.cfg.dtype, normalize=self.cfg.normalize)
        else:
            emb_cfg = EmbedderConfig(
                model_name_or_path=self.cfg.model_name_or_path, pooling=self.cfg.pooling,
                normalize=self.cfg.normalize, bidirectional=self.cfg.bidirectional, dtype=self.cfg.dtype,
                max_length=max(self.cfg.query_max_length, self.cfg.passage_max_length), add_eos=self.cfg.add_eos,
                trust_remote_code=self.cfg.trust_remote_code,
            )
            embedder = Embedder.from_config(emb_cfg)
        log.info("teacher %s: loaded %s on %s (%s)", self.name, path, self.device, self.cfg.dtype)
        return embedder.to(self.device).eval()

    @property
    def fingerprint(self) -> str:
        """Model weights + pooling/dtype/normalization/EOS/attention direction (``Embedder.fingerprint``).

        ``trust_remote_code`` (other model classes) is mixed in only when set, so existing caches stay valid. The
        weight hash is memoized under ``cache_dir/fingerprints`` keyed by the folder's file names, sizes and
        mtimes, so a re-run over cached embeddings and tables never loads (or hashes) a large model again.
        """
        if self._fingerprint is None:
            memo = self._memo_path()
            if memo is not None and memo.exists():
                self._fingerprint = memo.read_text(encoding="utf-8").strip()
            else:
                self._fingerprint = self._embedder_fingerprint()
                if memo is not None:
                    write_text_atomic(memo, self._fingerprint)
        return self._fingerprint

    def _memo_path(self) -> Path | None:
        folder = Path(resolve_model_path(self.cfg.model_name_or_path))
        if not folder.is_dir():
            return None
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        stats = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        settings = {k: getattr(self.cfg, k) for k in _FINGERPRINT_SETTINGS}
        return self.fingerprint_dir / sha256_json({"folder": str(folder.resolve()), "files": stats, **settings})

    def _embedder_fingerprint(self) -> str:
        weights = self.embedder.fingerprint()
        if not self.cfg.trust_remote_code:
            return weights
        return sha256_json({"embedder": weights, "trust_remote_code": True})

    settings_fingerprint = fingerprint

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self.cfg.query_prefix, self.cfg.query_max_length, "queries")

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self.cfg.passage_prefix, self.cfg.passage_max_length, "passages")

    def _encode(self, texts: Sequence[str], prefix: str, max_length: int, what: str) -> np.ndarray:
        key = embedding_key(self.fingerprint, self.cfg.pooling, prefix, max_length, self.cfg.dtype)

        def encode(chunk: list[str]) -> np.ndarray:
            from nvr.modeling.encode import encode_texts  # imports torch: only when a shard is missing

            return encode_texts(
                self.embedder, chunk, prefix=prefix, max_length=max_length, batch_size=self.cfg.batch_size,
                desc=f"{self.name} {what}",
            )

        rank, world_size = dist_rank_world()
        return self.cache.get_or_encode(key, list(texts), encode, self.shard_size, rank=rank, world_size=world_size)

    def rank_corpus(
        self,
        query_texts: Sequence[str],
        corpus: Corpus,
        k: int,
        pair_idx: np.ndarray,
        doc_order: np.ndarray | None = None,
        memory_mb: float = 1024,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k ``(scores, idx)`` over the corpus and the scores of ``pair_idx[Q, P]`` (``-1`` -> nan)."""
        queries = self.encode_queries(query_texts)
        docs = self.encode_passages(corpus.passages())
        scores, idx = exact_topk(queries, docs, k, memory_mb=memory_mb, doc_order=doc_order)
        rows = np.broadcast_to(np.arange(len(query_texts))[:, None], pair_idx.shape)
        return scores, idx, score_pairs(queries, docs, rows, pair_idx)
