from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _training_data import write_fake_mined
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from nvr.evaluation.callback import RetrievalEvaluator
from nvr.evaluation.data import EvalSetConfig
from nvr.modeling.config import EmbedderConfig, LoraSettings
from nvr.testing import make_tiny_beir
from nvr.training.datamodule import MinedDataModule
from nvr.training.module import BiEncoderModule, lr_lambda, teacher_false_negative_mask
from nvr.utils.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def beir30(tmp_path_factory) -> Path:
    """30 train queries (3 per topic) so a batch of 4 gives 7 batches per epoch."""
    return make_tiny_beir(tmp_path_factory.mktemp("beir30"), queries_per_topic=4)


@pytest.fixture(scope="module")
def mined30(beir30, tmp_path_factory) -> Path:
    return write_fake_mined(beir30, tmp_path_factory.mktemp("mined30"), num_negatives=3)


class StopAt(Callback):
    """Simulates an interruption right after ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class Seen(Callback):
    """Records (epoch, position) of every batch the training step received."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.append((batch["sampler_epoch"], batch["sampler_position"]))


def _trainer(root: Path, max_steps: int, callbacks: list[Callback], **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(root),
        deterministic=True, callbacks=callbacks, enable_checkpointing=any(
            isinstance(c, ModelCheckpoint) for c in callbacks), **kw,
    )


def _module(model_dir: Path, **kw) -> BiEncoderModule:
    cfg = EmbedderConfig(model_name_or_path=str(model_dir), pooling="mean")
    for key in ("lora",):
        if key in kw:
            setattr(cfg, key, kw.pop(key))
    return BiEncoderModule(cfg, lr=1e-3, warmup_steps=2, seed=7, **kw)


def _data(model_dir: Path, mined: Path, **kw) -> MinedDataModule:
    args = dict(query_max_length=16, passage_max_length=32, num_negatives=2, batch_size=4, seed=3)
    return MinedDataModule(mined_dir=str(mined), tokenizer=str(model_dir), **{**args, **kw})


