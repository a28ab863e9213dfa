"""Typed mining configuration: the same objects drive ``nvr mine`` and the training DataModule.

jsonargparse reads these dataclasses from YAML (attribute docstrings become ``--help``); ``__post_init__`` rejects
out-of-range values with the offending dotted key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from nvr.utils.errors import ConfigError

FilterMethod = Literal["naive_topk", "topk_shifted", "topk_abs", "topk_marginpos", "topk_percpos"]
SamplerMethod = Literal["topk", "sampled_topk", "top1_sampled"]
EnsembleMethod = Literal["none", "cross_sample", "intra_sample_dedup", "intra_sample_nodedup"]
AnchorPolicy = Literal["min", "mean", "max"]
ShortfallPolicy = Literal["drop", "keep_short"]
Pooling = Literal["mean", "cls", "last_token"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
TEACHER_RUNTIME_KEYS = ("shard_size", "max_tokens_per_batch")
"""TeacherConfig fields that change how the work is cut up, never its result: left out of every fingerprint of a
mining job (manifest config, mined-set cache key), so setting them keeps existing caches and mined sets valid."""
CROSS_ENCODER_RUNTIME_KEYS = ("max_tokens_per_batch",)
"""CrossEncoderConfig fields that only change how the work is cut up (same rule as ``TEACHER_RUNTIME_KEYS``)."""


def check_finite(obj: object, prefix: str) -> None:
    """Reject NaN / inf in every float field of a config dataclass (``prefix.field`` names the key): a NaN
    threshold compares false with every score, so mining would silently keep nothing (or everything)."""
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}.{f.name}", f"must be a finite number, got {value}")


@dataclass
class DataSource:
    """Where the (query, positive) pairs and the corpus come from."""

    beir_dir: str | None = None
    """BEIR folder with corpus.jsonl, queries.jsonl, qrels/{split}.tsv."""
    split: str = "train"
    """qrels split whose (query, doc) pairs with score >= min_relevance are positives."""
    pairs_file: str | None = None
    """Alternative to qrels: JSONL/parquet rows {query_id?, query, positive(s)} (texts or corpus ids)."""
    corpus_file: str | None = None
    """Corpus JSONL for ``pairs_file`` mode (defaults to beir_dir/corpus.jsonl)."""
    min_relevance: int = 1
    """Qrels grade at or above which a document counts as positive (>= 1: grade 0 and below mean "judged not
    relevant")."""
    exclude_judged: bool = True
    """Never mine a document judged relevant (grade > 0) to the query as its negative, even below
    ``min_relevance`` (false: such documents may be negatives)."""
    max_queries: int | None = None
    """Mine only the first N queries (file order); None = all."""

    def __post_init__(self) -> None:
        if self.beir_dir is None and self.pairs_file is None:
            raise ConfigError("data", "set data.beir_dir or data.pairs_file")
        if self.min_relevance < 1:
            raise ConfigError("data.min_relevance", f"must be >= 1 (grade 0 and below mean \"judged not relevant\"), "
                                                    f"got {self.min_relevance}")
        if self.max_queries is not None and self.max_queries <= 0:
            raise ConfigError("data.max_queries", f"must be > 0, got {self.max_queries}")


@dataclass
class TeacherConfig:
    """One teacher that ranks the corpus for every query."""

    name: str = "teacher"
    """Label recorded as provenance of each negative."""
    kind: Literal["dense", "bm25", "random"] = "dense"
    """``random``: ``depth`` corpus docs drawn uniformly per query with random scores and no positive scores
    (paper Table 1 "random" row); use it with ``filter.method: naive_topk`` (positive-aware filters need scores)."""
    model_name_or_path: str | None = None
    """HF hub id or local folder (dense teachers)."""
    pooling: Pooling = "mean"
    normalize: bool = True
    add_eos: bool = False
    """Append the EOS token to every text (e5-mistral: last-token pooling reads the appended EOS)."""
    bidirectional: bool = False
    """Decoder teachers only: load with bidirectional attention (a teacher trained that way, e.g. NV-Retriever)."""
    trust_remote_code: bool = False
    """Let transformers run the model repository's own code (tokenizer / config / model classes)."""
    query_prefix: str = ""
    passage_prefix: str = ""
    query_max_length: int = 512
    passage_max_length: int = 512
    batch_size: int = 32
    max_tokens_per_batch: int | None = None
    """Cap on padded tokens per encode batch (batches are length-sorted; ``batch_size`` still caps the rows), so a
    long-tailed corpus neither runs out of memory nor pads short texts to long ones. Not part of any cache key:
    it changes how the work is cut, not the embeddings (equal within float rounding)."""
    dtype: DType = "auto"
    """``auto``: fp32 weights under bf16 autocast where the device runs bf16 natively (CUDA with bf16, CPUs with
    avx512_bf16 / amx_bf16), fp32 elsewhere; the resolved dtype is part of the embedding keys and the manifest.
    ``float32`` for exact parity; ``bfloat16`` / ``float16`` load the weights in that dtype."""
    device: str = "auto"
    """'auto' picks cuda when present, else cpu."""
    shard_size: int = 10000
    """Texts per embedding cache shard, each saved as soon as it is encoded: a killed run loses at most one
    shard of work. Not part of any cache key: finished embeddings are reused whatever the shard size, and an
    interrupted folder resumes with the shard size it was started with."""

    def __post_init__(self) -> None:
        if self.kind == "dense" and not self.model_name_or_path:
            raise ConfigError(f"teachers[{self.name}].model_name_or_path", "required for a dense teacher")
        for key in ("query_max_length", "passage_max_length", "batch_size", "shard_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"teachers[{self.name}].{key}", f"must be > 0, got {getattr(self, key)}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch <= 0:
            raise ConfigError(f"teachers[{self.name}].max_tokens_per_batch",
                              f"must be > 0 or null, got {self.max_tokens_per_batch}")


@dataclass
class CrossEncoderConfig:
    """Optional cross-encoder that rescores each teacher's candidates (and the positives) before filtering."""

    model_name_or_path: str
    max_length: int = 512
    batch_size: int = 64
    max_tokens_per_batch: int | None = None
    """Cap on padded tokens per scoring batch (pairs are length-sorted); changes no score."""
    dtype: DType = "auto"
    """As ``TeacherConfig.dtype``: bf16 autocast where native, else fp32 (the resolved dtype keys the scores)."""
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ConfigError("cross_encoder.model_name_or_path", "must be a non-empty HF id or folder")
        for key in ("max_length", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"cross_encoder.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch <= 0:
            raise ConfigError("cross_encoder.max_tokens_per_batch",
                              f"must be > 0 or null, got {self.max_tokens_per_batch}")


@dataclass
class FilterConfig:
    """Which candidates may become negatives (paper section 3, Algorithms 1-3)."""

    method: FilterMethod = "topk_percpos"
    shift: int = 10
    """topk_shifted: skip the first N eligible (non-positive) candidates."""
    max_score: float = 0.7
    """topk_abs: drop candidates scoring above this."""
    margin: float = 0.05
    """topk_marginpos: keep n if score(n) < anchor - margin."""
    perc: float = 0.95
    """topk_percpos: keep n if score(n) < anchor - |anchor| * (1 - perc) (sign-safe form of anchor * perc)."""
    min_score: float | None = None
    """Optional floor for every method: drop candidates scoring below this."""
    anchor: AnchorPolicy = "min"
    """How several positives' scores combine into the anchor (NVIDIA's code uses min)."""

    def __post_init__(self) -> None:
        check_finite(self, "filter")
        if self.shift < 0:
            raise ConfigError("filter.shift", f"must be >= 0, got {self.shift}")
        if self.margin < 0:
            raise ConfigError("filter.margin", f"must be >= 0, got {self.margin}")
        if not 0 < self.perc <= 2:
            raise ConfigError("filter.perc", f"must be in (0, 2], got {self.perc}")


@dataclass
class SamplerConfig:
    """How K negatives are chosen among the surviving candidates (paper section 4.3.2)."""

    method: SamplerMethod = "topk"
    window: int = 10
    """sampled_topk / top1_sampled: sample from the first ``window`` survivors."""
    temperature: float = 1.0
    """Softmax temperature over teacher scores for sampling (lower = greedier)."""

    def __post_init__(self) -> None:
        check_finite(self, "sampler")
        if self.window <= 0:
            raise ConfigError("sampler.window", f"must be > 0, got {self.window}")
        if self.temperature <= 0:
            raise ConfigError("sampler.temperature", f"must be > 0, got {self.temperature}")


@dataclass
class MineConfig:
    """A complete offline mining job."""

    data: DataSource
    teachers: list[TeacherConfig] = field(default_factory=list)
    output_dir: str = "runs/mined"
    num_negatives: int = 4
    depth: int = 100
    """Candidates retrieved per query before filtering."""
    max_depth: int = 1000
    """Shortfall policy step 1: re-search up to this depth when fewer than num_negatives survive (skipped when
    ``depth`` already covers the whole corpus: a deeper search cannot find more)."""
    shortfall: ShortfallPolicy = "keep_short"
    """Shortfall policy step 2 after widening: ``drop`` the query, or ``keep_short``: keep it with fewer negatives
    (never padded). ``keep_short`` also keeps queries whose filter left 0 negatives, on purpose: they still train
    against the in-batch negatives (the other queries' passages), and training masks their empty hard-negative
    slots. ``manifest.json`` counts them as ``kept_without_negatives`` and the run summary prints them; use
    ``drop`` to train only on queries with all ``num_negatives`` hard negatives."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ensemble: EnsembleMethod = "none"
    cross_encoder: CrossEncoderConfig | None = None
    seed: int = 42
    cache_dir: str = ".nvr_cache"
    """Embedding shards and candidate tables, keyed by fingerprints; reused across runs and sweeps."""
    search_memory_mb: int = 1024
    """Upper bound for one block of the query x corpus score matrix."""
    audit: bool = False
    """Write audit.parquet: for every candidate, kept or the rule that rejected it."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError("teachers", "at least one teacher is required")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError("teachers", f"teacher names must be unique, got {names}")
        if self.num_negatives <= 0:
            raise ConfigError("num_negatives", f"must be > 0, got {self.num_negatives}")
        if self.depth <= 0 or self.max_depth < self.depth:
            raise ConfigError("depth", f"need 0 < depth <= max_depth, got {self.depth} / {self.max_depth}")
        if self.ensemble == "none" and len(self.teachers) > 1:
            raise ConfigError("ensemble", "several teachers need an ensemble method (cross_sample, intra_sample_*)")
        if self.search_memory_mb <= 0:
            raise ConfigError("search_memory_mb", f"must be > 0, got {self.search_memory_mb}")
