"""Training throughput: nvr (Lightning, BiEncoderModule + MinedDataModule) vs sentence-transformers' trainer, same
model, batch, lengths, hard negatives and loss (InfoNCE at temperature 0.05 = MNRL at scale 20), in one run.

Rows (each tool in its own subprocess; step times around each optimizer step, the first ``--warmup`` excluded):

* best CPU setting: nvr ``precision="bf16-mixed"`` vs ST ``bf16=True`` (both bf16 autocast, fp32 master weights),
  MultipleNegativesRankingLoss. Printed, no target.
* equal settings: both fp32, MNRL. Target: nvr >= 1.3x ST samples/s.
* long_plain / long: equal settings (fp32 both, MNRL) at ``--long_passage_len`` (512, NV-Retriever's passage
  length), where lengths vary: nvr with one forward per field (printed, no target) / with
  ``length_bucket_size=--bucket`` (length-sorted forwards padded to their own longest, the
  same loss) vs ST (which pads each column to its longest). Target: >= 1.3x.
* cached: batch ``--cached_batch`` (128) in mini-batches of ``--mini_batch`` (16): nvr ``mini_batch_size`` (cached
  InfoNCE) vs ST ``CachedMultipleNegativesRankingLoss(mini_batch_size=16)``, in ``--cached_precision``
  (bf16: each tool's best CPU setting). Target: >= 1.0x; peak RSS of both printed. Needs SciFact (809 train queries)
  for enough distinct queries; skipped with a message when ``../shared/data/scifact`` is absent.

Samples/s counts queries per second. A missed target is printed as MISSED.

    python benchmarks/train_vs_st.py [--steps 4] [--batch 16] [--negatives 2] [--rows best,equal,cached] [--tiny]
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from pathlib import Path

from _common import (
    default_beir_dir,
    emit,
    machine_info,
    print_machine,
    run_role,
    shared_beir_dir,
    verdict,
)

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERY_LEN = 32
PASSAGE_LEN = 128
PRECISIONS = {"bf16": ("bf16-mixed", True), "fp32": ("32-true", False)}
"""name -> (Lightning ``precision``, ST ``bf16``)."""


def model_dir(tiny: bool, work: Path) -> str:
    """The real MiniLM when its wheel is installed (and not --tiny), else a tiny BERT built from a config."""
    from nvr.utils.models import packaged_model_dir

    real = None if tiny else packaged_model_dir(MODEL)
    if real is not None:
        return str(real)
    from nvr.testing import make_tiny_bert

    return str(make_tiny_bert(work / "tiny_bert", hidden=64))


def write_examples(beir_dir: Path, out: Path, n: int, negatives: int, seed: int = 0) -> Path:
    """A mined set of ``n`` queries (random negatives: only the shapes matter for throughput).

    Every text appears once in the whole set (distinct queries, positives and negatives), so neither tool's
    no-duplicates batching skips an example and both step through full batches of the same examples.
    """
    import numpy as np

    from nvr.data.beir import load_beir
    from nvr.data.text import text_key
    from nvr.mining.mined_set import MINED_FILE, MinedExample, example_to_row

    ds = load_beir(beir_dir, "train")
    seen: set[str] = set()
    chosen: list[tuple[str, str]] = []
    for qid in ds.queries.ids:
        pos = next(iter(sorted(ds.qrels.get(qid, {}))), None)
        keys = (text_key(ds.queries.text(qid)), text_key(ds.corpus.passage(ds.corpus.index[pos])) if pos else "")
        if pos is None or pos not in ds.corpus.index or keys[0] in seen or keys[1] in seen:
            continue
        seen.update(keys)
        chosen.append((qid, pos))
        if len(chosen) == n:
            break
    if len(chosen) < n:
        raise SystemExit(f"{beir_dir}: only {len(chosen)} train queries with distinct texts, need {n}")
    pool = [i for i in np.random.default_rng(seed).permutation(len(ds.corpus))
            if text_key(ds.corpus.passage(int(i))) not in seen]
    if len(pool) < n * negatives:
        raise SystemExit(f"{beir_dir}: {len(pool)} distinct non-positive docs, need {n * negatives}")
    rows = []
    for k, (qid, pos) in enumerate(chosen):
        neg = [int(i) for i in pool[k * negatives:(k + 1) * negatives]]
        rows.append(MinedExample(
            qid, ds.queries.text(qid), [pos], [ds.corpus.passage(ds.corpus.index[pos])],
            [ds.corpus.ids[i] for i in neg], [ds.corpus.passage(i) for i in neg], [0.0] * negatives,
            ["random"] * negatives, list(range(negatives)),
        ))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / MINED_FILE, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(example_to_row(r)) + "\n" for r in rows)
    return out


def nvr_supports_mini_batch() -> bool:
    """Does this nvr's BiEncoderModule have the cached InfoNCE (``mini_batch_size``)?"""
    from nvr.training.module import BiEncoderModule

    return "mini_batch_size" in inspect.signature(BiEncoderModule.__init__).parameters


