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
    """Alternative to qrels: (query, positive) rows in a .jsonl/.json, .csv, .tsv (each optionally .gz), .parquet
    file or a Hugging Face datasets folder (save_to_disk). Columns: nvr's query_id?, query, positive / positives
    (texts), positive_ids (corpus ids), negative(s), or sentence-transformers names (anchor / positive / negative,
    negative_1.., question / answer, ...) when unambiguous. Given negatives join the corpus as mining candidates."""
    columns: dict[str, str | list[str]] | None = None
    """Which ``pairs_file`` column holds each field, e.g. ``{query: anchor, positive: pos}`` (fields: query,
    query_id, positive, positive_ids, negative; a list of columns for the last three); beats auto-detection."""
    corpus_file: str | None = None
    """Corpus for ``pairs_file`` mode (default beir_dir/corpus.jsonl[.gz]): BEIR JSONL, a .txt file (one passage
    per line) or any pairs_file format with a text column; without an id column, ids are
    ``doc:<sha1(passage)[:16]>``."""
    corpus_columns: dict[str, str] | None = None
    """Which ``corpus_file`` column holds each field, e.g. ``{id: pid, text: passage}`` (fields: id, title, text)."""
    min_relevance: int = 1
    """Qrels grade at or above which a document counts as positive (>= 1: grade 0 and below mean "judged not
    relevant")."""
    exclude_judged: bool = True
    """Never mine a document judged relevant (grade > 0) to the query as its negative, even below
    ``min_relevance`` (false: such documents may be negatives)."""
    max_queries: int | None = None
    """Mine only the first N queries (file order); None = all."""

    def __post_init__(self) -> None:
        from nvr.data.columns import CORPUS_ROLES, PAIR_ROLES, check_mapping

        if self.beir_dir is None and self.pairs_file is None:
            raise ConfigError("data", "set data.beir_dir or data.pairs_file")
        if self.columns and self.pairs_file is None:
            raise ConfigError("data.columns", "maps the columns of data.pairs_file, which is not set")
        if self.corpus_columns and self.corpus_file is None:
            raise ConfigError("data.corpus_columns", "maps the columns of data.corpus_file, which is not set")
        check_mapping(self.columns, PAIR_ROLES, "data.columns")
        check_mapping(self.corpus_columns, CORPUS_ROLES, "data.corpus_columns")
        if self.min_relevance < 1:
            raise ConfigError("data.min_relevance", f"must be >= 1 (grade 0 and below mean \"judged not relevant\"), "
                                                    f"got {self.min_relevance}")
        if self.max_queries is not None and self.max_queries <= 0:
            raise ConfigError("data.max_queries", f"must be > 0, got {self.max_queries}")

    def pairs_corpus(self) -> str | None:
        """The corpus of ``pairs_file`` mode: ``corpus_file``, else ``beir_dir``'s corpus.jsonl[.gz], else None
        (the corpus is then built from the pairs' own texts)."""
        if self.corpus_file is not None:
            return self.corpus_file
        if self.beir_dir is None:
            return None
        from nvr.data.beir import find_jsonl

        return str(find_jsonl(self.beir_dir, "corpus"))


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
    filter: FilterConfig | None = None
    """This teacher's own filter (ensembles: teachers score on incomparable scales, e.g. cosine vs BM25), replacing
    the run's ``filter`` for its candidates; None = the run's ``filter``."""
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the cached embeddings (dense teachers). ``float16`` / ``bfloat16`` halve the cache, the RAM
    and the search traffic (a 7B teacher's 8.8M-passage corpus: 144 GB -> 72 GB); scores are still computed exactly
    (fp64) from the stored vectors, but the storage rounding changes them, so it is part of every cache key."""
    search: Literal["exact", "ivf", "hnsw"] = "exact"
    """Dense teachers: ``exact`` (default: blocked brute force + exact refine, sharded under torchrun) or an
    approximate faiss index for users who accept missed neighbours: ``ivf`` (IVF-Flat) or ``hnsw`` (HNSW-Flat). The
    retrieved candidates are re-scored exactly (fp64) and ordered deterministically; ``benchmarks/scale_mining.py
    --ann`` prints their recall against exact search. The index holds the whole corpus in float32 RAM."""
    search_params: dict[str, int] = field(default_factory=dict)
    """ANN settings (part of the cache key): ``ivf``: ``nlist`` (default 4 sqrt(D)), ``nprobe`` (32), ``seed`` (0,
    k-means and its training sample); ``hnsw``: ``m`` (32), ``ef_search`` (256, raised to k), ``ef_construction``
    (80). Must be empty for ``exact``."""

    def __post_init__(self) -> None:
        if self.kind == "dense" and not self.model_name_or_path:
            raise ConfigError(f"teachers[{self.name}].model_name_or_path", "required for a dense teacher")
        from nvr.search.ann import check_search_params

        check_search_params(self.search, self.search_params, f"teachers[{self.name}]")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"teachers[{self.name}].cache_dtype",
                              f"must be float32, float16 or bfloat16, got {self.cache_dtype!r}")
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
    calibrate: CalibrateConfig | None = None
    """Choose the method's own parameter (``max_score`` / ``margin`` / ``perc``) per teacher from that teacher's
    positive scores (``nvr.mining.calibrate``), so one setting means the same on every score scale; the value set
    above is then ignored and the chosen one is recorded in ``report.json`` and the false-negative report."""

    def __post_init__(self) -> None:
        check_finite(self, "filter")
        if self.shift < 0:
            raise ConfigError("filter.shift", f"must be >= 0, got {self.shift}")
        if self.margin < 0:
            raise ConfigError("filter.margin", f"must be >= 0, got {self.margin}")
        if not 0 < self.perc <= 2:
            raise ConfigError("filter.perc", f"must be in (0, 2], got {self.perc}")
        if self.calibrate is not None and self.method not in CALIBRATED_PARAMETER:
            raise ConfigError("filter.calibrate", f"needs a method with a score threshold "
                                                  f"({', '.join(CALIBRATED_PARAMETER)}); {self.method} has none")


CalibrateTarget = Literal["heldout_reject_rate", "positive_quantile"]
CALIBRATED_PARAMETER: dict[str, str] = {"topk_abs": "max_score", "topk_marginpos": "margin", "topk_percpos": "perc"}
"""The FilterConfig field ``filter.calibrate`` chooses for each score-based method."""


@dataclass
class CalibrateConfig:
    """A teacher-independent threshold: the share ``value`` of known positives the chosen threshold would reject.

    ``heldout_reject_rate``: for each query with >= 2 positives, a seeded share ``holdout`` of its positives is held
    back, the anchor is taken from the rest, and the threshold rejects ``value`` of the held-back positives (they
    stand for the unlabeled positives a filter must catch). ``positive_quantile``: no randomness; MarginPos and
    PercPos use every positive of a multi-positive query in turn against the anchor of the others, TopK-Abs the
    scores of all positives (``value`` of them score at or above ``max_score``).
    """

    target: CalibrateTarget = "heldout_reject_rate"
    value: float = 0.9
    """Share of the calibration positives the chosen threshold rejects, in (0, 1]."""
    holdout: float = 0.5
    """``heldout_reject_rate``: share of each multi-positive query's positives held back (at least one, never all)."""
    seed: int | None = None
    """Seed of the held-back split; None = the mining ``seed``."""

    def __post_init__(self) -> None:
        check_finite(self, "filter.calibrate")
        if not 0 < self.value <= 1:
            raise ConfigError("filter.calibrate.value", f"must be in (0, 1], got {self.value}")
        if not 0 < self.holdout < 1:
            raise ConfigError("filter.calibrate.holdout", f"must be in (0, 1), got {self.holdout}")


@dataclass
class FnReportConfig:
    """The false-negative report (``nvr mine --fn_report``, ``fn_report:`` in an ablation spec): hold back known
    positives, mine with the rest as anchors, and measure how many held-back positives each filter selects as
    negatives (``nvr.mining.fn_report``). Filters run over one cached candidate table per teacher."""

    holdout: float = 0.5
    """Share of each query's positives held back (queries with >= 2 positives; at least one kept, one held)."""
    qrels: str | None = None
    """Instead of holding back: a second qrels TSV for the same queries; its relevant docs that are not training
    positives are the held-back set (every training positive stays an anchor)."""
    seed: int | None = None
    """Seed of the held-back split; None = the mining ``seed``."""
    shifts: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50])
    """topk_shifted sweep (naive Top-K is its own row)."""
    max_scores: list[float] | None = None
    """topk_abs sweep in the teacher's score units; None = per teacher, the ``abs_quantiles`` of its anchors."""
    abs_quantiles: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 0.75, 0.9])
    margins: list[float] | None = None
    """topk_marginpos sweep in score units; None = per teacher, ``margin_scales`` x its median |anchor| (so the
    sweep matches PercPos at 1 - scale for a median query on any scale)."""
    margin_scales: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3])
    percs: list[float] = field(default_factory=lambda: [1.0, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7])
    """topk_percpos sweep."""

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ConfigError("fn.holdout", f"must be in (0, 1), got {self.holdout}")
        checks = {"shifts": (self.shifts, lambda v: isinstance(v, int) and v >= 0, "integers >= 0"),
                  "abs_quantiles": (self.abs_quantiles, lambda v: 0 <= v <= 1, "in [0, 1]"),
                  "margin_scales": (self.margin_scales, lambda v: v >= 0, ">= 0"),
                  "percs": (self.percs, lambda v: 0 < v <= 2, "in (0, 2]"),
                  "max_scores": (self.max_scores or [], lambda v: True, "finite"),
                  "margins": (self.margins or [], lambda v: v >= 0, ">= 0")}
        for key, (values, ok, what) in checks.items():
            for v in values:
                if isinstance(v, float) and not math.isfinite(v) or not ok(v):
                    raise ConfigError(f"fn.{key}", f"values must be {what}, got {v}")


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
    relabel: RelabelConfig | None = None
    """Judge the candidates the filter rejected as too close to the positive; those the judge accepts become extra
    positives of the example (``nvr.mining.relabel``). None = off."""
    seed: int = 42
    cache_dir: str = ".nvr_cache"
    """Embedding shards and candidate tables, keyed by fingerprints; reused across runs and sweeps."""
    search_memory_mb: int = 1024
    """Upper bound for the resident doc block plus one score block of the search, per rank."""
    audit: bool = False
    """Write audit.parquet: for every candidate, kept or the rule that rejected it."""
    overwrite: bool = False
    stream_chunk_queries: int | None = None
    """Streaming mode (``nvr.mining.streaming``): process the queries in chunks of this many rows, each finished
    chunk saved (checksummed) under ``cache_dir/stream/<fingerprint>`` so host RAM is bounded by one chunk and a
    killed run resumes from the finished chunks; ``mined.jsonl`` and ``manifest.json`` are byte-identical to the
    in-memory path (None, the default), so it is not part of any fingerprint. Not with ``relabel`` or ``audit``."""

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
        self._check_streaming()
        if self.relabel is not None and all((t.filter or self.filter).method == "naive_topk" for t in self.teachers):
            raise ConfigError("relabel", "naive_topk rejects no candidate by score, so there is nothing to relabel; "
                                         "use topk_shifted, topk_abs, topk_marginpos or topk_percpos")


    def _check_streaming(self) -> None:
        """Streaming keeps one chunk of candidates in memory: settings that need every query's candidates at once
        are refused here, before any encoding (never silently run in memory)."""
        if self.stream_chunk_queries is None:
            return
        if self.stream_chunk_queries <= 0:
            raise ConfigError("stream_chunk_queries", f"must be > 0 or null, got {self.stream_chunk_queries}")
        for key, value in (("relabel", self.relabel is not None), ("audit", self.audit)):
            if value:
                raise ConfigError("stream_chunk_queries", f"not supported together with {key} (it needs every "
                                                          f"query's candidates at once); unset one of them")


