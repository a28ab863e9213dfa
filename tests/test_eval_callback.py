"""RetrievalEvaluator in one process: metrics equal a direct brute-force evaluation; data loaders; edge cases."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from nvr.evaluation.callback import IncompleteEvaluationError, RetrievalEvaluator, deduplicate, gather_rows
from nvr.evaluation.data import EvalSetConfig, build_eval_dataloaders, load_eval_set, load_eval_sets
from nvr.evaluation.metrics import evaluate_run
from nvr.evaluation.retrieval import evaluate_embeddings, mean_over_datasets
from nvr.modeling.config import EmbedderConfig
from nvr.modeling.encode import encode_texts
from nvr.modeling.tokenization import tokenize
from nvr.training.module import BiEncoderModule
from nvr.utils.errors import ConfigError


@pytest.fixture(scope="module")
def module(tiny_bert_dir) -> BiEncoderModule:
    return BiEncoderModule(EmbedderConfig(str(tiny_bert_dir), pooling="mean", normalize=True))


def _trainer(evaluator: RetrievalEvaluator, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluator], **kwargs)


def brute_force_metrics(embedder, eval_set, k_values=(10, 100)) -> dict[str, float]:
    """Reference: encode_texts + full numpy score matrix + evaluate_run (no exact_topk, no Lightning)."""
    cfg = eval_set.config
    q = encode_texts(embedder, eval_set.query_texts, prefix=cfg.query_text_prefix, max_length=cfg.query_max_length,
                     batch_size=7, mask_prefix=cfg.mask_instruction, show_progress=False)
    d = encode_texts(embedder, eval_set.doc_texts, prefix=cfg.passage_prefix, max_length=cfg.passage_max_length,
                     batch_size=7, show_progress=False)
    scores = q.astype(np.float64) @ d.astype(np.float64).T
    depth = max(k_values)
    run = {}
    for row, qid in enumerate(eval_set.query_ids):
        top = np.argsort(-scores[row], kind="stable")[:depth]
        run[qid] = {eval_set.doc_ids[j]: float(scores[row, j]) for j in top}
    return evaluate_run(run, eval_set.qrels, k_values=k_values, metrics=("ndcg", "recall", "mrr"))


def test_callback_matches_direct_evaluation(module, tiny_beir_dir):
    sets = load_eval_sets([EvalSetConfig("tiny", str(tiny_beir_dir)),
                           EvalSetConfig("instr", str(tiny_beir_dir), query_instruction="retrieve passage",
                                         max_queries=7, max_docs=31)])
    loaders = build_eval_dataloaders(sets, module.embedder.tokenizer, batch_size=4)
    evaluator = RetrievalEvaluator(k_values=(10, 100))
    results = _trainer(evaluator).validate(module, dataloaders=loaders, verbose=False)
    logged = results[0]
    for name, eval_set in sets.items():
        expected = brute_force_metrics(module.embedder, eval_set)
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            assert evaluator.last_metrics[name][metric] == pytest.approx(expected[metric], abs=1e-6)
            assert logged[f"val/{name}/{metric}"] == pytest.approx(expected[metric], abs=1e-6)
    mean = mean_over_datasets(evaluator.last_metrics)
    assert logged["val/ndcg@10"] == pytest.approx(mean["ndcg@10"], abs=1e-6)
    assert evaluator.last_metrics["tiny"] != evaluator.last_metrics["instr"]
    assert not evaluator._buffers  # cleared after the epoch


def test_incomplete_validation_is_a_clear_error(module, tiny_beir_dir):
    sets = load_eval_sets([EvalSetConfig("tiny", str(tiny_beir_dir))])
    loaders = build_eval_dataloaders(sets, module.embedder.tokenizer, batch_size=4)
    with pytest.raises(IncompleteEvaluationError, match="limit_val_batches"):
        _trainer(RetrievalEvaluator(), limit_val_batches=1).validate(module, dataloaders=loaders, verbose=False)


def test_sanity_check_is_skipped_and_clears_buffers():
    evaluator = RetrievalEvaluator()
    batch = {"dataset": "x", "kind": "queries", "index": torch.tensor([0, 1])}
    evaluator.on_validation_batch_end(None, None, {"embeddings": torch.ones(2, 3), "index": batch["index"]}, batch, 0)
    assert evaluator._buffers
    trainer = types.SimpleNamespace(sanity_checking=True)
    module = types.SimpleNamespace(log=lambda *a, **k: pytest.fail("must not log during the sanity check"))
    evaluator.on_validation_epoch_end(trainer, module)
    assert not evaluator._buffers


def test_main_metric_must_be_computed():
    with pytest.raises(ValueError, match="ndcg@10"):
        RetrievalEvaluator(k_values=(5, 100))


def test_batch_end_checks_outputs():
    evaluator = RetrievalEvaluator()
    batch = {"dataset": "x", "kind": "corpus", "index": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="must return"):
        evaluator.on_validation_batch_end(None, None, torch.ones(2, 3), batch, 0)
    with pytest.raises(ValueError, match="3 embeddings for 2"):
        evaluator.on_validation_batch_end(None, None, {"embeddings": torch.ones(3, 4)}, batch, 0)
    evaluator.on_validation_batch_end(None, None, None, {"input_ids": torch.ones(2, 2)}, 0)  # not an eval batch
    assert not evaluator._buffers


def test_deduplicate_orders_by_index_and_drops_sampler_repeats():
    emb = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    index = torch.tensor([2, 0, 4, 1, 3, 2])  # DistributedSampler repeated sample 2
    out = deduplicate(emb, index, 5, "docs")
    np.testing.assert_array_equal(out, emb.numpy()[[1, 3, 0, 4, 2]])
    with pytest.raises(IncompleteEvaluationError, match=r"5 of 6 docs .*\[5\]"):
        deduplicate(emb[:5], index[:5], 6, "docs")


def test_gather_rows_single_process_is_identity():
    x = torch.randn(5, 3)
    assert torch.equal(gather_rows(x, torch.device("cpu")), x)


def test_eval_set_loading_and_batches(tiny_bert_dir, tiny_beir_dir, module):
    cfg = EvalSetConfig("t", str(tiny_beir_dir), query_instruction="retrieve passage", max_queries=3, max_docs=11)
    eval_set = load_eval_set(cfg)
    assert len(eval_set.query_ids) == 3 and set(eval_set.qrels) == set(eval_set.query_ids)
    assert len(eval_set.doc_ids) == 11
    judged = {d for rel in eval_set.qrels.values() for d in rel}
    assert judged <= set(eval_set.doc_ids)  # the capped corpus keeps every judged doc
    queries, corpus = build_eval_dataloaders([eval_set], module.embedder.tokenizer, batch_size=2)
    batch = next(iter(queries))
    assert batch["kind"] == "queries" and batch["dataset"] == "t"
    assert batch["index"].tolist() == [0, 1]
    expected = tokenize(module.embedder.tokenizer, [eval_set.query_texts[0], eval_set.query_texts[1]], 192,
                        prefix="retrieve passage: ", mask_prefix=True)
    for key in ("input_ids", "attention_mask", "pool_mask"):
        assert torch.equal(batch[key], expected[key])
    assert (batch["pool_mask"][:, 1] == 0).all() and (batch["attention_mask"][:, 1] == 1).all()  # instruction
    assert sum(len(b["index"]) for b in corpus) == 11
    full = load_eval_set(EvalSetConfig("f", str(tiny_beir_dir)))
    assert len(full.query_ids) == 10 and len(full.doc_ids) == 60  # only test-judged queries


def test_eval_set_config_errors(tiny_beir_dir):
    with pytest.raises(ConfigError, match="max_docs"):
        EvalSetConfig("a", str(tiny_beir_dir), max_docs=0)
    with pytest.raises(ConfigError, match="duplicate name 'a'"):
        load_eval_sets([EvalSetConfig("a", str(tiny_beir_dir)), EvalSetConfig("a", str(tiny_beir_dir))])


def test_evaluate_embeddings_perfect_and_reversed():
    ids = ["a", "b", "c"]
    docs = np.eye(3, dtype=np.float32)
    qrels = {"q0": {"a": 1}, "q1": {"c": 2}}
    perfect = evaluate_embeddings(docs[[0, 2]], docs, ["q0", "q1"], ids, qrels, k_values=(1, 10))
    assert perfect["ndcg@10"] == 1.0 and perfect["mrr@1"] == 1.0
    wrong = evaluate_embeddings(docs[[1, 1]], docs, ["q0", "q1"], ids, qrels, k_values=(1, 10))
    assert wrong["recall@1"] == 0.0 and wrong["recall@10"] == 1.0