def run_nvr(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch

    from nvr.modeling.config import EmbedderConfig
    from nvr.training.datamodule import MinedDataModule
    from nvr.training.module import BiEncoderModule

    torch.set_num_threads(args.threads)
    timer = _lightning_timer_class()()
    cached = {"mini_batch_size": args.mini_batch} if args.mini_batch else {}
    if args.bucket:
        cached["length_bucket_size"] = args.bucket
    module = BiEncoderModule(EmbedderConfig(model_name_or_path=args.model, pooling="mean"), temperature=0.05,
                             lr=2e-5, warmup_steps=0, seed=0, **cached)
    data = MinedDataModule(mined_dir=args.mined, tokenizer=args.model, query_max_length=QUERY_LEN,
                           passage_max_length=args.passage_len, num_negatives=args.negatives, batch_size=args.batch)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[timer], precision=PRECISIONS[args.precision][0])
    trainer.fit(module, datamodule=data)
    emit(timer.result(args))


def run_st(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from nvr.mining.mined_set import load_mined

    torch.set_num_threads(args.threads)
    examples = load_mined(args.mined)
    columns = {"anchor": [e.query for e in examples], "positive": [e.positive_texts[0] for e in examples]}
    for j in range(args.negatives):
        columns[f"negative_{j + 1}"] = [e.negative_texts[j] for e in examples]
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.passage_len  # one limit for both sides in ST; the queries are < 32 tokens anyway
    timer = StepTimer()

    class HFTimer(TrainerCallback):
        def on_step_begin(self, *a, **k) -> None:
            timer.begin()

        def on_step_end(self, *a, **k) -> None:
            timer.end()

    if args.mini_batch:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.mini_batch)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    with tempfile.TemporaryDirectory() as out:
        targs = SentenceTransformerTrainingArguments(
            output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
            learning_rate=2e-5, warmup_steps=0, save_strategy="no", report_to=[], logging_steps=10_000,
            dataloader_drop_last=True, batch_sampler=BatchSamplers.NO_DUPLICATES, use_cpu=True, seed=0,
            bf16=PRECISIONS[args.precision][1],
        )
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=Dataset.from_dict(columns),
                                             loss=loss, callbacks=[HFTimer()])
        trainer.train()
    emit(timer.result(args))


