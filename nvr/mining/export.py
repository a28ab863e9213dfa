"""Exporting a mined folder to the formats other trainers read.

- sentence-transformers "n-tuple": ``{"anchor", "positive", "negative_1", ..., "negative_K"}``, one row per
  (query, positive); rows with fewer than K negatives are dropped (an n-tuple dataset needs equal columns) and
  counted.
- FlagEmbedding: ``{"query", "pos": [...], "neg": [...], "pos_scores": [...], "neg_scores": [...], "prompt"?}``,
  one row per query.
Outputs are written atomically and refused if present unless ``overwrite``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvr.mining.mined_set import MANIFEST_FILE, MinedExample, load_mined, mined_file
from nvr.utils.atomic import atomic_file
from nvr.utils.errors import ConfigError, OutputExistsError


def _num_negatives(mined_dir: Path, examples: list[MinedExample]) -> int:
    """K from the run's manifest when present, else the largest number of negatives of any row."""
    manifest = mined_file(mined_dir).parent / MANIFEST_FILE
    if manifest.is_file():
        k = json.loads(manifest.read_text(encoding="utf-8")).get("config", {}).get("num_negatives")
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


def to_sentence_transformers(
    mined_dir: str | Path, out_path: str | Path, num_negatives: int | None = None, overwrite: bool = False
) -> dict[str, int]:
    """Write the n-tuple JSONL; returns ``{"rows", "dropped_short_rows", "k"}``."""
    examples = load_mined(mined_dir)
    k = num_negatives if num_negatives is not None else _num_negatives(Path(mined_dir), examples)
    if k <= 0:
        raise ConfigError("num_negatives", f"must be > 0 for an n-tuple export, got {k}")
    rows, dropped = [], 0
    for ex in examples:
        if len(ex.negative_texts) < k:
            dropped += len(ex.positive_texts)
            continue
        negatives = {f"negative_{j + 1}": t for j, t in enumerate(ex.negative_texts[:k])}
        rows += [{"anchor": ex.query, "positive": p, **negatives} for p in ex.positive_texts]
    _write_rows(out_path, rows, overwrite)
    return {"rows": len(rows), "dropped_short_rows": dropped, "k": k}


def to_flagembedding(
    mined_dir: str | Path, out_path: str | Path, prompt: str | None = None, overwrite: bool = False
) -> dict[str, int]:
    """Write FlagEmbedding fine-tuning JSONL (scores included, ``prompt`` added when given); returns counts."""
    rows = []
    for ex in load_mined(mined_dir):
        row = {
            "query": ex.query,
            "pos": list(ex.positive_texts),
            "neg": list(ex.negative_texts),
            "pos_scores": [s if s is not None else 0.0 for s in ex.positive_scores] or [0.0] * len(ex.positive_texts),
            "neg_scores": list(ex.negative_scores),
        }
        if prompt is not None:
            row["prompt"] = prompt
        rows.append(row)
    _write_rows(out_path, rows, overwrite)
    return {"rows": len(rows)}
