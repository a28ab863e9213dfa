"""Cross-encoder rescoring of a candidate table (candidates and positives alike), batched across queries.

All (query, doc) pairs of the table are scored in length-sorted batches that mix queries, so short queries do not
each pay for a half-empty batch; a pair that is both a candidate and a positive is scored once, so the positive's
score and its candidate score are identical. Rows are then re-sorted by the new scores (ties: doc id order).

With a ``cache_dir`` the rescored table is cached (checksummed, like candidate tables) under
``cache_dir/ce_scores/<key>``, where the key covers the cross-encoder (content of its model folder: weights,
config, tokenizer), ``max_length``, ``dtype``, the activation, and the pairs scored (query texts, the corpus
content, the candidate and positive rows of the input table and its flags).

:meth:`CrossEncoderRescorer.cached_scores` scores a list of aligned (query, passage) pairs through the embedding
cache instead (``cache_dir/pair_scores``, keyed by the same fingerprint and the exact pair texts): the relabel judge
(``nvr.mining.relabel``) uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from nvr.config.mining import CrossEncoderConfig
from nvr.data.beir import Corpus
from nvr.search.exact import doc_id_order
from nvr.search.table import CandidateTable
from nvr.teachers.dense import pick_device
from nvr.utils.fingerprint import memo_dir_for, model_fingerprint
from nvr.utils.hashing import sha256_json, sha256_texts
from nvr.utils.models import resolve_model_path
from nvr.utils.precision import Precision, autocast, resolve_precision

log = logging.getLogger(__name__)

Activation = Literal["sigmoid", "identity"]
_PAIRS_PER_CHUNK = 65536  # bounds the Python pair lists; batches inside a chunk mix many queries
SCORES_VERSION = 1
"""Bumped when the scoring procedure changes (part of the score cache key)."""


class CrossEncoderRescorer:
    """``AutoModelForSequenceClassification`` scorer: one logit per pair, sigmoid by default (scores in (0, 1)
    like sentence-transformers' ``CrossEncoder.predict``, so percentage margins stay meaningful)."""

    def __init__(
        self, cfg: CrossEncoderConfig, activation: Activation = "sigmoid", cache_dir: str | Path | None = None,
        key: str = "cross_encoder",
    ) -> None:
        """``key``: the config key the settings came from (``cross_encoder`` or ``relabel``), named by the error a
        missing or damaged model folder raises here, before anything is loaded."""
        from nvr.utils.models import check_model_source

        check_model_source(cfg.model_name_or_path, f"{key}.model_name_or_path")
        self.cfg = cfg
        self.activation = activation
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._device: str | None = None
        self._model = None
        self._tokenizer = None
        self._fingerprint: str | None = None
        self._precision: Precision | None = None

    @property
    def device(self) -> str:
        """Resolved on first use ('auto' imports torch, which a run served from the cache never needs)."""
        if self._device is None:
            self._device = pick_device(self.cfg.device)
        return self._device

    @property
    def precision(self) -> Precision:
        """The resolved ``cfg.dtype``: ``auto`` = fp32 weights under bf16 autocast where bf16 is native, else fp32
        (its label, part of the score key, equals an explicit ``float32``'s when it resolves to fp32)."""
        if self._precision is None:
            device = "cpu" if self.cfg.dtype != "auto" else self.cfg.device
            device = self.device if device == "auto" else device
            self._precision = resolve_precision(self.cfg.dtype, device)
        return self._precision

    @property
    def fingerprint(self) -> str:
        """Cross-encoder identity (content of its model folder: weights, config, tokenizer; memoized by file
        identity under ``cache_dir/fingerprints``) + every setting that changes a score. No model load when local."""
        if self._fingerprint is None:
            model = model_fingerprint(self.cfg.model_name_or_path, memo_dir_for(self.cache_dir))
            if model is None:  # not on this machine yet: loading downloads it
                self._load()
                model = model_fingerprint(self.cfg.model_name_or_path, memo_dir_for(self.cache_dir))
                model = model or f"loaded:{self._loaded_fingerprint()}"
            self._fingerprint = sha256_json({
                "version": SCORES_VERSION, "model": model, "max_length": self.cfg.max_length,
                "dtype": self.precision.label, "activation": self.activation,
            })
        return self._fingerprint

    def _loaded_fingerprint(self) -> str:
        """Weights + tokenizer of the loaded model (only for a model that has no local folder)."""
        import hashlib

        from nvr.modeling.embedder import tensor_bytes, tokenizer_fingerprint

        digest = hashlib.sha256(tokenizer_fingerprint(self._tokenizer).encode("utf-8"))
        for name, tensor in sorted(self._model.state_dict().items()):
            digest.update(name.encode("utf-8"))
            digest.update(tensor_bytes(tensor))
        return digest.hexdigest()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(self.cfg.model_name_or_path)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, self.precision.weights))
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
            model.config.pad_token_id = self._tokenizer.pad_token_id
        self._model = model.to(self.device).eval()
        log.info("cross-encoder %s loaded on %s (%s)", path, self.device, self.precision.label)

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Scores of aligned (query, passage) pairs, float32, in input order.

        Pairs are sorted by token count (longest first) and cut into batches of at most ``cfg.batch_size`` pairs
        and ``cfg.max_tokens_per_batch`` padded tokens, so a long tail neither runs out of memory nor pads short
        pairs to the longest one; the logits are taken in fp32 whatever the precision.
        """
        import torch

        from nvr.modeling.encode import budget_batches

        if self._model is None:
            self._load()
        out = np.empty(len(queries), dtype=np.float32)
        lengths = self._pair_lengths(queries, passages)
        with torch.inference_mode(), autocast(self.precision, self.device):
            for idx in budget_batches(lengths, self.cfg.batch_size, self.cfg.max_tokens_per_batch):
                batch = self._tokenizer(
                    [queries[i] for i in idx], [passages[i] for i in idx], padding=True, truncation=True,
                    max_length=self.cfg.max_length, return_tensors="pt",
                ).to(self.device)
                logits = self._model(**batch).logits.float()
                out[idx] = self._activate(logits).cpu().numpy()
        return out

    def cached_scores(self, queries: Sequence[str], passages: Sequence[str], shard_size: int = 10000) -> np.ndarray:
        """:meth:`score` through the embedding cache (``cache_dir/pair_scores``): keyed by :attr:`fingerprint` (model
        content + max length + dtype + activation) and the exact pair texts, stored as ``[N, 1]`` shards with
        checksums, so a warm run loads no model, an interrupted one resumes, and torchrun ranks split the shards.
        Without ``cache_dir`` the pairs are scored directly."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        if not queries:
            return np.zeros(0, dtype=np.float32)
        if self.cache_dir is None:
            return self.score(queries, passages)
        import json

        from nvr.teachers.cache import EmbeddingCache
        from nvr.utils.distributed import dist_rank_world

        pairs = [json.dumps([q, p], ensure_ascii=False) for q, p in zip(queries, passages)]

        def score_chunk(chunk: list[str]) -> np.ndarray:
            qs, ps = zip(*(json.loads(c) for c in chunk))
            return self.score(qs, ps)[:, None]

        rank, world = dist_rank_world()
        cache = EmbeddingCache(self.cache_dir / "pair_scores")
        out = cache.get_or_encode(self.fingerprint, pairs, score_chunk, shard_size, rank=rank, world_size=world)
        return np.asarray(out[:, 0], dtype=np.float32)

    def _pair_lengths(self, queries: Sequence[str], passages: Sequence[str]) -> list[int]:
        """Token count of every pair after truncation (what its row of a batch costs)."""
        lengths: list[int] = []
        for a in range(0, len(queries), 4096):
            enc = self._tokenizer(list(queries[a : a + 4096]), list(passages[a : a + 4096]), truncation=True,
                                  max_length=self.cfg.max_length, padding=False, return_attention_mask=False)
            lengths.extend(len(ids) for ids in enc["input_ids"])
        return lengths

    def _activate(self, logits):
        import torch

        if logits.shape[-1] > 1:  # classification heads: probability of the last ("relevant") label
            return torch.softmax(logits, dim=-1)[:, -1]
        return torch.sigmoid(logits[:, 0]) if self.activation == "sigmoid" else logits[:, 0]

    def rescore(self, table: CandidateTable, query_texts: Sequence[str], corpus: Corpus) -> CandidateTable:
        """A new table scored by the cross-encoder: teacher ``"<name>+ce"``, rows re-sorted best first (read from
        the score cache when ``cache_dir`` holds a verified copy for exactly these inputs)."""
        if len(query_texts) != table.num_queries:
            raise ValueError(f"{len(query_texts)} query texts for a table of {table.num_queries} queries")
        if len(corpus) != len(table.doc_ids):
            raise ValueError(f"corpus has {len(corpus)} docs but the table indexes {len(table.doc_ids)}")
        if self.cache_dir is None:
            return self._rescore(table, query_texts, corpus)
        from nvr.search.table import cached_or_built

        path = self.cache_dir / "ce_scores" / self.scores_key(table, query_texts, corpus)
        what = f"cross-encoder scores of {table.teacher}"
        return cached_or_built(path, lambda: self._rescore(table, query_texts, corpus), what)

    def scores_key(self, table: CandidateTable, query_texts: Sequence[str], corpus: Corpus) -> str:
        """Cache key of a rescored table: the cross-encoder fingerprint + every input of :meth:`rescore`."""
        arrays = {name: _array_digest(getattr(table, name)) for name in ("cand_idx", "cand_is_positive", "pos_idx")}
        return sha256_json({
            "cross_encoder": self.fingerprint, "teacher": table.teacher, "query_ids": sha256_texts(table.query_ids),
            "queries": sha256_texts(query_texts), "corpus": corpus.fingerprint, **arrays,
        })[:40]

    def _rescore(self, table: CandidateTable, query_texts: Sequence[str], corpus: Corpus) -> CandidateTable:
        cand_idx = np.asarray(table.cand_idx)
        pos_idx = np.asarray(table.pos_idx)
        pair_rows, pair_docs, inverse = _unique_pairs(cand_idx, pos_idx)
        pair_scores = np.empty(len(pair_rows), dtype=np.float32)
        for a in range(0, len(pair_rows), _PAIRS_PER_CHUNK):
            rows, docs = pair_rows[a : a + _PAIRS_PER_CHUNK], pair_docs[a : a + _PAIRS_PER_CHUNK]
            pair_scores[a : a + len(rows)] = self.score([query_texts[r] for r in rows], corpus.passages(docs))
        n_cand = cand_idx.size
        cand_scores = _scatter(pair_scores, inverse[:n_cand], cand_idx)
        pos_scores = _scatter(pair_scores, inverse[n_cand:], pos_idx)
        order = doc_id_order(table.doc_ids)
        perm = resort_rows(cand_scores, cand_idx, order)
        return CandidateTable(
            teacher=f"{table.teacher}+ce", query_ids=list(table.query_ids), doc_ids=table.doc_ids,
            cand_idx=np.take_along_axis(cand_idx, perm, axis=1),
            cand_scores=np.take_along_axis(cand_scores, perm, axis=1),
            cand_is_positive=np.take_along_axis(np.asarray(table.cand_is_positive), perm, axis=1),
            pos_idx=pos_idx.copy(), pos_scores=pos_scores,
        )


