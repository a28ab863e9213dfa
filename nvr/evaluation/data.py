"""BEIR evaluation sets and their validation dataloaders (one queries loader + one corpus loader per set).

Validation runs inside Lightning's loop so every rank makes the same number of forward calls (FSDP needs that);
Lightning's padded DistributedSampler may repeat samples, so every batch carries the sample positions ("index")
and the evaluator de-duplicates by them after gathering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nvr.data.beir import Qrels, load_beir
from nvr.modeling.tokenization import tokenize
from nvr.utils.errors import ConfigError, InputError

Kind = Literal["queries", "corpus"]
KINDS: tuple[Kind, Kind] = ("queries", "corpus")


@dataclass
class EvalSetConfig:
    """One BEIR folder to evaluate on (validation during training or ``nvr eval``)."""

    name: str
    """Label used in metric keys (``val/<name>/ndcg@10``); unique across eval sets."""
    path: str
    """BEIR folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    split: str = "test"
    """qrels split to evaluate; only queries judged in it are used."""
    query_instruction: str = ""
    """Task definition prepended to queries as ``"{instruction}: {query}"`` (NV-Retriever format); empty = none."""
    query_prefix: str | None = None
    """Raw text put before every query instead of the ``"{instruction}: "`` format (e.g. a model's own prompt)."""
    mask_instruction: bool = True
    """Exclude the instruction tokens from pooling (NV-Embed / NV-Retriever)."""
    passage_prefix: str = ""
    """Prefix for passages (e.g. ``"passage: "``); the paper uses none."""
    max_queries: int | None = None
    """Keep only the first N judged queries (file order); None = all."""
    max_docs: int | None = None
    """Cap the corpus: the kept queries' judged docs first, then other docs in file order; None = all."""
    query_max_length: int = 192
    passage_max_length: int = 512

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("eval_sets.name", "must be a non-empty label")
        for key in ("max_queries", "max_docs", "query_max_length", "passage_max_length"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"eval_sets[{self.name}].{key}", f"must be > 0, got {value}")

    @property
    def query_text_prefix(self) -> str:
        """The text put before every query (what ``tokenize`` masks out of pooling when ``mask_instruction``)."""
        if self.query_prefix is not None:
            return self.query_prefix
        return f"{self.query_instruction}: " if self.query_instruction else ""


@dataclass
class CachedCorpus:
    """Corpus embeddings of frozen base weights, read from the cache shared with mining (set by the evaluator's
    ``setup``); valid only for loaders that tokenize like the encoder that produced them."""

    key: str
    embeddings: np.ndarray
    tokenizer: str
    """``tokenizer_fingerprint`` of the tokenizer the embeddings were computed with."""
    add_eos: bool


@dataclass
class EvalSet:
    """A loaded BEIR split, reduced to what retrieval evaluation needs (positions in these lists are the indices)."""

    config: EvalSetConfig
    query_ids: list[str]
    query_texts: list[str]
    doc_ids: list[str]
    doc_texts: list[str]
    qrels: Qrels
    cached_corpus: CachedCorpus | None = None
    """When set (frozen base weights only), :func:`build_eval_dataloaders` leaves the corpus loader out."""

    @property
    def name(self) -> str:
        return self.config.name

    def size(self, kind: Kind) -> int:
        return len(self.query_ids) if kind == "queries" else len(self.doc_ids)


def load_eval_set(config: EvalSetConfig) -> EvalSet:
    """Load a BEIR split; keep only judged queries (capped by ``max_queries``) and an optionally capped corpus."""
    dataset = load_beir(config.path, config.split)
    judged = [qid for qid in dataset.queries.ids if dataset.qrels.get(qid)]
    if not judged:
        raise InputError(f"no query of split '{config.split}' has judgements", Path(config.path) / "qrels")
    if config.max_queries is not None:
        judged = judged[: config.max_queries]
    qrels = {qid: dict(dataset.qrels[qid]) for qid in judged}
    doc_positions = _select_docs(dataset.corpus.ids, dataset.corpus.index, qrels, config.max_docs)
    return EvalSet(
        config=config,
        query_ids=judged,
        query_texts=[dataset.queries.texts[dataset.queries.index[qid]] for qid in judged],
        doc_ids=[dataset.corpus.ids[i] for i in doc_positions],
        doc_texts=dataset.corpus.passages(doc_positions),
        qrels=qrels,
    )


def _select_docs(ids: list[str], index: dict[str, int], qrels: Qrels, max_docs: int | None) -> list[int]:
    """Corpus positions to keep: all, or the judged docs of kept queries first, then others in file order."""
    if max_docs is None or max_docs >= len(ids):
        return list(range(len(ids)))
    judged = sorted({index[d] for rel in qrels.values() for d in rel if d in index})
    chosen = set(judged[:max_docs])
    for i in range(len(ids)):
        if len(chosen) >= max_docs:
            break
        chosen.add(i)
    return sorted(chosen)


