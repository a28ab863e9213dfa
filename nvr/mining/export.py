"""Exporting a mined folder to the formats other trainers read.

- sentence-transformers "n-tuple": ``{"anchor", "positive", "negative_1", ..., "negative_K"}``, one row per
  (query, positive); rows with fewer than K negatives are dropped (an n-tuple dataset needs equal columns) and
  counted. An export that would have no row at all is an error, not an empty file.
- sentence-transformers "triplet": ``{"anchor", "positive", "negative"}``, one row per (query, positive,
  negative), so a short row (``keep_short``) still contributes every negative it has; only queries without any
  negative are dropped and counted.
- FlagEmbedding: ``{"query", "pos": [...], "neg": [...], "pos_scores": [...], "neg_scores": [...], "prompt"?}``,
  one row per query. Rows without any negative are dropped and counted (FlagEmbedding divides by ``len(neg)``).
  Scores are on ONE scale per row, the teacher that gave the row's negatives: its scores of the positives
  (``teacher_scores`` in ``mined.jsonl``; ``score`` is the first teacher's) and of the negatives. They are written
  only when every row has such scores; when a row mixes teachers (``intra_sample`` ensembles) or a positive has no
  score (random teacher), no row carries scores (a distillation run then fails on a missing key instead of mixing
  scales), and the summary says so.
Outputs are written atomically and refused if present unless ``overwrite``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvr.data.jsonl import iter_jsonl
from nvr.mining.mined_set import MANIFEST_FILE, MinedExample, load_mined, mined_file
from nvr.utils.atomic import atomic_file
from nvr.utils.errors import ConfigError, InputError, OutputExistsError


def _manifest_config(mined_dir: Path) -> dict[str, Any]:
    manifest = mined_file(mined_dir).parent / MANIFEST_FILE
    if not manifest.is_file():
        return {}
    config = json.loads(manifest.read_text(encoding="utf-8")).get("config", {})
    return config if isinstance(config, dict) else {}


def _num_negatives(mined_dir: Path, examples: list[MinedExample]) -> int:
    """K from the run's manifest when present, else the largest number of negatives of any row."""
    k = _manifest_config(mined_dir).get("num_negatives")
    if isinstance(k, int) and k > 0:
        return k
    return max((len(e.negative_ids) for e in examples), default=0)


def _write_rows(out_path: str | Path, rows: list[dict], overwrite: bool) -> None:
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    with atomic_file(out) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


ST_FORMATS = ("n-tuple", "triplet")


def to_sentence_transformers(
    mined_dir: str | Path, out_path: str | Path, num_negatives: int | None = None, overwrite: bool = False,
    output_format: str = "n-tuple",
) -> dict[str, int | str]:
    """Write the n-tuple (default) or triplet JSONL; returns ``{"format", "rows", "dropped_short_rows", "k"}``
    (triplet: ``dropped_short_rows`` counts the (query, positive) pairs of queries without any negative, and at
    most ``k`` negatives per query are used)."""
    if output_format not in ST_FORMATS:
        raise ConfigError("output_format", f"must be one of {', '.join(ST_FORMATS)}, got {output_format!r}")
    examples = load_mined(mined_dir)
    k = num_negatives if num_negatives is not None else _num_negatives(Path(mined_dir), examples)
    if k <= 0:
        raise ConfigError("num_negatives", f"must be > 0 for an {output_format} export, got {k}")
    if output_format == "triplet":
        return _st_triplets(mined_dir, out_path, examples, k, overwrite)
    rows, dropped = [], 0
    for ex in examples:
        if len(ex.negative_texts) < k:
            dropped += len(ex.positive_texts)
            continue
        negatives = {f"negative_{j + 1}": t for j, t in enumerate(ex.negative_texts[:k])}
        rows += [{"anchor": ex.query, "positive": p, **negatives} for p in ex.positive_texts]
    if not rows:
        longest = max((len(e.negative_ids) for e in examples), default=0)
        raise InputError(f"no mined row has {k} negatives ({len(examples)} rows, the longest has {longest}): "
                         f"nothing to export; export with num_negatives <= {longest} or re-mine",
                         mined_file(mined_dir))
    _write_rows(out_path, rows, overwrite)
    return {"format": "n-tuple", "rows": len(rows), "dropped_short_rows": dropped, "k": k}


