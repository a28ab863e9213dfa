"""One corpus encode per (model, tokenizer, settings): ``nvr eval``, mining and frozen-base validation share it."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import numpy as np
import pytest

import nvr.modeling.encode as encode_module
from nvr.config.mining import TeacherConfig
from nvr.data.beir import load_beir
from nvr.evaluation.callback import RetrievalEvaluator
from nvr.evaluation.data import EvalSetConfig, build_eval_dataloaders, load_eval_sets
from nvr.evaluation.evaluate import evaluate_model
from nvr.modeling.config import EmbedderConfig, LoraSettings
from nvr.teachers.dense import DenseTeacher
from nvr.training.module import BiEncoderModule
from nvr.utils.precision import resolve_dtype


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """Texts per ``encode_texts`` call (every caller imports it at call time)."""
    calls: list[int] = []
    real = encode_module.encode_texts

    def counting(embedder, texts, **kwargs):
        calls.append(len(texts))
        return real(embedder, texts, **{**kwargs, "show_progress": False})

    monkeypatch.setattr(encode_module, "encode_texts", counting)
    return calls


def _teacher(model, cache, dtype="float32", **kw) -> DenseTeacher:
    cfg = TeacherConfig(name="t", model_name_or_path=str(model), dtype=dtype, device="cpu", passage_max_length=64,
                        **kw)
    return DenseTeacher(cfg, cache)


def test_eval_then_mining_encode_the_corpus_once(tiny_bert_dir, tiny_beir_dir, tmp_path, encode_calls):
    cache = tmp_path / "cache"
    corpus = load_beir(str(tiny_beir_dir), "test").corpus
    encoded: set[str] = set()
    for dtype in ("float32", "auto"):
        encode_calls.clear()
        evaluate_model(str(tiny_bert_dir), [str(tiny_beir_dir)], max_length=64, cache_dir=str(cache), device="cpu",
                       dtype=dtype)
        label = resolve_dtype(dtype, "cpu")  # auto is float32 on a CPU without native bf16: the same cache entry
        expected = 0 if label in encoded else len(corpus)
        encoded.add(label)
        assert sum(encode_calls) - encode_calls[0] == expected  # queries, then the corpus (unless cached)
        encode_calls.clear()
        docs = _teacher(tiny_bert_dir, cache, dtype).encode_passages(corpus.passages())
        assert encode_calls == [] and docs.shape[0] == len(corpus)  # the teacher read eval's encode
    # another prefix is another encoding
    _teacher(tiny_bert_dir, cache, passage_prefix="passage: ").encode_passages(corpus.passages())
    assert encode_calls == [len(corpus)]


def test_mining_then_eval_reuses_the_teacher_encode(tiny_bert_dir, tiny_beir_dir, tmp_path, encode_calls):
    cache = tmp_path / "cache"
    corpus = load_beir(str(tiny_beir_dir), "test").corpus
    teacher_docs = np.array(_teacher(tiny_bert_dir, cache).encode_passages(corpus.passages()))
    encode_calls.clear()
    result = evaluate_model(str(tiny_bert_dir), [str(tiny_beir_dir)], max_length=64, cache_dir=str(cache),
                            device="cpu", dtype="float32")
    assert len(encode_calls) == 1 and encode_calls[0] < len(corpus)  # queries only
    assert result["settings"]["dtype"] == "float32"
    uncached = evaluate_model(str(tiny_bert_dir), [str(tiny_beir_dir)], max_length=64, cache_dir=None,
                              device="cpu", dtype="float32")
    assert result["mean"] == pytest.approx(uncached["mean"], abs=1e-6) and teacher_docs.shape[0] == len(corpus)


class _DataModule(pl.LightningDataModule):
    """The part of MinedDataModule the evaluator uses: ``eval_sets`` + loaders built from them."""

    def __init__(self, sets, tokenizer) -> None:
        super().__init__()
        self.eval_sets = sets
        self.tokenizer = tokenizer

    def val_dataloader(self):
        return build_eval_dataloaders(self.eval_sets, self.tokenizer, batch_size=8)


def _validate(module, sets, cache, precision="32-true"):
    """(logged metrics, evaluator, number of corpus rows the loop encoded)."""
    evaluator = RetrievalEvaluator(cache_dir=str(cache))
    rows = []
    original = module.validation_step

    def step(batch, *args, **kwargs):
        if batch["kind"] == "corpus":
            rows.append(len(batch["index"]))
        return original(batch, *args, **kwargs)

    module.validation_step = step
    try:
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluator],
                             precision=precision)
        metrics = trainer.validate(module, datamodule=_DataModule(sets, module.embedder.tokenizer), verbose=False)
    finally:
        del module.validation_step
    return metrics[0], evaluator, sum(rows)


@pytest.fixture
def eval_sets(tiny_beir_dir):
    return load_eval_sets([EvalSetConfig("tiny", str(tiny_beir_dir), passage_max_length=64)])


@pytest.mark.parametrize("precision,teacher_dtype", [("32-true", "float32"), ("bf16-mixed", "auto")])
def test_frozen_base_validation_reads_the_teacher_cache(tiny_bert_dir, eval_sets, tmp_path, monkeypatch, precision,
                                                        teacher_dtype):
    import nvr.utils.precision as precision_module

    monkeypatch.setattr(precision_module, "cpu_supports_bf16", lambda *a, **k: True)
    cache = tmp_path / "cache"
    module = BiEncoderModule(EmbedderConfig(str(tiny_bert_dir)))
    baseline, _, rows = _validate(module, eval_sets, tmp_path / "empty-but-other", precision)
    assert rows == eval_sets["tiny"].size("corpus")
    _teacher(tiny_bert_dir, cache, teacher_dtype).encode_passages(eval_sets["tiny"].doc_texts)
    metrics, evaluator, rows = _validate(module, eval_sets, cache, precision)
    assert rows == 0 and evaluator.corpus_encodes_skipped == 1  # the corpus loader was left out
    assert metrics == pytest.approx(baseline, abs=2e-3 if precision == "bf16-mixed" else 1e-6)


def test_frozen_base_validation_writes_what_the_teacher_reads(tiny_bert_dir, eval_sets, tmp_path, encode_calls):
    cache = tmp_path / "cache"
    module = BiEncoderModule(EmbedderConfig(str(tiny_bert_dir)))
    _validate(module, eval_sets, cache)
    encode_calls.clear()
    docs = np.array(_teacher(tiny_bert_dir, cache).encode_passages(eval_sets["tiny"].doc_texts))
    assert encode_calls == []  # validation's corpus encode was stored under the teacher's key
    own = encode_module.encode_texts(module.embedder, eval_sets["tiny"].doc_texts, max_length=64)
    np.testing.assert_allclose(docs, own, atol=1e-5)


def test_changed_or_adapted_weights_never_use_the_cache(tiny_bert_dir, eval_sets, tmp_path):
    import torch

    cache = tmp_path / "cache"
    _teacher(tiny_bert_dir, cache).encode_passages(eval_sets["tiny"].doc_texts)
    changed = BiEncoderModule(EmbedderConfig(str(tiny_bert_dir)))
    with torch.no_grad():
        next(changed.embedder.parameters()).view(-1)[0] += 1e-4  # one weight, barely
    _, evaluator, rows = _validate(changed, eval_sets, cache)
    assert rows == eval_sets["tiny"].size("corpus") and evaluator.corpus_encodes_skipped == 0
    lora = BiEncoderModule(EmbedderConfig(str(tiny_bert_dir), lora=LoraSettings(r=2, target_modules=["query"])))
    _, evaluator, rows = _validate(lora, eval_sets, cache)
    assert rows == eval_sets["tiny"].size("corpus") and evaluator.corpus_encodes_skipped == 0


def test_trained_steps_never_use_the_cache(tiny_bert_dir, tmp_path):
    module = BiEncoderModule(EmbedderConfig(str(tiny_bert_dir)))
    evaluator = RetrievalEvaluator(cache_dir=str(tmp_path / "cache"))
    frozen = types.SimpleNamespace(precision="32-true", global_step=0, ckpt_path=None, datamodule=None)
    assert evaluator._frozen_reuse(frozen, module) is not None
    for change in ({"global_step": 1}, {"ckpt_path": "last.ckpt"}, {"precision": "bf16-true"}):
        assert evaluator._frozen_reuse(types.SimpleNamespace(**{**vars(frozen), **change}), module) is None
    assert RetrievalEvaluator()._frozen_reuse(frozen, module) is None  # no cache configured

