"""Dense teacher: an Embedder used as trained (causal unless ``bidirectional``) with cached, sharded embeddings."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nvr.config.mining import TeacherConfig
from nvr.data.beir import Corpus
from nvr.search.exact import score_pairs
from nvr.search.sharded import sharded_topk
from nvr.teachers.cache import EmbeddingCache, embedding_key
from nvr.utils.distributed import dist_rank_world
from nvr.utils.errors import config_key_scope
from nvr.utils.fingerprint import model_fingerprint
from nvr.utils.hashing import sha256_json
from nvr.utils.models import check_model_source, resolve_model_path
from nvr.utils.precision import Precision, resolve_precision

log = logging.getLogger(__name__)
_FINGERPRINT_SETTINGS = ("pooling", "normalize", "dtype", "add_eos", "bidirectional", "trust_remote_code")
"""TeacherConfig fields that change every embedding of a teacher (prefixes and max lengths are per embedding key)."""
FINGERPRINT_VERSION = 2
"""2: the model identity is the content of its folder's files (tokenizer included), not the loaded weights."""


def teacher_model_fingerprint(
    cfg: TeacherConfig, memo_dir: str | Path | None, load: Callable[[], object], dtype_label: str | None = None
) -> str:
    """The model part of a dense teacher's keys, without loading the model when it is on this machine.

    ``load()`` returns the loaded Embedder; it is called only for a model that is not local yet (a hub id not in the
    HF cache): loading downloads it, then the folder is fingerprinted as usual (or, failing that, the loaded
    weights and tokenizer via ``Embedder.fingerprint``). ``dtype_label`` is the resolved precision
    (``nvr.utils.precision.Precision.label``); None = ``cfg.dtype`` as written (an explicit dtype is its own label).
    """
    model = model_fingerprint(cfg.model_name_or_path, memo_dir)
    if model is None:
        embedder = load()
        model = model_fingerprint(cfg.model_name_or_path, memo_dir) or f"loaded:{embedder.fingerprint()}"
    settings = {k: getattr(cfg, k) for k in _FINGERPRINT_SETTINGS}
    settings["dtype"] = cfg.dtype if dtype_label is None else dtype_label
    return sha256_json({"version": FINGERPRINT_VERSION, "model": model, **settings})


def dense_embedding_key(model_key: str, cfg: TeacherConfig, prefix: str, max_length: int, dtype_label: str) -> str:
    """THE key of one dense encoding (teachers, ``nvr eval`` and the validation callback all use it, so the same
    model at the same settings encodes a corpus once): model part + pooling + prefix + max length + precision, and
    the cache storage dtype when it is not float32 (float32 keys stay what they were)."""
    storage = getattr(cfg, "cache_dtype", "float32")
    extra = {} if storage == "float32" else {"cache_dtype": storage}
    return embedding_key(model_key, cfg.pooling, prefix, max_length, dtype_label, **extra)


def load_dense_embedder(cfg: TeacherConfig, precision: Precision, key: str = "teacher"):
    """The Embedder a dense teacher encodes with: an nvr folder (``nvr_embedder.json``) with its own pooling head,
    ``add_eos`` and attention direction, anything else as an HF model with ``cfg``'s settings; weights in
    ``precision.weights`` (fp32 under ``dtype: auto``: autocast happens at encode time)."""
    from nvr.modeling.config import EmbedderConfig
    from nvr.modeling.embedder import META_FILE, Embedder

    path = resolve_model_path(cfg.model_name_or_path)
    with config_key_scope("embedder", key):  # name the key the user wrote
        if (Path(path) / META_FILE).exists():
            return Embedder.from_pretrained(path, dtype=precision.weights, normalize=cfg.normalize)
        emb_cfg = EmbedderConfig(
            model_name_or_path=cfg.model_name_or_path, pooling=cfg.pooling, normalize=cfg.normalize,
            bidirectional=cfg.bidirectional, dtype=precision.weights,
            max_length=max(cfg.query_max_length, cfg.passage_max_length), add_eos=cfg.add_eos,
            trust_remote_code=cfg.trust_remote_code,
        )
        return Embedder.from_config(emb_cfg)