def load_eval_sets(configs: Sequence[EvalSetConfig]) -> dict[str, EvalSet]:
    """Load every set, keyed by name (names must be unique: they become metric keys)."""
    sets: dict[str, EvalSet] = {}
    for i, cfg in enumerate(configs):
        if cfg.name in sets:
            raise ConfigError(f"eval_sets[{i}].name", f"duplicate name '{cfg.name}'")
        sets[cfg.name] = load_eval_set(cfg)
    return sets


class EvalTextDataset(Dataset):
    """The queries or the corpus of one eval set; items are positions so batches can carry their indices."""

    def __init__(self, eval_set: EvalSet, kind: Kind) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.eval_set = eval_set
        self.kind = kind

    def __len__(self) -> int:
        return self.eval_set.size(self.kind)

    def __getitem__(self, i: int) -> int:
        return i


class EvalCollator:
    """Tokenizes a batch of positions (module-level class so ``ddp_spawn`` can pickle it)."""

    def __init__(self, eval_set: EvalSet, kind: Kind, tokenizer, add_eos: bool = False) -> None:
        self.eval_set = eval_set
        self.kind = kind
        self.tokenizer = tokenizer
        self.add_eos = add_eos

    def __call__(self, positions: list[int]) -> dict:
        cfg = self.eval_set.config
        if self.kind == "queries":
            texts = [self.eval_set.query_texts[i] for i in positions]
            enc = tokenize(self.tokenizer, texts, cfg.query_max_length, prefix=cfg.query_text_prefix,
                           mask_prefix=cfg.mask_instruction, add_eos=self.add_eos)
        else:
            texts = [self.eval_set.doc_texts[i] for i in positions]
            enc = tokenize(self.tokenizer, texts, cfg.passage_max_length, prefix=cfg.passage_prefix,
                           mask_prefix=False, add_eos=self.add_eos)
        batch = dict(enc)
        batch["index"] = torch.as_tensor(positions, dtype=torch.long)
        batch["dataset"] = self.eval_set.name
        batch["kind"] = self.kind
        return batch


def build_eval_dataloaders(
    eval_sets: Sequence[EvalSet] | dict[str, EvalSet],
    tokenizer,
    batch_size: int,
    add_eos: bool = False,
    num_workers: int = 0,
) -> list[DataLoader]:
    """Per set: its queries loader then its corpus loader, unshuffled; the evaluator finds the sets through
    ``loader.dataset.eval_set``. The corpus loader is left out for a set whose ``cached_corpus`` (frozen base
    weights, attached by the evaluator) was computed with this tokenizer and EOS setting."""
    if batch_size <= 0:
        raise ConfigError("batch_size", f"must be > 0, got {batch_size}")
    sets = list(eval_sets.values()) if isinstance(eval_sets, dict) else list(eval_sets)
    loaders = []
    for eval_set in sets:
        check_prompts_fit(eval_set.config, tokenizer, add_eos)
        for kind in KINDS:
            if kind == "corpus" and _corpus_is_cached(eval_set, tokenizer, add_eos):
                continue  # the evaluator takes the frozen base model's cached corpus embeddings instead
            loaders.append(DataLoader(
                EvalTextDataset(eval_set, kind), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                collate_fn=EvalCollator(eval_set, kind, tokenizer, add_eos),
            ))
    return loaders


def _corpus_is_cached(eval_set: EvalSet, tokenizer, add_eos: bool) -> bool:
    """True when the set carries cached corpus embeddings made with this very tokenizer and EOS setting."""
    cached = eval_set.cached_corpus
    if cached is None or cached.add_eos != add_eos:
        return False
    from nvr.modeling.embedder import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer) == cached.tokenizer


def check_prompts_fit(cfg: EvalSetConfig, tokenizer, add_eos: bool) -> None:
    """The same instruction-length check as training: a prompt that leaves no text token within the max length
    would make every query (or passage) embedding pool only the prompt."""
    from nvr.modeling.tokenization import check_prefix_fits

    key = f"data.eval_sets[{cfg.name}]"
    check_prefix_fits(tokenizer, cfg.query_text_prefix, cfg.query_max_length, add_eos,
                      f"{key}.query_instruction" if cfg.query_prefix is None else f"{key}.query_prefix",
                      "query_max_length")
    check_prefix_fits(tokenizer, cfg.passage_prefix, cfg.passage_max_length, add_eos, f"{key}.passage_prefix",
                      "passage_max_length")
