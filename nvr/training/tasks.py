"""Non-retrieval training tasks as (query, positive, negatives) examples, as NV-Retriever / NV-Embed stage 2 does.

Both read any row format of :mod:`nvr.data.tabular` (JSON Lines, CSV, TSV, parquet, a ``datasets`` folder), one
example per row; errors name the file and line (parquet: 1-based row). In CSV/TSV every cell is text, so a
``score`` cell is parsed as a number and an empty one means no score. An optional ``id`` (string or integer) names
the example, otherwise ``line:<n>``.

* **classification** ``{"text": str, "label": str | int}``: the text is the query, its label's text is the positive
  and every other label's text is a hard negative (in label order), so the model learns to embed a text near its
  class description. The label's text is ``label_texts[label]`` when given (a name -> description map; a label
  missing from it is an error), else the label itself. At least two labels are needed. Examples of one label share
  one positive document id (``label:<label>``), so the loss masks same-label passages instead of using them as
  in-batch negatives.
* **sts** ``{"sentence1": str, "sentence2": str, "score"?: number}``: sentence 1 is the query, sentence 2 its
  positive; there are no hard negatives (in-batch negatives only). With ``min_score`` only rows scoring at least
  that are kept (each row must then have a ``score``). Equal sentence-2 texts share one document id.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nvr.data.tabular import open_rows
from nvr.data.text import text_key
from nvr.mining.mined_set import MinedExample
from nvr.utils.errors import InputError

log = logging.getLogger(__name__)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any], bool]]:
    """``(line, row, typed)``; ``typed`` is False for CSV/TSV rows (every cell a string)."""
    if not path.exists():
        raise InputError("file not found", path)
    rows = open_rows(path)
    for line, row in rows:
        if not isinstance(row, dict):
            raise InputError("row must be an object", path, line)
        yield line, row, rows.typed


def _score(row: dict[str, Any], typed: bool, path: Path, line: int) -> float | None:
    score = row.get("score")
    if not typed and isinstance(score, str):
        if not score.strip():
            return None
        try:
            score = float(score)
        except ValueError:
            raise InputError(f"'score' must be a finite number, got {score!r}", path, line) from None
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise InputError(f"'score' must be a finite number, got {score!r}", path, line)
    return float(score)


def _text(row: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"'{key}' must be a non-empty string, got {value!r}", path, line)
    return value


def _example_id(row: dict[str, Any], seen: dict[str, int], path: Path, line: int) -> str:
    raw = row.get("id")
    if raw is None:
        qid = f"line:{line}"
    elif isinstance(raw, bool) or not isinstance(raw, (str, int)) or not str(raw).strip():
        raise InputError(f"'id' must be a non-empty string or integer, got {raw!r}", path, line)
    else:
        qid = str(raw)
    if qid in seen:
        raise InputError(f"duplicate id {qid!r} (first on line {seen[qid]})", path, line)
    seen[qid] = line
    return qid


def load_classification(path: str | Path, label_texts: Mapping[str, str] | None = None) -> list[MinedExample]:
    """One example per row: text -> its label's text, the other labels' texts as negatives."""
    path = Path(path)
    rows: list[tuple[str, str, str]] = []
    seen: dict[str, int] = {}
    for line, row, _ in _rows(path):
        text = _text(row, "text", path, line)
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise InputError(f"'label' must be a non-empty string or integer, got {label!r}", path, line)
        label = str(label)
        if label_texts is not None and label not in label_texts:
            raise InputError(f"label {label!r} has no entry in label_texts (known: {sorted(label_texts)[:8]})",
                             path, line)
        rows.append((_example_id(row, seen, path, line), text, label))
    labels = sorted({label for _, _, label in rows})
    if rows and len(labels) < 2:
        raise InputError(f"classification needs at least 2 distinct labels, found {labels}", path)
    names = {label: (label_texts[label] if label_texts is not None else label) for label in labels}
    examples = []
    for qid, text, label in rows:
        others = [other for other in labels if other != label]
        examples.append(MinedExample(
            query_id=qid, query=text, positive_ids=[f"label:{label}"], positive_texts=[names[label]],
            negative_ids=[f"label:{o}" for o in others], negative_texts=[names[o] for o in others],
            negative_scores=[math.nan] * len(others), negative_teachers=["label"] * len(others),
            negative_ranks=list(range(len(others))), positive_scores=[None],
        ))
    return examples


def load_sts(path: str | Path, min_score: float | None = None) -> list[MinedExample]:
    """One example per kept row: sentence1 -> sentence2 (no hard negatives)."""
    path = Path(path)
    examples = []
    seen: dict[str, int] = {}
    skipped = 0
    for line, row, typed in _rows(path):
        first, second = _text(row, "sentence1", path, line), _text(row, "sentence2", path, line)
        score = _score(row, typed, path, line)
        qid = _example_id(row, seen, path, line)
        if min_score is not None:
            if score is None:
                raise InputError("row has no 'score' but the dataset sets min_score", path, line)
            if score < min_score:
                skipped += 1
                continue
        examples.append(MinedExample(
            query_id=qid, query=first, positive_ids=[f"sts:{text_key(second)[:16]}"], positive_texts=[second],
            negative_ids=[], negative_texts=[], negative_scores=[], negative_teachers=[], negative_ranks=[],
            positive_scores=[None],  # a similarity label, not a teacher score
        ))
    if skipped:
        log.info("%s: %d pair(s) below min_score=%s left out, %d kept", path, skipped, min_score, len(examples))
    return examples
