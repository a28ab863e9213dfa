"""Training throughput: nvr (Lightning, BiEncoderModule + MinedDataModule) vs sentence-transformers' trainer with
MultipleNegativesRankingLoss, on the same model, batch, lengths and number of hard negatives, in one run.

Each side runs in its own subprocess; step times are measured around the optimizer step loop (first ``--warmup``
steps excluded). Prints samples/s (queries per second) for both and the ratio nvr / ST (target >= 1.0).

    python benchmarks/train_vs_st.py [--steps 4] [--batch 16] [--negatives 2] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import default_beir_dir, emit, run_role

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERY_LEN = 32
PASSAGE_LEN = 128


def model_dir(tiny: bool, work: Path) -> str:
    """The real MiniLM when its wheel is installed (and not --tiny), else a tiny BERT built from a config."""
    from nvr.utils.models import packaged_model_dir

    real = None if tiny else packaged_model_dir(MODEL)
    if real is not None:
        return str(real)
    from nvr.testing import make_tiny_bert

    return str(make_tiny_bert(work / "tiny_bert", hidden=64))


def write_examples(work: Path, n: int, negatives: int, seed: int = 0) -> Path:
    """A mined set over Cranfield texts (random negatives: only the shapes matter for throughput)."""
    import numpy as np

    from nvr.data.beir import load_beir
    from nvr.mining.mined_set import MINED_FILE, MinedExample, example_to_row

    ds = load_beir(default_beir_dir(), "train")
    rng = np.random.default_rng(seed)
    rows = []
    qids = [q for q in ds.queries.ids if ds.qrels.get(q)][:n]
    for qid in qids:
        pos = next(iter(ds.qrels[qid]))
        neg = [int(i) for i in rng.choice(len(ds.corpus), size=negatives, replace=False)]
        rows.append(MinedExample(
            qid, ds.queries.text(qid), [pos], [ds.corpus.passage(ds.corpus.index[pos])],
            [ds.corpus.ids[i] for i in neg], [ds.corpus.passage(i) for i in neg], [0.0] * negatives,
            ["random"] * negatives, list(range(negatives)),
        ))
    out = work / "mined"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / MINED_FILE, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(example_to_row(r)) + "\n" for r in rows)
    return out


def run_nvr(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch

    from nvr.modeling.config import EmbedderConfig
    from nvr.training.datamodule import MinedDataModule
    from nvr.training.module import BiEncoderModule

    torch.set_num_threads(args.threads)
    timer = _lightning_timer_class()()
    module = BiEncoderModule(EmbedderConfig(model_name_or_path=args.model, pooling="mean"), temperature=0.05,
                             lr=2e-5, warmup_steps=0, seed=0)
    data = MinedDataModule(mined_dir=args.mined, tokenizer=args.model, query_max_length=QUERY_LEN,
                           passage_max_length=PASSAGE_LEN, num_negatives=args.negatives, batch_size=args.batch)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[timer])
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
    model.max_seq_length = PASSAGE_LEN  # one limit for both sides in ST; Cranfield queries are < 32 tokens anyway
    timer = StepTimer()

    class HFTimer(TrainerCallback):
        def on_step_begin(self, *a, **k) -> None:
            timer.begin()

        def on_step_end(self, *a, **k) -> None:
            timer.end()

    with tempfile.TemporaryDirectory() as out:
        targs = SentenceTransformerTrainingArguments(
            output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
            learning_rate=2e-5, warmup_steps=0, save_strategy="no", report_to=[], logging_steps=10_000,
            dataloader_drop_last=True, batch_sampler=BatchSamplers.NO_DUPLICATES, use_cpu=True, seed=0,
        )
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=Dataset.from_dict(columns),
                                             loss=losses.MultipleNegativesRankingLoss(model, scale=20.0),
                                             callbacks=[HFTimer()])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "nvr", "st"], default="driver")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="use a tiny random BERT even if MiniLM is installed")
    parser.add_argument("--model")
    parser.add_argument("--mined")
    args = parser.parse_args()
    if args.role == "nvr":
        run_nvr(args)
        return
    if args.role == "st":
        run_st(args)
        return
    work = Path(tempfile.mkdtemp(prefix="nvr_train_bench_"))
    model = model_dir(args.tiny, work)
    mined = write_examples(work, n=args.batch * (args.warmup + args.steps + 2), negatives=args.negatives)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--negatives", str(args.negatives), "--threads", str(args.threads), "--model", model,
              "--mined", str(mined)]
    script = Path(__file__).resolve()
    nvr = run_role(script, "nvr", *common)
    st = run_role(script, "st", *common)
    print(json.dumps({"model": model, "batch": args.batch, "negatives": args.negatives, "query_len": QUERY_LEN,
                      "passage_len": PASSAGE_LEN, "nvr": nvr, "sentence_transformers": st,
                      "ratio_samples_per_s_nvr_over_st": round(nvr["samples_per_s"] / st["samples_per_s"], 3)},
                     indent=2))


if __name__ == "__main__":
    main()
