"""``mine(cfg)``: data -> candidate tables (one per teacher) -> filter -> sampler / ensemble -> mined folder.

Output folder (written atomically; an existing one is refused unless ``overwrite``):

- ``mined.jsonl``: one row per query (see ``mined_set`` for the format), in query-file order.
- ``manifest.json``: content config, package versions, teacher and data fingerprints, seed, counts. No paths or
  timestamps, so two runs of the same config give byte-identical ``mined.jsonl`` and ``manifest.json``.
- ``report.json`` / ``report.png``: statistics (``report.py``); wall time and paths live here.
- ``audit.parquet`` when ``cfg.audit``.

Shortfall policy: queries with fewer than ``num_negatives`` survivors are re-built at ``max_depth`` and re-selected
(step 1, skipped when ``depth`` already covers the whole corpus); those still short are then dropped or kept short
(step 2, ``cfg.shortfall``). Rows are never padded; ``keep_short`` may write rows with no negative at all
(counted as ``kept_without_negatives``), which train on in-batch negatives only.
Positive scores in ``mined.jsonl`` come from the first teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from nvr.data.beir import Corpus, Queries, load_beir, load_corpus, positives_from_qrels
from nvr.data.pairs import load_pairs
from nvr.mining.audit import write_audit
from nvr.mining.build import build_candidate_table
from nvr.mining.config import TEACHER_RUNTIME_KEYS, DataSource, MineConfig, TeacherConfig
from nvr.mining.ensembles import cross_sample, intra_sample, per_teacher_selections
from nvr.mining.filters import FilterResult, apply_filter
from nvr.mining.mined_set import MANIFEST_FILE, MINED_FILE
from nvr.mining.report import build_report, plot_report
from nvr.mining.samplers import select
from nvr.mining.selection import Selection
from nvr.mining.table import CandidateTable
from nvr.teachers.cache import dist_rank_world
from nvr.utils.atomic import atomic_dir, atomic_file
from nvr.utils.errors import ConfigError, InputError, OutputExistsError
from nvr.utils.hashing import sha256_json, sha256_texts

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "nvr-mined/1"
# Config keys that say where things go, not what is mined: left out of the manifest and the fingerprint.
# Fields that change where/how the work runs, not the mined examples (so not the fingerprint either).
_LOCATION_KEYS = ("output_dir", "overwrite", "cache_dir", "search_memory_mb", "audit")
POSITIVE_AWARE_FILTERS = ("topk_marginpos", "topk_percpos")
_VERSIONED = ("nvr", "numpy", "torch", "transformers", "faiss-cpu", "faiss-gpu", "bm25s", "pyarrow")


@dataclass
class MiningData:
    """Queries that have positives (file order), their positive doc ids, the corpus, and fingerprints."""

    queries: Queries
    positives: dict[str, list[str]]
    corpus: Corpus
    skipped_queries: int

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
    return out


def mining_fingerprint(cfg: MineConfig) -> str:
    """Stable id of a mining config (e.g. to name a cached mined folder); ignores output locations."""
    return sha256_json(content_config(cfg))[:16]


def load_data(src: DataSource) -> MiningData:
    """BEIR qrels (``beir_dir``/``split``) or a pairs file (with ``corpus_file`` or ``beir_dir``'s corpus)."""
    if src.pairs_file is not None:
        corpus_path = src.corpus_file or (str(Path(src.beir_dir) / "corpus.jsonl") if src.beir_dir else None)
        corpus = load_corpus(corpus_path) if corpus_path else None
        queries, positives, corpus = load_pairs(src.pairs_file, corpus)
        skipped = 0
    else:
        ds = load_beir(src.beir_dir, src.split)
        pos = positives_from_qrels(ds.qrels, ds.queries, src.min_relevance, corpus=ds.corpus)
        queries = ds.queries.subset(q for q in ds.queries.ids if q in pos)
        positives, corpus, skipped = dict(pos), ds.corpus, pos.skipped
    if src.max_queries is not None:
        queries = queries.subset(queries.ids[: src.max_queries])
    if len(queries) == 0:
        raise InputError("no query has a positive document; nothing to mine", src.pairs_file or src.beir_dir)
    return MiningData(queries, {q: list(positives[q]) for q in queries.ids}, corpus, skipped)


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
    cfg: MineConfig, teachers: Sequence[Any], data: MiningData, depth: int, rows: np.ndarray | None = None
) -> list[CandidateTable]:
    """One candidate table per teacher (cached by ``build``), rescored by the cross-encoder when configured."""
    ids, texts = data.queries.ids, data.queries.texts
    tables = [
        build_candidate_table(
            teacher, ids, texts, data.positives, data.corpus, depth, cfg.search_memory_mb, cfg.cache_dir, rows
        )
        for teacher in teachers
    ]
    if cfg.cross_encoder is not None:
        from nvr.teachers.cross_encoder import CrossEncoderRescorer

        rescorer = CrossEncoderRescorer(cfg.cross_encoder)
        tables = [rescorer.rescore(t, [data.queries.text(q) for q in t.query_ids], data.corpus) for t in tables]
    return tables


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
    random_teachers = [t.name for t in cfg.teachers if t.kind == "random"]
    if random_teachers and cfg.cross_encoder is None and cfg.filter.method in POSITIVE_AWARE_FILTERS:
        raise ConfigError("filter.method", f"random teacher(s) {random_teachers} give positives no score, so "
                                           f"{cfg.filter.method} would keep nothing; use naive_topk (or add a "
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
    per_teacher = per_teacher_selections(tables, positions)
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


def run_mining(cfg: MineConfig) -> MiningResult:
    """All computation of ``mine`` without writing the output folder."""
    check_selection_config(cfg)
    data = load_data(cfg.data)
    check_feasible(cfg, data)
    teachers = [make_teacher(t, cfg.cache_dir, cfg.seed) for t in cfg.teachers]
    tables = build_tables(cfg, teachers, data, cfg.depth)
    results = [apply_filter(t, cfg.filter) for t in tables]
    selection, per_teacher = select_negatives(cfg, tables, results)
    deep_tables: list[CandidateTable] = []
    deep_results: list[FilterResult] = []
    short_rows = np.flatnonzero(selection.short)
    if short_rows.size and cfg.max_depth > cfg.depth and not covers_corpus(tables, len(data.corpus)):
        log.info("%d queries have < %d negatives: re-building them at depth %d", short_rows.size,
                 cfg.num_negatives, cfg.max_depth)
        deep_tables = build_tables(cfg, teachers, data, cfg.max_depth, short_rows)
        deep_results = [apply_filter(t, cfg.filter) for t in deep_tables]
        deep_sel, deep_per = select_negatives(cfg, deep_tables, deep_results)
        selection = selection.replace_rows(short_rows, deep_sel)
        per_teacher = [p.replace_rows(short_rows, d) for p, d in zip(per_teacher, deep_per)]
    elif short_rows.size and cfg.max_depth > cfg.depth:
        log.info("%d queries have < %d negatives; not re-searched: depth %d already covers the whole corpus (%d "
                 "docs)", short_rows.size, cfg.num_negatives, cfg.depth, len(data.corpus))
    still_short = selection.short
    kept = np.flatnonzero(~still_short) if cfg.shortfall == "drop" else np.arange(len(selection.query_ids))
    if kept.size == 0:
        raise ConfigError("shortfall", f"'drop' dropped all {still_short.size} queries: none has num_negatives="
                                       f"{cfg.num_negatives} survivors; lower num_negatives or use keep_short")
    counts = {
        **selection.shortfall_counts(),
        "recovered_by_widening": int((selection.widened & ~still_short).sum()),
        "dropped_short": int(len(selection.query_ids) - kept.size),
        "kept_short": int(still_short[kept].sum()),
        "kept_without_negatives": int((selection.n_selected[kept] == 0).sum()),
        "written": int(kept.size),
        "skipped_without_positives": data.skipped_queries,
    }
    fingerprints = [
        {"name": t.name, "kind": c.kind, "fingerprint": t.settings_fingerprint} for t, c in zip(teachers, cfg.teachers)
    ]
    return MiningResult(data, tables, results, selection, per_teacher, deep_tables, deep_results, kept,
                        fingerprints, counts)


def _round(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def mined_rows(res: MiningResult) -> list[dict[str, Any]]:
    """The ``mined.jsonl`` objects of the kept queries (deterministic key order)."""
    corpus, sel, first = res.data.corpus, res.selection, res.tables[0]
    first_row = {q: i for i, q in enumerate(first.query_ids)}
    names = [t.teacher for t in res.tables]
    out = []
    for r in res.kept_rows:
        qid = sel.query_ids[r]
        fr = first_row[qid]
        positives = [
            {"id": corpus.ids[d], "text": corpus.passage(d), "score": _round(s)}
            for d, s in zip(first.pos_idx[fr].tolist(), first.pos_scores[fr].tolist()) if d >= 0
        ]
        negatives = [
            {"id": corpus.ids[d], "text": corpus.passage(d), "score": _round(s), "teacher": names[t], "rank": k}
            for d, s, t, k in zip(sel.neg_idx[r].tolist(), sel.neg_scores[r].tolist(), sel.neg_teacher[r].tolist(),
                                  sel.neg_rank[r].tolist()) if d >= 0
        ]
        out.append({"query_id": qid, "query": res.data.queries.text(qid), "positives": positives,
                    "negatives": negatives})
    return out


def package_versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def manifest(cfg: MineConfig, res: MiningResult, mined_sha256: str) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "fingerprint": mining_fingerprint(cfg),
        "config": content_config(cfg),
        "seed": cfg.seed,
        "versions": package_versions(),
        "teachers": res.teacher_fingerprints,
        "data": res.data.fingerprints(),
        "counts": res.counts,
        "files": {MINED_FILE: mined_sha256},
    }


def _write_outputs(folder: Path, cfg: MineConfig, res: MiningResult, started: float) -> None:
    digest = hashlib.sha256()
    with atomic_file(folder / MINED_FILE) as fh:
        for row in mined_rows(res):
            line = json.dumps(row, ensure_ascii=False) + "\n"
            digest.update(line.encode("utf-8"))
            fh.write(line)
    with atomic_file(folder / MANIFEST_FILE) as fh:
        json.dump(manifest(cfg, res, digest.hexdigest()), fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    widened = res.selection.widened
    groups = [(res.tables, res.results, res.selection.subset(np.flatnonzero(~widened)))]
    if res.deep_tables:
        groups.append((res.deep_tables, res.deep_results, res.selection.subset(np.flatnonzero(widened))))
    if cfg.audit:
        written = {res.selection.query_ids[r] for r in res.kept_rows}
        write_audit(folder / "audit.parquet", groups, written)
    plot_report(folder / "report.png", res.selection, res.tables, res.results)
    extra = {
        "num_queries": res.counts["written"],
        "num_negatives_total": int(sum(int((res.selection.neg_idx[r] >= 0).sum()) for r in res.kept_rows)),
        "short_rows": res.counts["kept_short"],
        "rows_without_negatives": res.counts["kept_without_negatives"],
        "dropped_queries": res.counts["dropped_short"],
        "shortfall": res.counts,
        "run": {"output_dir": str(cfg.output_dir), "cache_dir": str(cfg.cache_dir),
                "wall_s": round(time.monotonic() - started, 3)},
    }
    report = build_report(res.tables, res.results, res.selection, res.per_teacher, extra=extra)
    with atomic_file(folder / "report.json") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")


def mine(cfg: MineConfig) -> Path:
    """Run a mining job and return the output folder (see the module doc)."""
    started = time.monotonic()
    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(out)  # before any encoding, not after
    res = run_mining(cfg)
    if dist_rank_world()[0] != 0:
        return out  # under torchrun every rank helps encode; only rank 0 writes the (identical) result
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        _write_outputs(tmp, cfg, res, started)
    log.info("mined %d queries -> %s", res.counts["written"], out)
    return out
