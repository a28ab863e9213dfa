"""Reading a mined folder back: one validated ``MinedExample`` per line of ``mined.jsonl``.

Row format (written by ``pipeline.mine``, keys in this order)::

    {"query_id": str, "query": str,
     "positives": [{"id": str, "text": str, "score": float | null}],
     "negatives": [{"id": str, "text": str, "score": float, "teacher": str, "rank": int}],
     "extra_positives": [{"id": str, "text": str, "score": float | null, "judge_score": float}]}

``rank`` is the 0-based position of the negative in its teacher's candidate list. ``extra_positives`` (optional;
written when mining ran with ``relabel``) are candidates the filter rejected as too close to the positive that a
cross-encoder judged relevant (``nvr.mining.relabel``): ``score`` is the first teacher's (null when it did not list
the document), ``judge_score`` the judge's. Rows without the key have none.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvr.data.jsonl import iter_jsonl
from nvr.utils.errors import InputError

MINED_FILE = "mined.jsonl"
MANIFEST_FILE = "manifest.json"


@dataclass
class MinedExample:
    """One query with its positives and mined negatives (negatives in selection order, with provenance)."""

    query_id: str
    query: str
    positive_ids: list[str]
    positive_texts: list[str]
    negative_ids: list[str]
    negative_texts: list[str]
    negative_scores: list[float]
    negative_teachers: list[str]
    negative_ranks: list[int]
    positive_scores: list[float | None] = field(default_factory=list)
    extra_positive_ids: list[str] = field(default_factory=list)
    extra_positive_texts: list[str] = field(default_factory=list)
    extra_positive_scores: list[float] = field(default_factory=list)
    """First-teacher scores of the extra positives (``nan`` where unknown)."""
    extra_positive_judge_scores: list[float] = field(default_factory=list)


def mined_file(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/mined.jsonl``."""
    path = Path(path)
    return path / MINED_FILE if path.is_dir() else path


def _require(row: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, path: Path, line: int) -> Any:
    if key not in row:
        raise InputError(f"{where}missing key '{key}'", path, line)
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InputError(f"{where}'{key}' must be {name}, got {type(value).__name__}", path, line)
    return value


def _parse_row(row: dict[str, Any], path: Path, line: int) -> MinedExample:
    qid = _require(row, "query_id", str, "", path, line)
    query = _require(row, "query", str, "", path, line)
    positives = _require(row, "positives", list, "", path, line)
    negatives = _require(row, "negatives", list, "", path, line)
    if not positives:
        raise InputError(f"query {qid!r} has no positives", path, line)
    pos_ids, pos_texts, pos_scores = [], [], []
    for i, p in enumerate(positives):
        where = f"positives[{i}]: "
        if not isinstance(p, dict):
            raise InputError(f"{where}must be an object", path, line)
        pos_ids.append(_require(p, "id", str, where, path, line))
        pos_texts.append(_require(p, "text", str, where, path, line))
        score = p.get("score")
        if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool)):
            raise InputError(f"{where}'score' must be a number or null", path, line)
        pos_scores.append(None if score is None else float(score))
    ex = MinedExample(qid, query, pos_ids, pos_texts, [], [], [], [], [], pos_scores)
    for i, n in enumerate(negatives):
        where = f"negatives[{i}]: "
        if not isinstance(n, dict):
            raise InputError(f"{where}must be an object", path, line)
        ex.negative_ids.append(_require(n, "id", str, where, path, line))
        ex.negative_texts.append(_require(n, "text", str, where, path, line))
        ex.negative_scores.append(float(_require(n, "score", (int, float), where, path, line)))
        ex.negative_teachers.append(_require(n, "teacher", str, where, path, line))
        ex.negative_ranks.append(_require(n, "rank", int, where, path, line))
    _parse_extra_positives(row, ex, path, line)
    return ex


def _number_or_null(value: Any, where: str, key: str, path: Path, line: int) -> float:
    if value is None:
        return float("nan")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InputError(f"{where}'{key}' must be a number or null", path, line)
    return float(value)


def _parse_extra_positives(row: dict[str, Any], ex: MinedExample, path: Path, line: int) -> None:
    """The optional ``extra_positives`` list (contract C2); one that repeats a positive or a negative, or itself, is
    an error: the loss would then treat one document as both target and negative."""
    if "extra_positives" not in row:
        return
    extras = _require(row, "extra_positives", list, "", path, line)
    taken = {d: "positive" for d in ex.positive_ids} | {d: "negative" for d in ex.negative_ids}
    for i, e in enumerate(extras):
        where = f"extra_positives[{i}]: "
        if not isinstance(e, dict):
            raise InputError(f"{where}must be an object", path, line)
        doc = _require(e, "id", str, where, path, line)
        if doc in taken:
            raise InputError(f"{where}{doc!r} is also a {taken[doc]} of query {ex.query_id!r}", path, line)
        taken[doc] = "extra positive"
        ex.extra_positive_ids.append(doc)
        ex.extra_positive_texts.append(_require(e, "text", str, where, path, line))
        ex.extra_positive_scores.append(_number_or_null(e.get("score"), where, "score", path, line))
        ex.extra_positive_judge_scores.append(_number_or_null(e.get("judge_score"), where, "judge_score", path, line))


