"""``mine(cfg)``: data -> candidate tables (one per teacher) -> filter -> sampler / ensemble -> mined folder.

Output folder (written atomically; an existing one is refused unless ``overwrite``):

- ``mined.jsonl``: one row per query (see ``mined_set`` for the format), in query-file order.
- ``manifest.json``: content config, package versions, teacher and data fingerprints, seed, counts. No paths or
  timestamps, so two runs of the same config give byte-identical ``mined.jsonl`` and ``manifest.json``.
- ``report.json`` / ``report.png``: statistics (``report.py``); wall time and paths live here.
- ``audit.parquet`` when ``cfg.audit``.

Shortfall policy: queries whose selection ran out of survivors (fewer than ``num_negatives``; for the samplers,
fewer than ``sampler.window``, so they sample from the same window as a direct deep search; for ``intra_sample``, a
teacher ran out) are re-built at ``max_depth`` and re-selected (step 1, skipped when ``depth`` already covers the
whole corpus); those still short are then dropped or kept short (step 2, ``cfg.shortfall``). Rows are never padded;
``keep_short`` may write rows with no negative at all (counted as ``kept_without_negatives``), which train on
in-batch negatives only.
Positive scores in ``mined.jsonl`` come from the first teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from nvr.config.mining import (
    CROSS_ENCODER_RUNTIME_KEYS,
    TEACHER_RUNTIME_KEYS,
    DataSource,
    MineConfig,
    TeacherConfig,
)
from nvr.data.beir import (
    Corpus,
    Queries,
    judged_relevant,
    load_beir,
    positives_from_qrels,
    same_text_queries,
    union_over,
)
from nvr.data.corpus_file import load_corpus_file
from nvr.data.pairs import read_pairs
from nvr.mining.audit import write_audit
from nvr.mining.build import TextKeys, build_candidate_table, exclusion_reasons
from nvr.mining.calibrate import effective_filters
from nvr.mining.ensembles import cross_sample, intra_sample, per_teacher_selections
from nvr.mining.filters import FilterResult, Reason, apply_filter
from nvr.mining.mined_set import MANIFEST_FILE, MINED_FILE
from nvr.mining.report import build_report, filter_settings, plot_report
from nvr.mining.samplers import needed_survivors, select, starved
from nvr.mining.selection import Selection
from nvr.search.table import CandidateTable
from nvr.utils.atomic import atomic_dir, atomic_file, write_json_atomic
from nvr.utils.distributed import dist_rank_world
from nvr.utils.errors import ConfigError, InputError
from nvr.utils.hashing import sha256_json, sha256_texts

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "nvr-mined/1"
# Config keys that say where things go, not what is mined: left out of the manifest and the fingerprint.
# Fields that change where/how the work runs, not the mined examples (so not the fingerprint either).
_LOCATION_KEYS = ("output_dir", "overwrite", "cache_dir", "search_memory_mb", "audit", "stream_chunk_queries")
POSITIVE_AWARE_FILTERS = ("topk_marginpos", "topk_percpos")
_VERSIONED = ("nvr", "numpy", "torch", "transformers", "faiss-cpu", "faiss-gpu", "bm25s", "pyarrow")


@dataclass
class MiningData:
    """Queries that have positives (file order), their positive doc ids, the corpus, and fingerprints.

    ``excluded``: per query, doc ids that are neither positives nor allowed as negatives (judged relevant below
    ``min_relevance``, by this query or one with the same text). ``merged_queries``: queries whose positives and
    judgements were unioned with those of other queries with the same normalized text.
    """

    queries: Queries
    positives: dict[str, list[str]]
    corpus: Corpus
    skipped_queries: int
    excluded: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    merged_queries: int = 0

    def fingerprints(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus.fingerprint,
            "queries": sha256_texts(t for pair in zip(self.queries.ids, self.queries.texts) for t in pair),
            "positives": sha256_json([[q, self.positives[q]] for q in self.queries.ids]),
            "num_docs": len(self.corpus),
            "num_queries": len(self.queries),
        }


def content_config(cfg: MineConfig) -> dict[str, Any]:
    """The config as a dict without output locations: what determines the mined content."""
    out = dataclasses.asdict(cfg)
    for key in _LOCATION_KEYS:
        out.pop(key, None)
    for teacher in out["teachers"]:
        for key in TEACHER_RUNTIME_KEYS:
            teacher.pop(key, None)
        _drop_neutral(teacher, TEACHER_NEUTRAL)
    _drop_neutral(out["data"], DATA_NEUTRAL)
    _drop_neutral(out["filter"], FILTER_NEUTRAL)
    if out.get("cross_encoder"):
        for key in CROSS_ENCODER_RUNTIME_KEYS:
            out["cross_encoder"].pop(key, None)
    if out.get("relabel") is None:
        out.pop("relabel", None)  # off: the content address of every set mined without relabel stays unchanged
    else:
        for key in CROSS_ENCODER_RUNTIME_KEYS:
            out["relabel"].pop(key, None)
    return out


# Settings added after sets were mined, at their neutral value ("off" / the old behaviour), are left out of the
# content address, so every set mined before they existed keeps its address; any other value is part of it.
TEACHER_NEUTRAL: dict[str, Any] = {"filter": None, "cache_dtype": "float32", "search": "exact", "search_params": {}}
DATA_NEUTRAL: dict[str, Any] = {"columns": None, "corpus_columns": None}
FILTER_NEUTRAL: dict[str, Any] = {"calibrate": None}


def _drop_neutral(section: dict[str, Any], neutral: dict[str, Any]) -> None:
    for key, value in neutral.items():
        if key in section and section[key] == value:
            del section[key]


def input_files(src: DataSource) -> dict[str, Path]:
    """Every file the mining data is read from, by role (BEIR: corpus, queries and every qrels split, so an edit of
    any judgement file counts; pairs: the pairs file and its corpus, any format). Missing ones are an
    ``InputError``."""
    from nvr.data.beir import beir_files
    from nvr.data.tabular import data_files

    files: dict[str, Path] = {}
    if src.pairs_file is not None:  # a datasets folder counts with every file in it: pairs/<name>, corpus/<name>
        for role, source in (("pairs", src.pairs_file), ("corpus", src.pairs_corpus())):
            if source is not None:
                files.update({f"{role}/{name}" if name else role: path for name, path in data_files(source)})
    else:
        corpus_path, queries_path, _ = beir_files(src.beir_dir, src.split)
        files.update(corpus=corpus_path, queries=queries_path)
        for qrels in sorted((Path(src.beir_dir) / "qrels").glob("*.tsv")):
            files[f"qrels/{qrels.name}"] = qrels
    for path in files.values():
        if not path.is_file():
            raise InputError("input file not found", path)
    return files


def teacher_records(teachers: Sequence[Any], cfgs: Sequence[TeacherConfig]) -> list[dict[str, Any]]:
    """Each teacher's identity as the manifest and the mined-set key record it (with the resolved dtype, e.g.
    ``autocast-bfloat16`` for ``dtype: auto`` on bf16 hardware; None for teachers without one)."""
    return [{"name": t.name, "kind": c.kind, "fingerprint": t.settings_fingerprint,
             "dtype": getattr(t, "dtype_label", None)} for t, c in zip(teachers, cfgs)]


def mining_inputs(cfg: MineConfig, teacher_fingerprints: Sequence[dict[str, str]] | None = None) -> dict[str, Any]:
    """What a mined set depends on besides its config: the content (sha256) of every input file, each teacher's
    fingerprint (model folder content + every encoding setting) and the cross-encoder's. Cheap on a warm run: file
    hashes are memoized under ``cache_dir/fingerprints`` by file identity and no model is loaded."""
    from nvr.utils.fingerprint import files_fingerprint, memo_dir_for

    if teacher_fingerprints is None:
        teachers = [make_teacher(t, cfg.cache_dir, cfg.seed) for t in cfg.teachers]
        teacher_fingerprints = teacher_records(teachers, cfg.teachers)
    cross_encoder = None
    if cfg.cross_encoder is not None:
        from nvr.teachers.cross_encoder import CrossEncoderRescorer

        cross_encoder = CrossEncoderRescorer(cfg.cross_encoder, cache_dir=cfg.cache_dir).fingerprint
    out = {"files": files_fingerprint(input_files(cfg.data), memo_dir_for(cfg.cache_dir)),
           "teachers": list(teacher_fingerprints), "cross_encoder": cross_encoder}
    if cfg.relabel is not None:  # the judge's identity (model content + scoring settings)
        from nvr.teachers.cross_encoder import CrossEncoderRescorer

        out["relabel"] = CrossEncoderRescorer(cfg.relabel.judge_config(), activation=cfg.relabel.activation,
                                              cache_dir=cfg.cache_dir, key="relabel").fingerprint
    return out


def mining_fingerprint(cfg: MineConfig, inputs: dict[str, Any] | None = None) -> str:
    """Content address of a mined set (names the cached mined folder): the content config + ``mining_inputs``
    (input file contents, teacher and cross-encoder identities). Output locations and runtime knobs are left out,
    so moving the output or the cache keeps the address; editing the corpus or retraining a teacher changes it."""
    inputs = mining_inputs(cfg) if inputs is None else inputs
    return sha256_json({"config": content_config(cfg), "inputs": inputs})[:16]


def load_data(src: DataSource) -> MiningData:
    """BEIR qrels (``beir_dir``/``split``) or a pairs file (with ``corpus_file`` or ``beir_dir``'s corpus), each in
    any format ``nvr.data.tabular`` reads, columns mapped by ``data.columns`` / ``data.corpus_columns``."""
    merged_ids: set[str] = set()
    if src.pairs_file is not None:
        corpus_path = src.pairs_corpus()
        corpus = load_corpus_file(corpus_path, src.corpus_columns) if corpus_path else None
        pairs = read_pairs(src.pairs_file, corpus, src.columns)
        queries, positives, corpus = pairs.queries, pairs.positives, pairs.corpus
        skipped = 0
        excluded: dict[str, list[str]] = {}
        merged_rows = pairs.merged_queries  # the pairs loader merges rows with the same normalized query text
    else:
        ds = load_beir(src.beir_dir, src.split)
        pos = positives_from_qrels(ds.qrels, ds.queries, src.min_relevance, corpus=ds.corpus)
        queries = ds.queries.subset(q for q in ds.queries.ids if q in pos)
        positives, excluded, merged_ids = _merge_judgements(ds.queries, ds.qrels, pos)
        excluded = excluded if src.exclude_judged else {}
        corpus, skipped, merged_rows = ds.corpus, pos.skipped, 0
    if src.max_queries is not None:
        queries = queries.subset(queries.ids[: src.max_queries])
    if len(queries) == 0:
        raise InputError("no query has a positive document; nothing to mine", src.pairs_file or src.beir_dir)
    kept = set(queries.ids)
    return MiningData(queries, {q: list(positives[q]) for q in queries.ids}, corpus, skipped,
                      {q: d for q, d in excluded.items() if q in kept and d},
                      merged_rows + sum(1 for q in merged_ids if q in kept))


def _merge_judgements(
    queries: Queries, qrels: dict[str, dict[str, int]], pos: dict[str, list[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]], set[str]]:
    """(positives, excluded, merged qids) for the queries in ``pos``.

    Queries of the split with the same normalized text keep their own ids but share the union of their positives
    (so no positive of one is mined as a negative of the other); every document judged relevant (grade > 0) to any
    of them that is not a positive is excluded from the negatives (a ``min_relevance`` > 1 must not turn relevant
    documents into negatives).
    """
    groups = same_text_queries(queries, [q for q in queries.ids if q in qrels])
    judged = judged_relevant(qrels)
    positives, excluded = {}, {}
    for qid in pos:
        group = groups.get(qid, [qid])
        positives[qid] = union_over([qid, *group], pos)
        taken = set(positives[qid])
        excluded[qid] = [d for d in union_over([qid, *group], judged) if d not in taken]
    return positives, excluded, {q for q in pos if q in groups}


def make_teacher(cfg: TeacherConfig, cache_dir: str | Path, seed: int | None = None):
    """A ``DenseTeacher``, ``BM25Teacher`` or ``RandomTeacher`` (which needs the mining ``seed``) for one config."""
    if cfg.kind == "random":
        from nvr.teachers.random import RandomTeacher

        if seed is None:
            raise ValueError(f"teacher {cfg.name!r} is random: make_teacher needs the mining seed")
        return RandomTeacher(cfg, seed)
    if cfg.kind == "bm25":
        from nvr.teachers.bm25 import BM25Teacher

        return BM25Teacher(cfg)
    from nvr.teachers.dense import DenseTeacher

    return DenseTeacher(cfg, cache_dir)


def build_tables(
    cfg: MineConfig, teachers: Sequence[Any], data: MiningData, depth: int, rows: np.ndarray | None = None,
    cache: bool = True, positive_slots: int | None = None, text_keys: TextKeys | None = None,
) -> list[CandidateTable]:
    """One candidate table per teacher (cached by ``build`` unless ``cache`` is False: streaming keeps its chunks
    in its own chunked cache), rescored by the cross-encoder when configured. ``positive_slots``, ``text_keys``:
    see ``build_candidate_table``."""
    ids, texts = data.queries.ids, data.queries.texts
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)  # first, so model fingerprints are memoized on a cold run
    tables = [
        build_candidate_table(
            teacher, ids, texts, data.positives, data.corpus, depth, cfg.search_memory_mb,
            cfg.cache_dir if cache else None, rows, excluded=data.excluded, positive_slots=positive_slots,
            text_keys=text_keys,
        )
        for teacher in teachers
    ]
    if cfg.cross_encoder is not None:
        from nvr.teachers.cross_encoder import CrossEncoderRescorer

        rescorer = CrossEncoderRescorer(cfg.cross_encoder, cache_dir=cfg.cache_dir)  # scores cached there
        tables = [rescorer.rescore(t, [data.queries.text(q) for q in t.query_ids], data.corpus) for t in tables]
    return tables


def filter_tables(cfg: MineConfig, tables: Sequence[CandidateTable], data: MiningData) -> list[FilterResult]:
    """``apply_filter`` per table, with each excluded candidate's cause (positive, query text, judged) recorded.

    Each teacher's table gets its own ``teachers[i].filter`` when set (else ``filter``), with a ``calibrate``
    parameter chosen on that teacher's scores over all queries (``calibrate.resolve_filters``; re-built deep
    tables reuse the choice)."""
    from nvr.mining.calibrate import resolve_filters

    return apply_filters(tables, resolve_filters(cfg, tables, data.queries.ids), data)


def apply_filters(
    tables: Sequence[CandidateTable], resolved: Sequence[tuple[Any, dict[str, Any]]], data: MiningData
) -> list[FilterResult]:
    """``apply_filter`` per table with already resolved (calibrated) filters and their calibration records."""
    return [
        apply_filter(t, fcfg, exclusion_reasons(t, [data.queries.text(q) for q in t.query_ids], data.corpus,
                                                data.excluded), calibration=record)
        for t, (fcfg, record) in zip(tables, resolved)
    ]


def excluded_candidate_counts(tables: Sequence[CandidateTable], results: Sequence[FilterResult]) -> dict[str, int]:
    """Distinct (query, doc) candidates of any teacher kept out of the negatives for equalling the query's text or
    for being judged relevant below ``min_relevance``."""
    found: dict[Reason, set[tuple[str, int]]] = {Reason.QUERY_TEXT: set(), Reason.JUDGED_RELEVANT: set()}
    for t, r in zip(tables, results):
        for code, pairs in found.items():
            rows, cols = np.nonzero(r.reason == code)
            pairs.update((t.query_ids[i], int(t.cand_idx[i, j])) for i, j in zip(rows, cols))
    return {"excluded_query_text_candidates": len(found[Reason.QUERY_TEXT]),
            "excluded_judged_candidates": len(found[Reason.JUDGED_RELEVANT])}


def check_feasible(cfg: MineConfig, data: MiningData) -> None:
    """Fail before encoding when no query can have ``num_negatives`` negatives (K > corpus - its positives).

    K above what some queries can get is not an error: the shortfall policy handles those and counts them.
    """
    fewest_positives = min(len(p) for p in data.positives.values())
    available = len(data.corpus) - fewest_positives
    if cfg.num_negatives > available:
        raise ConfigError("num_negatives", f"{cfg.num_negatives} exceeds the non-positive documents of every query "
                                           f"(corpus {len(data.corpus)} docs, at most {available} per query)")


def check_selection_config(cfg: MineConfig) -> None:
    """Fail before any encoding on combinations that cannot work."""
    filters = effective_filters(cfg, [t.name for t in cfg.teachers])
    for teacher, (filt, key) in zip(cfg.teachers, filters, strict=True):
        if teacher.kind == "random" and cfg.cross_encoder is None and filt.method in POSITIVE_AWARE_FILTERS:
            raise ConfigError(f"{key}.method", f"random teacher '{teacher.name}' gives positives no score, so "
                                               f"{filt.method} would keep nothing; use naive_topk (or add a "
                                               "cross_encoder to score the random candidates)")
    if cfg.ensemble.startswith("intra_sample") and cfg.sampler.method != "topk":
        raise ConfigError("sampler.method", f"{cfg.ensemble} merges survivors in rank order; use sampler.method topk")
    if cfg.sampler.method != "topk" and cfg.sampler.window < cfg.num_negatives:
        raise ConfigError("sampler.window", f"must be >= num_negatives ({cfg.num_negatives}), got {cfg.sampler.window}")


def select_negatives(
    cfg: MineConfig, tables: Sequence[CandidateTable], results: Sequence[FilterResult]
) -> tuple[Selection, list[Selection]]:
    """The final selection and each teacher's own selection (rows in the first table's order)."""
    k = cfg.num_negatives
    positions = [
        select(r.keep, t.cand_scores, cfg.sampler, k, cfg.seed, t.query_ids) for t, r in zip(tables, results)
    ]
    per_teacher = per_teacher_selections(tables, positions, [starved(r.keep, cfg.sampler, k) for r in results])
    if cfg.ensemble == "none":
        return per_teacher[0], per_teacher
    if cfg.ensemble == "cross_sample":
        return cross_sample(per_teacher, cfg.seed), per_teacher
    dedup = cfg.ensemble == "intra_sample_dedup"
    return intra_sample(tables, results, k, dedup=dedup), per_teacher


def covers_corpus(tables: Sequence[CandidateTable], corpus_size: int) -> bool:
    """True when every table already lists every document: re-searching deeper cannot find more candidates."""
    return all(t.depth >= corpus_size for t in tables)


@dataclass
class MiningResult:
    """Everything the writers need; ``deep_*`` hold the re-built tables of widened queries (or are empty)."""

    data: MiningData
    tables: list[CandidateTable]
    results: list[FilterResult]
    selection: Selection
    per_teacher: list[Selection]
    deep_tables: list[CandidateTable]
    deep_results: list[FilterResult]
    kept_rows: np.ndarray
    teacher_fingerprints: list[dict[str, str]]
    counts: dict[str, int]
    relabelled: Any = None
    """``nvr.mining.relabel.RelabelResult`` when ``cfg.relabel`` is set (extra positives per query id)."""


def run_mining(cfg: MineConfig, teachers: Sequence[Any] | None = None) -> MiningResult:
    """All computation of ``mine`` without writing the output folder. ``teachers``: ready teacher objects, one
    per ``cfg.teachers`` entry (e.g. the model being trained, for re-mining); default: built from the configs."""
    check_selection_config(cfg)
    if cfg.stream_chunk_queries is not None:  # e.g. re-mining during training: only ``mine`` streams
        log.warning("stream_chunk_queries is set, but this caller mines in memory (only nvr mine / mine() stream)")
    data = load_data(cfg.data)
    check_feasible(cfg, data)
    if teachers is None:
        teachers = [make_teacher(t, cfg.cache_dir, cfg.seed) for t in cfg.teachers]
    tables = build_tables(cfg, teachers, data, cfg.depth)
    results = filter_tables(cfg, tables, data)
    selection, per_teacher = select_negatives(cfg, tables, results)
    deep_tables: list[CandidateTable] = []
    deep_results: list[FilterResult] = []
    short_rows = np.flatnonzero(selection.starved)  # fewer than K survivors, or a sampling window not full
    was_short = selection.short.copy()
    if short_rows.size and cfg.max_depth > cfg.depth and not covers_corpus(tables, len(data.corpus)):
        log.info("%d queries have < %d survivors: re-building them at depth %d", short_rows.size,
                 needed_survivors(cfg.sampler, cfg.num_negatives), cfg.max_depth)
        deep_tables = build_tables(cfg, teachers, data, cfg.max_depth, short_rows)
        deep_results = filter_tables(cfg, deep_tables, data)
        deep_sel, deep_per = select_negatives(cfg, deep_tables, deep_results)
        selection = selection.replace_rows(short_rows, deep_sel)
        per_teacher = [p.replace_rows(short_rows, d) for p, d in zip(per_teacher, deep_per)]
    elif selection.short.any() and cfg.max_depth > cfg.depth:
        log.info("%d queries have < %d negatives; not re-searched: depth %d already covers the whole corpus (%d "
                 "docs)", int(selection.short.sum()), cfg.num_negatives, cfg.depth, len(data.corpus))
    still_short = selection.short
    kept = kept_rows(cfg, selection)
    if kept.size == 0:
        raise_all_dropped(cfg, still_short.size)
    relabelled = None
    if cfg.relabel is not None:
        from nvr.mining.relabel import relabel_mined

        relabelled = relabel_mined(cfg, data, [(tables, results), (deep_tables, deep_results)], selection, kept)
    counts = {
        **selection_counts(selection, was_short, kept),
        **data_counts(data),
        **excluded_candidate_counts([*tables, *deep_tables], [*results, *deep_results]),
        **(relabelled.counts if relabelled is not None else {}),
    }
    fingerprints = teacher_records(teachers, cfg.teachers)
    return MiningResult(data, tables, results, selection, per_teacher, deep_tables, deep_results, kept,
                        fingerprints, counts, relabelled)


def kept_rows(cfg: MineConfig, selection: Selection) -> np.ndarray:
    """Rows written: all (``keep_short``) or those with ``num_negatives`` negatives (``drop``)."""
    return np.flatnonzero(~selection.short) if cfg.shortfall == "drop" else np.arange(len(selection.query_ids))


def raise_all_dropped(cfg: MineConfig, num_queries: int) -> None:
    raise ConfigError("shortfall", f"'drop' dropped all {num_queries} queries: none has num_negatives="
                                   f"{cfg.num_negatives} survivors; lower num_negatives or use keep_short")


def selection_counts(selection: Selection, was_short: np.ndarray, kept: np.ndarray) -> dict[str, int]:
    """The manifest counts of a (final) selection; each one sums over disjoint query chunks."""
    still_short = selection.short
    return {
        **selection.shortfall_counts(),
        "recovered_by_widening": int((was_short & ~still_short).sum()),
        "dropped_short": int(len(selection.query_ids) - kept.size),
        "kept_short": int(still_short[kept].sum()),
        "kept_without_negatives": int((selection.n_selected[kept] == 0).sum()),
        "written": int(kept.size),
    }


def data_counts(data: MiningData) -> dict[str, int]:
    return {
        "skipped_without_positives": data.skipped_queries,
        "merged_duplicate_text_queries": data.merged_queries,
        "judged_relevant_excluded": sum(len(v) for v in data.excluded.values()),
    }


def _round(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def mined_rows(res: MiningResult) -> list[dict[str, Any]]:
    """The ``mined.jsonl`` objects of the kept queries (deterministic key order).

    A positive's ``score`` is the first teacher's; with several teachers each positive also carries
    ``teacher_scores`` (teacher name -> score), so an exporter can put a row's positives on the scale of the teacher
    that gave its negatives.
    """
    corpus, sel, first = res.data.corpus, res.selection, res.tables[0]
    row_of = [{q: i for i, q in enumerate(t.query_ids)} for t in res.tables]
    names = [t.teacher for t in res.tables]
    out = []
    for r in res.kept_rows:
        qid = sel.query_ids[r]
        fr = row_of[0][qid]
        positives = [
            {"id": corpus.ids[d], "text": corpus.passage(d), "score": _round(s)}
            for d, s in zip(first.pos_idx[fr].tolist(), first.pos_scores[fr].tolist()) if d >= 0
        ]
        if len(res.tables) > 1:
            for j, p in enumerate(positives):
                p["teacher_scores"] = {
                    t.teacher: _round(float(t.pos_scores[rows[qid], j])) for t, rows in zip(res.tables, row_of)
                }
        negatives = [
            {"id": corpus.ids[d], "text": corpus.passage(d), "score": _round(s), "teacher": names[t], "rank": k}
            for d, s, t, k in zip(sel.neg_idx[r].tolist(), sel.neg_scores[r].tolist(), sel.neg_teacher[r].tolist(),
                                  sel.neg_rank[r].tolist()) if d >= 0
        ]
        row = {"query_id": qid, "query": res.data.queries.text(qid), "positives": positives, "negatives": negatives}
        if res.relabelled is not None:  # contract C2: present (maybe empty) on every row of a relabelled set
            from nvr.mining.relabel import extra_positive_rows

            row["extra_positives"] = extra_positive_rows(res.relabelled.extra.get(qid, []), corpus)
        out.append(row)
    return out


def package_versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def manifest(cfg: MineConfig, res: MiningResult, mined: dict[str, Any]) -> dict[str, Any]:
    """The manifest: config, the inputs it was mined from (file hashes, teacher and cross-encoder fingerprints, the
    same ones the mined-set address covers), counts and the checksum of ``mined.jsonl`` (``{"sha256", "bytes",
    "rows"}``; ``nvr fit`` verifies it before training)."""
    return manifest_from(cfg, res.teacher_fingerprints, res.data, res.counts, filter_settings(res.tables, res.results),
                         mined)


def manifest_from(
    cfg: MineConfig, teacher_fingerprints: list[dict[str, str]], data: MiningData, counts: dict[str, int],
    filters: dict[str, Any], mined: dict[str, Any],
) -> dict[str, Any]:
    """``manifest`` from its parts (the streaming path has no whole ``MiningResult``)."""
    inputs = mining_inputs(cfg, teacher_fingerprints)
    cross_encoder = None
    if cfg.cross_encoder is not None:
        cross_encoder = {"model_name_or_path": cfg.cross_encoder.model_name_or_path,
                         "fingerprint": inputs["cross_encoder"]}
    return {
        "format": MANIFEST_FORMAT,
        "fingerprint": mining_fingerprint(cfg, inputs),
        "config": content_config(cfg),
        "seed": cfg.seed,
        "versions": package_versions(),
        "teachers": teacher_fingerprints,
        "cross_encoder": cross_encoder,
        **({"relabel": {"model_name_or_path": cfg.relabel.model_name_or_path, "fingerprint": inputs["relabel"]}}
           if cfg.relabel is not None else {}),
        "input_files": inputs["files"],
        "data": data.fingerprints(),
        "counts": counts,
        "filters": filters,
        "files": {MINED_FILE: mined},
    }


def mined_lines(res: MiningResult) -> Iterator[bytes]:
    """The ``mined.jsonl`` lines (UTF-8) of ``mined_rows``."""
    for row in mined_rows(res):
        yield (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def write_mined(path: Path, lines: Iterable[bytes]) -> dict[str, Any]:
    """Write ``mined.jsonl`` atomically from a stream of lines; returns its ``{"sha256", "bytes", "rows"}``."""
    digest = hashlib.sha256()
    size = rows = 0
    with atomic_file(path, "wb") as fh:
        for line in lines:
            digest.update(line)
            size, rows = size + len(line), rows + 1
            fh.write(line)
    return {"sha256": digest.hexdigest(), "bytes": size, "rows": rows}


def report_extra(cfg: MineConfig, counts: dict[str, int], negatives_written: int, started: float) -> dict[str, Any]:
    """The pipeline part of ``report.json`` (written rows, shortfall counts, locations and wall time)."""
    return {
        "num_queries": counts["written"],
        "num_negatives_total": int(negatives_written),
        "short_rows": counts["kept_short"],
        "rows_without_negatives": counts["kept_without_negatives"],
        "dropped_queries": counts["dropped_short"],
        "shortfall": counts,
        "run": {"output_dir": str(cfg.output_dir), "cache_dir": str(cfg.cache_dir),
                "wall_s": round(time.monotonic() - started, 3)},
    }


def write_outputs(folder: Path, cfg: MineConfig, res: MiningResult, started: float) -> None:
    mined = write_mined(folder / MINED_FILE, mined_lines(res))
    write_json_atomic(folder / MANIFEST_FILE, manifest(cfg, res, mined), ensure_ascii=False)
    widened = res.selection.widened
    groups = [(res.tables, res.results, res.selection.subset(np.flatnonzero(~widened)))]
    if res.deep_tables:
        groups.append((res.deep_tables, res.deep_results, res.selection.subset(np.flatnonzero(widened))))
    if cfg.audit:
        written = {res.selection.query_ids[r] for r in res.kept_rows}
        write_audit(folder / "audit.parquet", groups, written)
    plot_report(folder / "report.png", res.selection, res.tables, res.results)
    extra = report_extra(cfg, res.counts, negatives_written(res.selection, res.kept_rows), started)
    report = build_report(res.tables, res.results, res.selection, res.per_teacher, extra=extra)
    write_json_atomic(folder / "report.json", report)


def negatives_written(selection: Selection, kept: np.ndarray) -> int:
    return int((selection.neg_idx[np.asarray(kept, dtype=np.int64)] >= 0).sum())


def mine(cfg: MineConfig) -> Path:
    """Run a mining job and return the output folder (see the module doc).

    Before any data or model is loaded: the output and cache locations must be writable (and the output absent
    unless ``overwrite``), local teacher folders complete, max lengths within the models' position limits
    (clamped with a warning; the manifest records the clamped values). Rank 0 holds an exclusive lock on the output
    folder from then until the final rename, so a concurrent run on the same folder fails at once with
    ``LockedError`` instead of one result silently replacing the other.
    """
    import contextlib

    from nvr.mining.preflight import preflight_mine, teacher_key_scope
    from nvr.utils.locking import exclusive_lock
    from nvr.utils.preflight import check_output_dir

    started = time.monotonic()
    out = Path(cfg.output_dir)
    run_cfg = preflight_mine(cfg)  # before any encoding, not after
    writer = dist_rank_world()[0] == 0
    with exclusive_lock(out, what="output folder") if writer else contextlib.nullcontext():
        if writer:
            check_output_dir(out, "output_dir", cfg.overwrite)  # again under the lock: a run may have just finished
        if run_cfg.stream_chunk_queries is not None:
            from nvr.mining.streaming import mine_streaming

            with teacher_key_scope(run_cfg):
                written = mine_streaming(run_cfg, out, started)
            if writer:  # other torchrun ranks only helped encode and search
                log.info("mined %d queries -> %s", written, out)
            return out
        with teacher_key_scope(run_cfg):
            res = run_mining(run_cfg)
        if not writer:
            return out  # under torchrun every rank helps encode; only rank 0 writes the (identical) result
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            write_outputs(tmp, run_cfg, res, started)
    log.info("mined %d queries -> %s", res.counts["written"], out)
    return out