class StepTimer:
    """Wall time of each optimizer step (Lightning callback interface + begin/end for the HF trainer)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self) -> None:
        self.times.append(time.perf_counter() - self._t0)

    def result(self, args: argparse.Namespace) -> dict:
        timed = self.times[args.warmup:]
        if not timed:
            raise SystemExit("no timed steps (increase --steps)")
        seconds = sum(timed) / len(timed)
        return {"steps": len(timed), "s_per_step": round(seconds, 4), "samples_per_s": round(args.batch / seconds, 3)}


def _lightning_timer_class():
    """StepTimer as a Lightning Callback (built lazily so the ST role never imports Lightning)."""
    from lightning.pytorch.callbacks import Callback

    class LightningStepTimer(StepTimer, Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.end()

    return LightningStepTimer


ROWS = {
    # name: (label, precision, cached, target nvr/ST or None)
    "best": ("best CPU setting (nvr bf16-mixed, ST bf16=True), MNRL", "bf16", False, None),
    "equal": ("equal settings (fp32 both), MNRL", "fp32", False, 1.3),
    "long_plain": ("equal settings, long passages, nvr one forward a field", "fp32", False, None),
    "long": ("equal settings, long passages, nvr length buckets", "fp32", False, 1.3),
    "cached": ("cached InfoNCE vs CachedMNRL", None, True, 1.0),
}


_ST_RUNS: dict[tuple[str, ...], dict] = {}


def run_row(args: argparse.Namespace, work: Path, model: str, name: str) -> dict | None:
    """One (nvr, ST) pair in fresh subprocesses; None (with a message) when the row cannot run here."""
    label, precision, cached, _ = ROWS[name]
    batch, steps, beir = args.batch, args.steps, default_beir_dir()
    extra = ["--mini_batch", "0", "--passage_len", str(PASSAGE_LEN)]  # the roles' uncached loss
    long = name.startswith("long")
    if long:
        from nvr.utils.models import position_limit

        limit = position_limit(model)
        if limit is not None and limit[0] < args.long_passage_len:
            print(f"  {name}: skipped: {model} has {limit[0]} positions, < --long_passage_len {args.long_passage_len}")
            return None
        extra = ["--mini_batch", "0", "--passage_len", str(args.long_passage_len)]
    if cached:
        if not nvr_supports_mini_batch():
            print(f"  {name}: skipped: this nvr's BiEncoderModule has no mini_batch_size (cached InfoNCE)")
            return None
        beir = shared_beir_dir("scifact")
        if beir is None:
            print(f"  {name}: skipped: needs ../shared/data/scifact for {args.cached_batch} distinct queries a batch")
            return None
        batch, steps, precision = args.cached_batch, args.cached_steps, args.cached_precision
        extra = ["--mini_batch", str(args.mini_batch), "--passage_len", str(PASSAGE_LEN)]
    n = batch * (args.warmup + steps + 1)
    mined = work / f"mined_{beir.name}_{n}x{args.negatives}"  # rows of equal shape share one set (and ST run)
    if not mined.exists():
        write_examples(beir, mined, n=n, negatives=args.negatives)
    common = ["--steps", str(steps), "--warmup", str(args.warmup), "--batch", str(batch), "--negatives",
              str(args.negatives), "--threads", str(args.threads), "--model", model, "--mined", str(mined),
              "--precision", precision, *extra]
    script = Path(__file__).resolve()
    nvr = run_role(script, "nvr", *common, "--bucket", str(args.bucket if name == "long" else 0))
    print(f"  {name} nvr: {json.dumps(nvr)}", flush=True)
    key = tuple(common)
    if key not in _ST_RUNS:  # long_plain and long differ only on nvr's side: ST is measured once for both
        _ST_RUNS[key] = run_role(script, "st", *common)
    st = _ST_RUNS[key]
    print(f"  {name} st: {json.dumps(st)}", flush=True)
    return {"label": label, "precision": precision, "batch": batch, "mini_batch": args.mini_batch if cached else None,
            "passage_len": args.long_passage_len if long else PASSAGE_LEN,
            "length_bucket_size": args.bucket if name == "long" else None,
            "data": str(beir), "nvr": nvr, "sentence_transformers": st,
            "ratio": round(nvr["samples_per_s"] / st["samples_per_s"], 3)}


def print_summary(results: dict) -> None:
    print(f"\ntrain: query {QUERY_LEN} / passage {PASSAGE_LEN} tokens, scale 20 (temperature 0.05); samples/s = "
          "queries/s over the timed steps")
    print(f"{'row':56}{'batch':>6}{'ST/s':>8}{'nvr/s':>8}{'nvr/ST':>8}  target       RSS MB ST / nvr")
    for name, row in results.items():
        if row is None:
            print(f"{ROWS[name][0]:56}  not run (see above)")
            continue
        target = ROWS[name][3]
        label = row["label"] + (f" ({row['precision']}, mini-batch {row['mini_batch']})" if row["mini_batch"] else "")
        if row["passage_len"] != PASSAGE_LEN:
            label += f" ({row['passage_len']} tok" + (f", {row['length_bucket_size']})" if row["length_bucket_size"]
                                                       else ")")
        goal = "" if target is None else f">= {target:<4} {verdict(row['ratio'] >= target)}"
        print(f"{label:56}{row['batch']:>6}{row['sentence_transformers']['samples_per_s']:>8.2f}"
              f"{row['nvr']['samples_per_s']:>8.2f}{row['ratio']:>8.2f}  {goal:12} "
              f"{row['sentence_transformers']['peak_rss_mb']:>6.0f} / {row['nvr']['peak_rss_mb']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "nvr", "st"], default="driver")
    parser.add_argument("--rows", default="best,equal,long_plain,long,cached",
                        help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cached_batch", type=int, default=128)
    parser.add_argument("--cached_steps", type=int, default=2)
    parser.add_argument("--cached_precision", choices=list(PRECISIONS), default="bf16")
    parser.add_argument("--mini_batch", type=int, default=16, help="cached row's mini-batch (roles: 0 = uncached)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16", help="roles only")
    parser.add_argument("--long_passage_len", type=int, default=512, help="the long row's passage max length")
    parser.add_argument("--bucket", type=int, default=16, help="the long row's nvr length_bucket_size (roles: 0 = off)")
    parser.add_argument("--passage_len", type=int, default=PASSAGE_LEN, help="roles only")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random BERT even if MiniLM is installed")
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--model")
    parser.add_argument("--mined")
    args = parser.parse_args()
    if args.role != "driver":
        if args.role == "nvr":
            run_nvr(args)
        else:
            run_st(args)
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    info = machine_info()
    print_machine(info)
    work = Path(tempfile.mkdtemp(prefix="nvr_train_bench_"))
    model = model_dir(args.tiny, work)
    results = {name: run_row(args, work, model, name) for name in rows}
    print_summary(results)
    info["load_avg_end"] = machine_info()["load_avg"]
    print(f"model {model}; load average at the end {info['load_avg_end']}")
    if args.json:
        from nvr.utils.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"machine": info, "model": model, "query_len": QUERY_LEN,
                                                 "passage_len": PASSAGE_LEN, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