def mined_problem(path: str | Path, require_manifest: bool = False) -> str | None:
    """None when ``mined.jsonl`` matches the sha256 and row count its ``manifest.json`` records (or there is no
    manifest to check against, e.g. a hand-made file, unless ``require_manifest``); else what differs, as one phrase.

    Catches a file truncated (at a line boundary too), edited or replaced after ``nvr mine`` wrote it.
    ``require_manifest`` (a mined set nvr wrote itself, e.g. a cache entry) also counts a missing manifest, or one
    without the file's checksum, as a problem.
    """
    file = mined_file(path)
    manifest_path = file.with_name(MANIFEST_FILE)
    if not manifest_path.is_file():
        return f"no {MANIFEST_FILE} next to it to verify it against" if require_manifest else None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"its {MANIFEST_FILE} is unreadable ({err})"
    record = (manifest.get("files") or {}).get(MINED_FILE) if isinstance(manifest, dict) else None
    if isinstance(record, str):  # older manifests: the digest alone, the row count under counts.written
        record = {"sha256": record, "rows": (manifest.get("counts") or {}).get("written")}
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return f"{manifest_path} records no checksum of it" if require_manifest else None
    if not file.is_file():
        return "file missing"
    digest, rows = hashlib.sha256(), 0
    with open(file, "rb") as fh:
        for line in fh:
            digest.update(line)
            rows += bool(line.strip())
    expected_rows = record.get("rows")
    if isinstance(expected_rows, int) and rows != expected_rows:
        return f"{rows} rows but {manifest_path} records {expected_rows}: truncated or edited after mining"
    if digest.hexdigest() != record["sha256"]:
        return f"sha256 differs from the one {manifest_path} records: modified after mining"
    return None


def verify_mined(path: str | Path) -> None:
    """Raise ``InputError`` naming ``mined.jsonl`` when it does not match its manifest (see :func:`mined_problem`).

    The message says how to go on: re-mine, or (for a file edited on purpose) remove the manifest, which then no
    longer describes the file, to train on it as a hand-made set.
    """
    problem = mined_problem(path)
    if problem is not None:
        manifest_path = mined_file(path).with_name(MANIFEST_FILE)
        raise InputError(f"{problem}; re-run nvr mine (or, if you edited it on purpose, delete {manifest_path} to "
                         "train on it as it is)", mined_file(path))


def load_mined(path: str | Path) -> list[MinedExample]:
    """All examples of a mined folder (or a ``mined.jsonl`` file); bad rows raise ``InputError`` with the line."""
    file = mined_file(path)
    if not file.is_file():
        raise InputError("mined file not found (expected a folder written by `nvr mine`)", file)
    examples = []
    seen: dict[str, int] = {}
    for line, row in iter_jsonl(file):
        ex = _parse_row(row, file, line)
        if ex.query_id in seen:
            raise InputError(f"duplicate query_id {ex.query_id!r} (first on line {seen[ex.query_id]})", file, line)
        seen[ex.query_id] = line
        examples.append(ex)
    return examples


def example_to_row(ex: MinedExample) -> dict[str, Any]:
    """The inverse of parsing: the ``mined.jsonl`` object of one example (deterministic key order;
    ``extra_positives`` only when the example has some)."""
    scores = ex.positive_scores or [None] * len(ex.positive_ids)
    row = {
        "query_id": ex.query_id,
        "query": ex.query,
        "positives": [{"id": i, "text": t, "score": s} for i, t, s in zip(ex.positive_ids, ex.positive_texts, scores)],
        "negatives": [
            {"id": i, "text": t, "score": s, "teacher": te, "rank": r}
            for i, t, s, te, r in zip(
                ex.negative_ids, ex.negative_texts, ex.negative_scores, ex.negative_teachers, ex.negative_ranks
            )
        ],
    }
    if ex.extra_positive_ids:
        n = len(ex.extra_positive_ids)
        row["extra_positives"] = [
            {"id": i, "text": t, "score": _finite_or_none(s), "judge_score": _finite_or_none(j)}
            for i, t, s, j in zip(ex.extra_positive_ids, ex.extra_positive_texts,
                                  _padded(ex.extra_positive_scores, n), _padded(ex.extra_positive_judge_scores, n))
        ]
    return row


def _padded(values: list[float], n: int) -> list[float]:
    return list(values) + [float("nan")] * (n - len(values))


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