def pick_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible (the local rank's GPU under torchrun), else 'cpu'."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
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
        self._precision: Precision | None = None

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

    @property
    def precision(self) -> Precision:
        """The resolved ``cfg.dtype`` (``auto``: bf16 autocast where the device runs bf16 natively, else fp32)."""
        if self._precision is None:
            # an explicit dtype or device needs no device probe (no torch import on a run served from the cache);
            # only ``dtype: auto`` with ``device: auto`` must ask torch whether a GPU is there
            device = "cpu" if self.cfg.dtype != "auto" else self.cfg.device
            device = self.device if device == "auto" else device
            self._precision = resolve_precision(self.cfg.dtype, device)
        return self._precision

    @property
    def dtype_label(self) -> str:
        """The resolved dtype as recorded in the keys and the manifest (e.g. ``autocast-bfloat16``, ``float32``)."""
        return self.precision.label

    def _load(self):
        embedder = load_dense_embedder(self.cfg, self.precision, f"teachers[{self.name}]")
        log.info("teacher %s: loaded %s on %s (%s)", self.name, self.cfg.model_name_or_path, self.device,
                 self.dtype_label)
        return embedder.to(self.device).eval()

    @property
    def fingerprint(self) -> str:
        """Model identity + the settings that change an embedding (pooling, normalize, dtype, EOS, attention
        direction, remote code): the model part of every embedding key of this teacher.

        The identity is the content of every file of the model folder (weights, config, tokenizer files, and the
        base model of an nvr adapter folder; ``nvr.utils.fingerprint.model_fingerprint``), with file hashes memoized
        under ``cache_dir/fingerprints`` by (path, size, mtime, inode, ctime): a re-run never loads or re-hashes the
        model, and weights replaced in place with the same size and mtime are noticed. A model that is neither a
        local folder nor in the HF cache is loaded (downloaded) first.
        """
        if self._fingerprint is None:
            self._fingerprint = teacher_model_fingerprint(self.cfg, self.fingerprint_dir, lambda: self.embedder,
                                                          self.dtype_label)
        return self._fingerprint

    @property
    def settings_fingerprint(self) -> str:
        """Key of everything that changes this teacher's rankings: the model + settings and both embedding keys
        (query / passage prefix and max length). The candidate-table cache and the manifest use it."""
        ident = {"teacher": "dense", "queries": self._embedding_key(*self._query_settings()),
                 "passages": self._embedding_key(*self._passage_settings())}
        if self.cfg.search != "exact":  # exact keys stay what they were
            ident["search"] = {"method": self.cfg.search, "params": dict(sorted(self.cfg.search_params.items()))}
        return sha256_json(ident)

    def _query_settings(self) -> tuple[str, int]:
        return self.cfg.query_prefix, self.cfg.query_max_length

    def _passage_settings(self) -> tuple[str, int]:
        return self.cfg.passage_prefix, self.cfg.passage_max_length

    def _embedding_key(self, prefix: str, max_length: int) -> str:
        return dense_embedding_key(self.fingerprint, self.cfg, prefix, max_length, self.dtype_label)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, *self._query_settings(), "queries")

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, *self._passage_settings(), "passages")

    def _encode(self, texts: Sequence[str], prefix: str, max_length: int, what: str) -> np.ndarray:
        key = self._embedding_key(prefix, max_length)

        def encode(chunk: list[str]) -> np.ndarray:
            from nvr.modeling.encode import encode_texts  # imports torch: only when a shard is missing

            return encode_texts(
                self.embedder, chunk, prefix=prefix, max_length=max_length, batch_size=self.cfg.batch_size,
                desc=f"{self.name} {what}", precision=self.precision,
                max_tokens_per_batch=self.cfg.max_tokens_per_batch,
            )

        def token_costs(all_texts: Sequence[str]) -> list[int]:
            from nvr.modeling.encode import token_lengths

            return token_lengths(self.embedder, all_texts, prefix, max_length)

        rank, world_size = dist_rank_world()
        return self.cache.get_or_encode(key, list(texts), encode, self.shard_size, rank=rank, world_size=world_size,
                                        dtype=self.cfg.cache_dtype, text_cost=token_costs)

    def rank_corpus(
        self,
        query_texts: Sequence[str],
        corpus: Corpus,
        k: int,
        pair_idx: np.ndarray,
        doc_order: np.ndarray | None = None,
        memory_mb: float = 1024,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k ``(scores, idx)`` over the corpus and the scores of ``pair_idx[Q, P]`` (``-1`` -> nan).

        Under torchrun (``WORLD_SIZE`` > 1) the search is sharded over the ranks (``nvr.search.sharded``: each rank
        reads only its corpus rows); every run writes finished query chunks under ``cache_dir/search/<key>`` so a
        killed search resumes from them (with any world size), and removes them once the search is complete.
        """
        queries = self.encode_queries(query_texts)
        passages = corpus.passages()
        docs = self.encode_passages(passages)
        rows = np.broadcast_to(np.arange(len(query_texts))[:, None], pair_idx.shape)
        if self.cfg.search != "exact":
            from nvr.search.ann import ann_topk

            scores, idx = ann_topk(queries, docs, k, self.cfg.search, self.cfg.search_params, doc_order)
            return scores, idx, score_pairs(queries, docs, rows, pair_idx)
        world = 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "torch.distributed" in sys.modules:
            from nvr.utils.distributed import ensure_process_group

            world = ensure_process_group()
        work_dir = self._search_dir(query_texts, passages, k, doc_order)
        rank_world = None if world > 1 else (0, 1)
        scores, idx = sharded_topk(queries, docs, k, memory_mb=memory_mb, doc_order=doc_order, work_dir=work_dir,
                                   rank_world=rank_world)
        if rank_world is not None or dist_rank_world()[0] == 0:
            shutil.rmtree(work_dir, ignore_errors=True)  # the caller caches the table; the chunks were for resuming
        return scores, idx, score_pairs(queries, docs, rows, pair_idx)

    def _search_dir(self, query_texts: Sequence[str], passages: Sequence[str], k: int,
                    doc_order: np.ndarray | None) -> Path:
        """Resume folder of one search: both embedding folders (settings + texts + storage dtype), k, tie order."""
        q_folder = self.cache.folder(self._embedding_key(*self._query_settings()), query_texts, self.cfg.cache_dtype)
        d_folder = self.cache.folder(self._embedding_key(*self._passage_settings()), passages, self.cfg.cache_dtype)
        order = "identity" if doc_order is None else hashlib.sha256(
            np.ascontiguousarray(doc_order, dtype=np.int64).tobytes()).hexdigest()
        key = sha256_json({"queries": q_folder.name, "docs": d_folder.name, "k": k, "order": order})[:32]
        return self.cache.root.parent / "search" / key