def resort_rows(scores: np.ndarray, idx: np.ndarray, doc_order: np.ndarray) -> np.ndarray:
    """Column permutation per row: score desc, then doc order asc, padding (``-1``) last."""
    pad = idx < 0
    safe_scores = np.where(pad, 0.0, scores)
    return np.lexsort((np.where(pad, 0, doc_order[np.maximum(idx, 0)]), -safe_scores, pad), axis=1)


def _unique_pairs(cand_idx: np.ndarray, pos_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct valid (row, doc) pairs of candidates + positives, and for every flat cell its pair (or -1)."""
    rows = np.concatenate([np.repeat(np.arange(len(cand_idx)), cand_idx.shape[1]),
                           np.repeat(np.arange(len(pos_idx)), pos_idx.shape[1])])
    docs = np.concatenate([cand_idx.ravel(), pos_idx.ravel()])
    valid = docs >= 0
    n_docs = int(docs.max()) + 1 if docs.size else 1
    codes = rows[valid] * n_docs + docs[valid]
    uniq, inv = np.unique(codes, return_inverse=True)
    inverse = np.full(docs.shape, -1, dtype=np.int64)
    inverse[valid] = inv
    return uniq // n_docs, uniq % n_docs, inverse


def _array_digest(arr: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    import hashlib

    a = np.ascontiguousarray(arr)
    digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    digest.update(a.reshape(-1).view(np.uint8) if a.size else b"")
    return digest.hexdigest()


def _scatter(pair_scores: np.ndarray, inverse: np.ndarray, like: np.ndarray) -> np.ndarray:
    flat = np.where(inverse >= 0, pair_scores[np.maximum(inverse, 0)], np.nan).astype(np.float32)
    return flat.reshape(like.shape)
