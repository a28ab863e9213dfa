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


def fit_tiny(tmp_path: Path, beir_dir: Path, embedder: dict, data: dict | None = None,
             eval_set: dict | None = None) -> Path:
    """Two optimizer steps of ``nvr fit`` on a fake mined set of ``beir_dir`` (one validation at the end); returns
    the run's ``last.ckpt``. ``data`` adds/overrides ``data.*`` keys, ``eval_set`` keys of the one eval set."""
    import yaml

    from nvr.cli.lightning_cli import main as lightning_main

    mined = write_fake_mined(beir_dir, tmp_path / "mined", num_negatives=1)
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {"embedder": embedder, "lr": 5e-2, "warmup_steps": 0},
        "data": {"mined_dir": str(mined), "num_negatives": 1, "batch_size": 2, "query_max_length": 12,
                 "passage_max_length": 24, **(data or {}),
                 "eval_sets": [{"name": "tiny", "path": str(beir_dir), "split": "test", **(eval_set or {})}]},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    lightning_main(["fit", "--config", str(path)])
    return tmp_path / "run" / "checkpoints" / "last.ckpt"