def _st_triplets(
    mined_dir: str | Path, out_path: str | Path, examples: list[MinedExample], k: int, overwrite: bool
) -> dict[str, int | str]:
    rows, dropped = [], 0
    for ex in examples:
        if not ex.negative_texts:
            dropped += len(ex.positive_texts)
            continue
        rows += [{"anchor": ex.query, "positive": p, "negative": n}
                 for p in ex.positive_texts for n in ex.negative_texts[:k]]
    if not rows:
        raise InputError(f"no mined row has a negative ({len(examples)} rows): nothing to export; re-mine (e.g. "
                         "with a looser filter)", mined_file(mined_dir))
    _write_rows(out_path, rows, overwrite)
    return {"format": "triplet", "rows": len(rows), "dropped_short_rows": dropped, "k": k}


def to_flagembedding(
    mined_dir: str | Path, out_path: str | Path, prompt: str | None = None, overwrite: bool = False
) -> dict[str, int | bool]:
    """Write FlagEmbedding fine-tuning JSONL (``prompt`` added when given); see the module doc for the scores.

    Returns ``{"rows", "dropped_without_negatives", "with_scores", "rows_without_comparable_scores",
    "score_teachers"}``: ``score_teachers`` names the teacher(s) whose scale the scores are on (each row uses one;
    several only for ``cross_sample``, which takes each query's negatives from one teacher); empty without scores.
    """
    examples = load_mined(mined_dir)
    raw_positives = [row.get("positives", []) for _, row in iter_jsonl(mined_file(mined_dir))]
    first = _first_teacher(Path(mined_dir), examples)
    rows: list[dict[str, Any]] = []
    scores: list[tuple[list[float], list[float]] | None] = []
    teachers: set[str] = set()
    for ex, raw in zip(examples, raw_positives):
        if not ex.negative_texts:
            continue
        rows.append({"query": ex.query, "pos": list(ex.positive_texts), "neg": list(ex.negative_texts)})
        scores.append(_row_scores(ex, raw, first))
        teachers.update(ex.negative_teachers)
    if not rows:
        raise InputError(f"no mined row has a negative ({len(examples)} rows): nothing to export",
                         mined_file(mined_dir))
    unscored = sum(s is None for s in scores)
    for row, row_scores in zip(rows, scores):
        if unscored == 0 and row_scores is not None:
            row["pos_scores"], row["neg_scores"] = row_scores
        if prompt is not None:
            row["prompt"] = prompt
    _write_rows(out_path, rows, overwrite)
    return {"rows": len(rows), "dropped_without_negatives": len(examples) - len(rows), "with_scores": unscored == 0,
            "rows_without_comparable_scores": unscored, "score_teachers": sorted(teachers) if unscored == 0 else []}


def _first_teacher(mined_dir: Path, examples: Sequence[MinedExample]) -> str | None:
    """Name of the teacher whose scores ``positives[].score`` holds: the manifest's first teacher (or, without a
    manifest, the only teacher seen)."""
    teachers = _manifest_config(mined_dir).get("teachers")
    if isinstance(teachers, list) and teachers and isinstance(teachers[0], dict):
        return teachers[0].get("name")
    seen = {t for ex in examples for t in ex.negative_teachers}
    return seen.pop() if len(seen) == 1 else None


def _row_scores(
    ex: MinedExample, raw_positives: list[Any], first: str | None
) -> tuple[list[float], list[float]] | None:
    """(positive scores, negative scores) by the one teacher that gave all of the row's negatives, or None."""
    teachers = set(ex.negative_teachers)
    if len(teachers) != 1:
        return None
    teacher = teachers.pop()
    pos: list[float] = []
    for raw, score in zip(raw_positives, ex.positive_scores):
        by_teacher = raw.get("teacher_scores") if isinstance(raw, dict) else None
        if isinstance(by_teacher, dict) and teacher in by_teacher:
            score = by_teacher[teacher]
        elif teacher != first:
            return None
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            return None
        pos.append(float(score))
    return pos, list(ex.negative_scores)
