"""RetrievalEvaluator under 2 processes (gloo on CPU): DDP (ddp_spawn) and FSDP2 (ModelParallelStrategy, in a
subprocess) give the same metrics as 1 process, on every rank, with odd query/doc counts (uneven shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from nvr.evaluation.callback import RetrievalEvaluator
from nvr.evaluation.data import EvalSetConfig, build_eval_dataloaders, load_eval_sets
from nvr.modeling.config import EmbedderConfig
from nvr.training.module import BiEncoderModule

SCRIPT = Path(__file__).parent / "scripts" / "eval_validate.py"
MAX_QUERIES, MAX_DOCS = 9, 59  # odd: 2 ranks get 5/5 queries and 30/30 docs, one sample repeated by the sampler
METRICS = ("ndcg@10", "recall@100", "mrr@10", "ndcg@100")

pytestmark = pytest.mark.slow


class RankDump(Callback):
    """Writes what each rank's evaluator computed and what it logged (module level so ddp_spawn can pickle it)."""

    def __init__(self, evaluator: RetrievalEvaluator, out_dir: str) -> None:
        self.evaluator = evaluator
        self.out_dir = out_dir

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {"metrics": self.evaluator.last_metrics, "world_size": trainer.world_size,
                  "logged": {k: float(v) for k, v in trainer.callback_metrics.items()}}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _setup(model_dir: Path, beir_dir: Path):
    module = BiEncoderModule(EmbedderConfig(str(model_dir), pooling="mean", normalize=True))
    sets = load_eval_sets([EvalSetConfig("tiny", str(beir_dir), max_queries=MAX_QUERIES, max_docs=MAX_DOCS)])
    return module, build_eval_dataloaders(sets, module.embedder.tokenizer, batch_size=4)


def _validate(module, loaders, out_dir: Path, **trainer_kwargs) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluator = RetrievalEvaluator(k_values=(10, 100))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[evaluator, RankDump(evaluator, str(out_dir))],
                         **trainer_kwargs)
    trainer.validate(module, dataloaders=loaders, verbose=False)


def _read_ranks(out_dir: Path, world: int) -> list[dict]:
    records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(rec["world_size"] == world for rec in records)
    return records


@pytest.fixture(scope="module")
def single_process(tiny_bert_dir, tiny_beir_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    module, loaders = _setup(tiny_bert_dir, tiny_beir_dir)
    _validate(module, loaders, out, devices=1)
    return _read_ranks(out, 1)[0]


def _assert_same(records: list[dict], reference: dict) -> None:
    for rec in records:
        for metric in METRICS:
            assert rec["metrics"]["tiny"][metric] == pytest.approx(reference["metrics"]["tiny"][metric], abs=1e-6)
            assert rec["logged"][f"val/tiny/{metric}"] == records[0]["logged"][f"val/tiny/{metric}"]
        assert rec["logged"]["val/ndcg@10"] == pytest.approx(reference["logged"]["val/ndcg@10"], abs=1e-6)


def test_ddp_spawn_matches_single_process(tiny_bert_dir, tiny_beir_dir, tmp_path, single_process):
    module, loaders = _setup(tiny_bert_dir, tiny_beir_dir)
    _validate(module, loaders, tmp_path, devices=2, strategy="ddp_spawn")
    _assert_same(_read_ranks(tmp_path, 2), single_process)


def test_fsdp2_matches_single_process(tiny_bert_dir, tiny_beir_dir, tmp_path, single_process):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), str(tiny_bert_dir), str(tiny_beir_dir), str(tmp_path), "fsdp2",
           str(MAX_QUERIES), str(MAX_DOCS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _read_ranks(tmp_path, 2)
    assert all(rec["sharded"] for rec in records)  # parameters really were FSDP2 DTensors
    _assert_same(records, single_process)
