"""BM25 teacher (bm25s): a lexical ranking of the corpus, usable alone or in a teacher ensemble.

Documents with no query term in common (score 0) are not candidates: they would be arbitrary, not hard, negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version

import numpy as np

from nvr.config.mining import TeacherConfig
from nvr.data.beir import Corpus
from nvr.search.exact import topk_of_scores
from nvr.utils.hashing import sha256_json


class BM25Teacher:
    """BM25 over ``title + text`` passages; ``index(corpus)`` once, then ``search`` / ``score_pairs``."""

    kind = "bm25"

    def __init__(
        self, cfg: TeacherConfig, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords: str = "en"
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.params = {"k1": k1, "b": b, "method": method, "stopwords": stopwords, "bm25s": version("bm25s")}
        self._retriever = None
        self._corpus_fingerprint: str | None = None
        self._num_docs = 0

    @property
    def settings_fingerprint(self) -> str:
        """Fingerprint of the scoring parameters alone (the table cache adds the corpus fingerprint)."""
        return sha256_json({"teacher": "bm25", **self.params})

    @property
    def fingerprint(self) -> str:
        """Fingerprint of parameters + indexed corpus."""
        if self._corpus_fingerprint is None:
            raise RuntimeError(f"BM25 teacher {self.name!r}: call index(corpus) first")
        return sha256_json({"settings": self.settings_fingerprint, "corpus": self._corpus_fingerprint})

    def index(self, corpus: Corpus) -> None:
        """Tokenize and index every passage; a no-op when this corpus is already indexed."""
        import bm25s

        if self._corpus_fingerprint == corpus.fingerprint:
            return
        tokens = bm25s.tokenize(corpus.passages(), stopwords=self.params["stopwords"], show_progress=False)
        p = self.params
        retriever = bm25s.BM25(k1=p["k1"], b=p["b"], method=p["method"])
        retriever.index(tokens, show_progress=False)
        self._retriever, self._corpus_fingerprint, self._num_docs = retriever, corpus.fingerprint, len(corpus)

    def scores(self, query_texts: Sequence[str]) -> np.ndarray:
        """Dense ``[Q, D]`` float32 BM25 scores (callers pass one block of queries at a time)."""
        import bm25s

        if self._retriever is None:
            raise RuntimeError(f"BM25 teacher {self.name!r}: call index(corpus) first")
        tokens = bm25s.tokenize(
            list(query_texts), stopwords=self.params["stopwords"], show_progress=False, return_ids=False
        )
        out = np.zeros((len(query_texts), self._num_docs), dtype=np.float32)
        for row, toks in enumerate(tokens):
            ids = self._retriever.get_tokens_ids(toks)
            if ids:
                out[row] = self._retriever.get_scores_from_ids(ids)
        return out

    def search(
        self, query_texts: Sequence[str], k: int, doc_order: np.ndarray | None = None, memory_mb: float = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores[Q, k], idx[Q, k])``; ties by ``doc_order``; ``nan``/``-1`` pads."""
        return self._rank(query_texts, k, None, doc_order, memory_mb)[:2]

    def score_pairs(self, query_texts: Sequence[str], d_idx: np.ndarray, memory_mb: float = 1024) -> np.ndarray:
        """Scores of explicit documents per query: ``d_idx[Q, P]`` (``-1`` -> ``nan``)."""
        return self._rank(query_texts, 1, d_idx, None, memory_mb)[2]

    def rank_corpus(
        self,
        query_texts: Sequence[str],
        corpus: Corpus,
        k: int,
        pair_idx: np.ndarray,
        doc_order: np.ndarray | None = None,
        memory_mb: float = 1024,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Teacher protocol used by ``build_candidate_table``: index ``corpus``, then search + pair scores."""
        self.index(corpus)
        return self._rank(query_texts, k, pair_idx, doc_order, memory_mb)

    def _rank(
        self,
        query_texts: Sequence[str],
        k: int,
        pair_idx: np.ndarray | None,
        doc_order: np.ndarray | None,
        memory_mb: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k search and explicit pair scores in one scoring pass, in query blocks within ``memory_mb``."""
        n = len(query_texts)
        pairs = np.full((n, 0), -1, dtype=np.int64) if pair_idx is None else np.asarray(pair_idx, dtype=np.int64)
        block = max(1, int(memory_mb * 2**20) // (4 * max(1, self._num_docs)))
        top_s = np.full((n, k), np.nan, dtype=np.float32)
        top_i = np.full((n, k), -1, dtype=np.int64)
        pair_s = np.full(pairs.shape, np.nan, dtype=np.float32)
        for q0 in range(0, n, block):
            rows = slice(q0, q0 + block)
            full = self.scores(query_texts[rows])
            top_s[rows], top_i[rows] = topk_of_scores(full, k, doc_order, floor=0.0)
            p = pairs[rows]
            pair_s[rows] = np.where(p >= 0, np.take_along_axis(full, np.maximum(p, 0), axis=1), np.nan)
        return top_s, top_i, pair_s