def _weights(module: BiEncoderModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_fit_a_few_steps_lowers_nothing_to_nan_and_changes_weights(tiny_bert_dir, mined30, tmp_path) -> None:
    module = _module(tiny_bert_dir)
    before = _weights(module)
    trainer = _trainer(tmp_path, 3, [])
    trainer.fit(module, datamodule=_data(tiny_bert_dir, mined30))
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_mid_epoch_equals_uninterrupted_run(tiny_bert_dir, mined30, tmp_path) -> None:
    # 7 batches per epoch: stop after 4 (mid-epoch), resume to 9 (crosses into epoch 1).
    full_seen = Seen()
    full = _module(tiny_bert_dir)
    _trainer(tmp_path / "full", 9, [full_seen]).fit(full, datamodule=_data(tiny_bert_dir, mined30))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True, save_top_k=-1)
    first_seen, resumed_seen = Seen(), Seen()
    part = _module(tiny_bert_dir)
    _trainer(tmp_path / "part", 9, [ckpt, StopAt(4), first_seen]).fit(part, datamodule=_data(tiny_bert_dir, mined30))
    assert first_seen.keys == full_seen.keys[:4]
    resumed = _module(tiny_bert_dir)
    _trainer(tmp_path / "part", 9, [resumed_seen]).fit(
        resumed, datamodule=_data(tiny_bert_dir, mined30), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_seen.keys == full_seen.keys[4:]
    assert full_seen.keys[6:8] == [(0, 6), (1, 0)]
    expected, got = full.state_dict(), resumed.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_lora_checkpoint_keeps_only_trainable_tensors_and_resumes(tiny_mistral_dir, tmp_path) -> None:
    beir = make_tiny_beir(tmp_path / "beir", queries_per_topic=2)
    mined = write_fake_mined(beir, tmp_path / "mined", num_negatives=2)
    lora = LoraSettings(r=4, alpha=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    module = _module(tiny_mistral_dir, lora=lora)
    trainer = _trainer(tmp_path, 2, [ckpt])
    trainer.fit(module, datamodule=_data(tiny_mistral_dir, mined, batch_size=2))
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable and len(trainable) < len(module.state_dict())
    full_size = _saved_size(module.state_dict(), tmp_path / "full.pt")
    assert os.path.getsize(last) < full_size
    resumed = _module(tiny_mistral_dir, lora=lora)
    trainer2 = _trainer(tmp_path, 3, [])
    trainer2.fit(resumed, datamodule=_data(tiny_mistral_dir, mined, batch_size=2), ckpt_path=str(last))
    assert trainer2.global_step == 3
    # warm start (stage 2 from stage 1): weights only, from the small checkpoint
    warm = _module(tiny_mistral_dir, lora=lora, init_from=str(last))
    for name in trainable:
        torch.testing.assert_close(warm.state_dict()[name], saved["state_dict"][name])


def _saved_size(state: dict[str, torch.Tensor], path: Path) -> int:
    torch.save(state, path)
    return os.path.getsize(path)


def test_validation_step_feeds_the_retrieval_evaluator(tiny_bert_dir, mined30, beir30, tmp_path) -> None:
    data = _data(tiny_bert_dir, mined30, eval_sets=[EvalSetConfig(name="tiny", path=str(beir30), split="test")])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[RetrievalEvaluator()], default_root_dir=str(tmp_path))
    metrics = trainer.validate(_module(tiny_bert_dir), datamodule=data)[0]
    assert 0.0 <= metrics["val/tiny/ndcg@10"] <= 1.0 and "val/ndcg@10" in metrics
    assert set(data.eval_sets) == {"tiny"}


def test_helpers_and_config_errors(tiny_bert_dir, tmp_path) -> None:
    warm = lr_lambda("linear", 2, 10)
    assert [round(warm(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 1, 10)(9) == 1.0
    mask = teacher_false_negative_mask(torch.tensor([[0.96, 0.9, float("nan")], [-0.5, -0.6, 0.1]]),
                                       torch.tensor([1.0, -0.5]), 0.95)
    assert mask.tolist() == [[True, False, False], [True, False, True]]
    with pytest.raises(ConfigError, match="model.temperature"):
        _module(tiny_bert_dir, temperature=0.0)
    with pytest.raises(ConfigError, match="init_from"):
        _module(tiny_bert_dir, init_from=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="data.mined_dir"):
        MinedDataModule(tokenizer=str(tiny_bert_dir))
    with pytest.raises(InputError, match="no mined set"):
        MinedDataModule(mined_dir=str(tmp_path / "nothing"), tokenizer=str(tiny_bert_dir)).prepare_data()


def test_examples_with_zero_negatives_train_on_masked_slots(tiny_bert_dir, mined30, tmp_path, caplog) -> None:
    """``shortfall: keep_short`` may write rows with no negative: their slots are padding, the loss stays finite."""
    import json

    from nvr.training.loss import PAD_ID
    from nvr.training.sampler import SampleKey

    rows = [json.loads(line) for line in (mined30 / "mined.jsonl").read_text(encoding="utf-8").splitlines()]
    for i, row in enumerate(rows):  # 0, 1 or 3 stored negatives
        row["negatives"] = [] if i % 3 == 0 else row["negatives"][: 1 if i % 3 == 1 else 3]
    short = tmp_path / "short"
    short.mkdir()
    (short / "mined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    empty = sum(1 for i in range(len(rows)) if i % 3 == 0)

    data = _data(tiny_bert_dir, short, num_negatives=2)
    with caplog.at_level("WARNING", logger="nvr.training.datamodule"):
        data.setup("fit")
    assert f"have fewer than 2 negatives ({empty} have none and train on in-batch negatives only)" in caplog.text
    collate = data.train_dataloader().collate_fn
    batch = collate([data.train_dataset[SampleKey(0, 0, i)] for i in range(3)])
    assert batch["passage_ids"].shape == (3, 3)
    assert (batch["passage_ids"][:, 0] != PAD_ID).all()  # the positive is always real
    assert ((batch["passage_ids"][:, 1:] == PAD_ID) == torch.tensor([[1, 1], [0, 1], [0, 0]]).bool()).all()
    assert torch.isnan(batch["negative_scores"][0]).all() and not torch.isnan(batch["negative_scores"][2]).any()

    module = _module(tiny_bert_dir)
    trainer = _trainer(tmp_path / "fit", 2, [])
    trainer.fit(module, datamodule=_data(tiny_bert_dir, short, num_negatives=2))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_bf16_backbone_keeps_fp32_master_weights_and_small_lr_steps_apply(tiny_mistral_dir, tmp_path) -> None:
    """In pure bf16 an lr 1e-5 AdamW update is below the weights' spacing and vanishes (LayerNorm 1.0 stays 1.0)."""
    from nvr.modeling.config import LatentAttentionConfig

    beir = make_tiny_beir(tmp_path / "beir", queries_per_topic=2)
    mined = write_fake_mined(beir, tmp_path / "mined", num_negatives=1)
    cfg = EmbedderConfig(model_name_or_path=str(tiny_mistral_dir), pooling="latent_attention", bidirectional=True,
                         dtype="bfloat16", latent=LatentAttentionConfig(num_latents=4, num_heads=2),
                         lora=LoraSettings(r=4, alpha=8))
    module = BiEncoderModule(cfg, lr=1e-5, warmup_steps=0, scheduler="constant", seed=1)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert any(p.dtype == torch.bfloat16 for p in module.parameters() if not p.requires_grad)  # frozen base stays
    before = {n: p.detach().clone() for n, p in trainable.items()}
    _trainer(tmp_path, 2, []).fit(module, datamodule=_data(tiny_mistral_dir, mined, batch_size=2, num_negatives=1))
    unchanged = [n for n, p in module.named_parameters() if n in before and torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged[:5]


def test_data_max_length_above_the_position_limit_is_clamped(tiny_bert_dir, tmp_path, caplog) -> None:
    """The tiny BERT has 128 positions: a 400-word passage with passage_max_length 512 used to crash mid-fit."""
    import json

    beir = make_tiny_beir(tmp_path / "beir", queries_per_topic=2)
    mined = write_fake_mined(beir, tmp_path / "mined", num_negatives=1)
    rows = [json.loads(line) for line in (mined / "mined.jsonl").read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["positives"][0]["text"] = " ".join(["wing lift drag airfoil"] * 100)
    (mined / "mined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = _data(tiny_bert_dir, mined, passage_max_length=512, query_max_length=1000, batch_size=2, num_negatives=1)
    with caplog.at_level("WARNING", logger="nvr.training.module"):
        _trainer(tmp_path, 1, []).fit(_module(tiny_bert_dir), datamodule=data)
    assert "config key 'data.passage_max_length': 512 exceeds the 128 positions" in caplog.text
    assert "data.query_max_length" in caplog.text
    assert data.passage_max_length == 128 and data.query_max_length == 128
