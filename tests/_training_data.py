"""Test helper: a mined set written from a tiny BEIR folder without running a teacher (random negatives)."""

from __future__ import annotations

import json
from pathlib import Path

from nvr.data.beir import load_beir
from nvr.mining.mined_set import MINED_FILE, MinedExample, example_to_row
from nvr.utils.seeding import rng_for


def write_fake_mined(beir_dir: Path, out_dir: Path, num_negatives: int = 2, seed: int = 0) -> Path:
    """One row per train query: its qrels positives and ``num_negatives`` random non-positive docs."""
    ds = load_beir(beir_dir, "train")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for qid in ds.queries.ids:
        rel = ds.qrels.get(qid)
        if not rel:
            continue
        pos = [d for d, grade in rel.items() if grade > 0]
        rng = rng_for(seed, "neg", qid)
        others = [i for i, d in enumerate(ds.corpus.ids) if d not in rel]
        picks = rng.choice(len(others), size=num_negatives, replace=False)
        neg = [others[int(i)] for i in picks]
        rows.append(MinedExample(
            query_id=qid, query=ds.queries.text(qid),
            positive_ids=pos, positive_texts=[ds.corpus.passage(ds.corpus.index[d]) for d in pos],
            negative_ids=[ds.corpus.ids[i] for i in neg], negative_texts=[ds.corpus.passage(i) for i in neg],
            negative_scores=[0.5 - 0.1 * j for j in range(num_negatives)], negative_teachers=["random"] * num_negatives,
            negative_ranks=list(range(num_negatives)), positive_scores=[0.6] * len(pos),
        ))
    with open(out_dir / MINED_FILE, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(example_to_row(r)) + "\n" for r in rows)
    return out_dir