RelabelActivation = Literal["sigmoid", "identity"]


@dataclass
class RelabelConfig:
    """Relabel instead of only dropping (issue 13, RLHN-style): a cross-encoder judges the candidates the filter
    rejected *by its score rule* (``above_perc`` / ``above_margin`` / ``above_max``; ``shifted`` for
    ``topk_shifted``), never positives, their duplicates, query-text or judged-relevant exclusions. Candidates whose
    judge score is at or above ``threshold`` become extra positives of the example; the others stay rejected."""

    model_name_or_path: str
    """Any HF sequence-classification model (one logit, or the last label of a classification head)."""
    threshold: float = 0.5
    """Judge score (after ``activation``) at or above which a rejected candidate becomes an extra positive."""
    max_candidates: int = 10
    """Per query, judge at most this many rejected candidates (best teacher rank first)."""
    max_extra_positives: int | None = None
    """Per query, keep at most this many extra positives (highest judge score first); None = all accepted."""
    max_length: int = 512
    batch_size: int = 64
    max_tokens_per_batch: int | None = None
    """Cap on padded tokens per judge batch; changes no score (not part of any fingerprint)."""
    activation: RelabelActivation = "sigmoid"
    """Applied to a single-logit head (``sigmoid``: scores in (0, 1)); classification heads use softmax."""
    dtype: DType = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        check_finite(self, "relabel")
        if not self.model_name_or_path:
            raise ConfigError("relabel.model_name_or_path", "must be a non-empty HF id or folder")
        for key in ("max_candidates", "max_length", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"relabel.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("max_extra_positives", "max_tokens_per_batch"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"relabel.{key}", f"must be > 0 or null, got {getattr(self, key)}")

    def judge_config(self) -> CrossEncoderConfig:
        """The cross-encoder settings of the judge (same scorer as ``cross_encoder`` rescoring)."""
        return CrossEncoderConfig(model_name_or_path=self.model_name_or_path, max_length=self.max_length,
                                  batch_size=self.batch_size, max_tokens_per_batch=self.max_tokens_per_batch,
                                  dtype=self.dtype, device=self.device)
