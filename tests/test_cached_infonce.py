"""Cached (GradCache-style) InfoNCE: parameter gradients equal the uncached loss over the same mini-batch forwards
(dropout on, in-batch negatives, padding slots, teacher false-negative masking), in a bare step, through Lightning
(gradient accumulation, clipping, LR schedule, resume) and under 2-process DDP and FSDP2 with cross-device
negatives."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _training_data import write_fake_mined

from nvr.modeling.config import EmbedderConfig
from nvr.testing import make_tiny_beir
from nvr.training import cached
from nvr.training.cached import plan_mini_batches, take_rows
from nvr.training.datamodule import MinedDataModule
from nvr.training.loss import PAD_ID, info_nce
from nvr.training.module import BiEncoderModule
from nvr.utils.errors import ConfigError

PERC = 0.8  # fake mined scores: positive 0.6, negatives 0.5 / 0.4 / 0.3 -> 0.5 >= 0.48 is masked


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    beir = make_tiny_beir(tmp_path_factory.mktemp("beir"), queries_per_topic=4)
    return write_fake_mined(beir, tmp_path_factory.mktemp("mined"), num_negatives=3)


def _module(model_dir: Path, **kw) -> BiEncoderModule:
    cfg = EmbedderConfig(model_name_or_path=str(model_dir), pooling="mean")
    args = dict(temperature=0.05, false_negative_perc=PERC, lr=1e-3, warmup_steps=1, seed=7)
    return BiEncoderModule(cfg, **{**args, **kw})


def _data(model_dir: Path, mined: Path, **kw) -> MinedDataModule:
    # 4 negatives per slot from 3 stored: one padding slot per example
    args = dict(query_max_length=16, passage_max_length=32, num_negatives=4, batch_size=6, seed=3)
    return MinedDataModule(mined_dir=str(mined), tokenizer=str(model_dir), **{**args, **kw})


def _batch(model_dir: Path, mined: Path) -> dict:
    data = _data(model_dir, mined)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _grads(module: BiEncoderModule) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _encode_chunks(module: BiEncoderModule, features: dict, limits: tuple) -> torch.Tensor:
    """Reference forward WITH a graph over the same mini-batches (untrimmed padding), reassembled in row order."""
    plan = plan_mini_batches(features["attention_mask"].sum(1), *limits)
    parts = [module.encode({k: v[rows] for k, v in features.items()}) for rows in plan]
    out = torch.cat(parts)
    return torch.empty_like(out).index_copy(0, torch.cat(plan), out)


def reference_loss(module: BiEncoderModule, batch: dict, limits: tuple, remote=None) -> torch.Tensor:
    """The uncached loss (one graph through every forward) with the cached path's mini-batches."""
    size, group = batch["passage_ids"].shape
    queries = _encode_chunks(module, batch["query"], limits)
    passages = _encode_chunks(module, batch["passages"], limits).reshape(size, group, -1)
    remote_emb, remote_ids = remote if remote is not None else (None, None)
    return info_nce(queries, passages, module.hparams.temperature, passage_ids=batch["passage_ids"],
                    positive_ids=batch["positive_ids"], hard_negative_mask=module._teacher_mask(batch),
                    remote_passage_emb=remote_emb, remote_passage_ids=remote_ids)


def _cached_step_grads(module: BiEncoderModule, batch: dict, seed: int, scale: float = 1.0) -> dict:
    torch.manual_seed(seed)
    leaf = module.training_step(batch, 0)
    module.backward(leaf * scale)
    return _grads(module)


def _assert_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want) and len(want) > 10
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=atol, msg=name)


# ----------------------------------------------------------------------------------------- mini-batch plan
def test_plan_by_count_tokens_and_both_covers_every_row_once() -> None:
    lengths = torch.tensor([5, 9, 3, 9, 1, 7, 2])
    assert [r.tolist() for r in plan_mini_batches(lengths, None, None)] == [list(range(7))]
    assert [r.tolist() for r in plan_mini_batches(lengths, 7, 63)] == [list(range(7))]  # fits: order kept
    by_count = plan_mini_batches(lengths, 3, None)
    assert [r.tolist() for r in by_count] == [[1, 3, 5], [0, 2, 6], [4]]  # longest first
    by_tokens = plan_mini_batches(lengths, None, 20)
    for rows in by_tokens:
        assert len(rows) * int(lengths[rows].max()) <= 20
    both = plan_mini_batches(lengths, 2, 14)
    assert all(len(r) <= 2 and len(r) * int(lengths[r].max()) <= 14 for r in both if len(r) > 1)
    for plan in (by_count, by_tokens, both):
        assert sorted(torch.cat(plan).tolist()) == list(range(7))
    assert [r.tolist() for r in plan_mini_batches(torch.tensor([30, 2]), None, 10)] == [[0], [1]]  # over budget


def test_each_mini_batch_is_padded_to_its_own_longest(tiny_bert_dir, mined) -> None:
    batch = _batch(tiny_bert_dir, mined)
    features = batch["passages"]
    lengths = features["attention_mask"].sum(1)
    assert int(lengths.min()) < features["input_ids"].shape[1]  # the field's padding is wider than some rows
    for rows in plan_mini_batches(lengths, 4, None):
        sub = take_rows(features, rows)
        assert sub["input_ids"].shape == (len(rows), int(lengths[rows].max()))
        assert torch.equal(sub["attention_mask"].sum(1), lengths[rows])
        assert torch.equal(sub["pool_mask"], features["pool_mask"][rows, : sub["pool_mask"].shape[1]])


def test_bad_mini_batch_settings_are_config_errors(tiny_bert_dir) -> None:
    for key in ("mini_batch_size", "mini_batch_num_tokens"):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            _module(tiny_bert_dir, **{key: 0})


# ------------------------------------------------------------------------------------------ bare step
@pytest.mark.parametrize("limits", [(3, None), (None, 40), (5, 64)], ids=["count", "tokens", "both"])
def test_cached_gradients_equal_the_uncached_loss(limits, tiny_bert_dir, mined) -> None:
    batch = _batch(tiny_bert_dir, mined)
    assert (batch["passage_ids"] == PAD_ID).any()
    module = _module(tiny_bert_dir, mini_batch_size=limits[0], mini_batch_num_tokens=limits[1])
    assert module._teacher_mask(batch).any() and module.embedder.backbone.config.hidden_dropout_prob > 0
    assert len(plan_mini_batches(batch["passages"]["attention_mask"].sum(1), *limits)) > 2
    reference = _module(tiny_bert_dir)
    reference.load_state_dict(module.state_dict())
    torch.manual_seed(11)
    loss = reference_loss(reference, batch, limits)
    loss.backward()
    torch.manual_seed(11)
    leaf = module.training_step(batch, 0)
    assert float(leaf.detach()) == pytest.approx(float(loss), rel=1e-6)
    module.backward(leaf * 0.5)  # Lightning's 1/accumulate_grad_batches (or an AMP scale) reaches every mini-batch
    _assert_close(_grads(module), {k: v * 0.5 for k, v in _grads(reference).items()})


def test_one_mini_batch_equals_the_uncached_training_step(tiny_bert_dir, mined) -> None:
    batch = _batch(tiny_bert_dir, mined)
    module = _module(tiny_bert_dir, mini_batch_size=10_000)
    reference = _module(tiny_bert_dir)
    reference.load_state_dict(module.state_dict())
    torch.manual_seed(5)
    reference.training_step(batch, 0).backward()
    _assert_close(_cached_step_grads(module, batch, seed=5), _grads(reference))


# ------------------------------------------------------------------------------- length buckets (uncached)
def test_length_buckets_keep_the_graph_and_equal_the_cached_loss(tiny_bert_dir, mined, monkeypatch) -> None:
    """Uncached ``length_bucket_size=3``: forwards of the cached path's chunks (trimmed to their own longest), one
    graph; dropout on, so equality with the cached step (same chunks, same RNG order) is exact, not statistical."""
    batch = _batch(tiny_bert_dir, mined)
    bucketed = _module(tiny_bert_dir, length_bucket_size=3)
    reference = _module(tiny_bert_dir, mini_batch_size=3)
    reference.load_state_dict(bucketed.state_dict())
    widths: list[int] = []
    encode = BiEncoderModule.encode
    monkeypatch.setattr(BiEncoderModule, "encode", lambda self, f: widths.append(f["input_ids"].shape[1])
                        or encode(self, f))
    torch.manual_seed(4)
    loss = bucketed.training_step(batch, 0)
    assert loss.requires_grad and len(widths) > 4
    assert max(widths) == batch["passages"]["input_ids"].shape[1] and min(widths) < max(widths)  # trimmed chunks
    loss.backward()
    _assert_close(_grads(bucketed), _cached_step_grads(reference, batch, seed=4))


def test_length_buckets_without_dropout_equal_one_forward_per_field(tiny_bert_dir, mined) -> None:
    batch = _batch(tiny_bert_dir, mined)
    bucketed, single = _module(tiny_bert_dir, length_bucket_size=2), _module(tiny_bert_dir)
    single.load_state_dict(bucketed.state_dict())
    for module in (bucketed, single):
        module.eval()  # dropout off: the only difference left is the padding each forward sees
        module.training_step(batch, 0).backward()
    _assert_close(_grads(bucketed), _grads(single))


def test_bad_length_bucket_settings_are_config_errors(tiny_bert_dir) -> None:
    with pytest.raises(ConfigError, match="model.length_bucket_size.*>= 1"):
        _module(tiny_bert_dir, length_bucket_size=0)
    with pytest.raises(ConfigError, match="model.length_bucket_size.*already length-sorts"):
        _module(tiny_bert_dir, length_bucket_size=4, mini_batch_size=8)


def test_without_replayed_dropout_the_gradients_differ(tiny_bert_dir, mined, monkeypatch) -> None:
    """The equality above depends on replaying each mini-batch's RNG state (dropout is really on)."""
    batch = _batch(tiny_bert_dir, mined)
    module = _module(tiny_bert_dir, mini_batch_size=3)
    exact = _cached_step_grads(module, batch, seed=2)
    module.zero_grad(set_to_none=True)
    monkeypatch.setattr(cached.RngState, "restore", lambda self: None)
    drifted = _cached_step_grads(module, batch, seed=2)
    assert max(float((exact[k] - drifted[k]).abs().max()) for k in exact) > 1e-3


# -------------------------------------------------------------------------------------------- Lightning
class ChunkedReference(BiEncoderModule):
    """Uncached loss with the cached path's mini-batch forwards (one graph): the cached module must match it."""

    LIMITS = (3, 48)

    def training_step(self, batch, batch_idx):
        loss = reference_loss(self, batch, self.LIMITS)
        self.log("train/loss", loss, batch_size=batch["passage_ids"].shape[0])
        return loss


def _fit(module: BiEncoderModule, data: MinedDataModule, root: Path, max_steps: int, ckpt_path=None,
         **kw) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(root),
        enable_checkpointing=False, **{"precision": "32-true", **kw},
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_with_accumulation_clipping_and_schedule_matches_the_reference(precision, tiny_bert_dir, mined,
                                                                           tmp_path) -> None:
    """Through Lightning: the re-encoding runs under the precision plugin's autocast like the first pass."""
    limits = ChunkedReference.LIMITS
    module = _module(tiny_bert_dir, mini_batch_size=limits[0], mini_batch_num_tokens=limits[1])
    reference = ChunkedReference(module.embedder_config, temperature=0.05, false_negative_perc=PERC, lr=1e-3,
                                 warmup_steps=1, seed=7)
    reference.load_state_dict(module.state_dict())
    start = {k: v.clone() for k, v in module.state_dict().items()}
    kw = dict(accumulate_grad_batches=2, gradient_clip_val=0.05, precision=precision)
    _fit(module, _data(tiny_bert_dir, mined), tmp_path / "a", max_steps=2, **kw)
    _fit(reference, _data(tiny_bert_dir, mined), tmp_path / "b", max_steps=2, **kw)
    moved = False
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
        moved |= not torch.equal(value, start[name])
    assert moved


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.global_step >= self.step


def test_cached_fit_resumes_from_a_checkpoint_exactly(tiny_bert_dir, mined, tmp_path) -> None:
    whole, first, second = (_module(tiny_bert_dir, mini_batch_size=4) for _ in range(3))
    _fit(whole, _data(tiny_bert_dir, mined), tmp_path / "whole", max_steps=4)
    trainer = _fit(first, _data(tiny_bert_dir, mined), tmp_path / "part", max_steps=4, callbacks=[StopAt(2)])
    assert trainer.global_step == 2
    ckpt = tmp_path / "part.ckpt"
    trainer.save_checkpoint(str(ckpt))
    _fit(second, _data(tiny_bert_dir, mined), tmp_path / "part", max_steps=4, ckpt_path=str(ckpt))
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


def test_cached_loss_under_ddp_find_unused_parameters_is_refused_with_the_key(tiny_bert_dir) -> None:
    """DDP's unused-parameter search sees the step's graph-free leaf and would fail in backward ("marked ready
    twice"); plain DDP and FSDP2 (ModelParallelStrategy) are accepted."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    module = _module(tiny_bert_dir, mini_batch_num_tokens=64)
    module._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True), datamodule=None)
    with pytest.raises(ConfigError, match="model.mini_batch_size.*find_unused_parameters"):
        module.setup("fit")
    for strategy in (DDPStrategy(), ModelParallelStrategy()):
        module._trainer = SimpleNamespace(strategy=strategy, datamodule=None)
        module.setup("fit")
    uncached = _module(tiny_bert_dir)
    uncached._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True), datamodule=None)
    uncached.setup("fit")


# ------------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_cached_gather_and_teacher_mask_match_the_union_batch_reference(tiny_bert_dir, mined, tmp_path) -> None:
    """2 gloo processes, cross-device negatives: each rank's step-0 loss and the synchronised gradient equal a
    single-process reference over both ranks' batches (same mini-batch forwards, same per-rank dropout seeds)."""
    from test_training_distributed import WORLD, _fit_ddp_spawn, _load

    from nvr.utils.seeding import derive_seed

    limits = (3, None)
    module = _module(tiny_bert_dir, mini_batch_size=limits[0], gather_across_devices=True, warmup_steps=0,
                     scheduler="constant")
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    _fit_ddp_spawn(module, _data(tiny_bert_dir, mined), tmp_path, max_steps=2)
    ends = [_load(tmp_path, r, "end") for r in range(WORLD)]
    for name, value in ends[0]["weights"].items():
        torch.testing.assert_close(ends[1]["weights"][name], value, rtol=0, atol=0, msg=name)

    batches = [_load(tmp_path, r, "batch0") for r in range(WORLD)]
    reference = _module(tiny_bert_dir, gather_across_devices=True)
    reference.load_state_dict(initial)
    encoded = []
    for rank, batch in enumerate(batches):
        torch.manual_seed(derive_seed(7, "step", 0, rank) % (2**63))
        encoded.append((_encode_chunks(reference, batch["query"], limits),
                        _encode_chunks(reference, batch["passages"], limits)))
    losses = []
    for rank, batch in enumerate(batches):
        size, group = batch["passage_ids"].shape
        others = [r for r in range(WORLD) if r != rank]
        remote = (torch.cat([encoded[r][1] for r in others]),
                  torch.cat([batches[r]["passage_ids"].reshape(-1) for r in others]))
        assert reference._teacher_mask(batch).any()
        losses.append(info_nce(encoded[rank][0], encoded[rank][1].reshape(size, group, -1), 0.05,
                               passage_ids=batch["passage_ids"], positive_ids=batch["positive_ids"],
                               hard_negative_mask=reference._teacher_mask(batch), remote_passage_emb=remote[0],
                               remote_passage_ids=remote[1]))
        assert ends[rank]["losses"][0] == pytest.approx(float(losses[-1].detach()), rel=1e-5)
    (sum(losses) / WORLD).backward()
    for rank in range(WORLD):
        _assert_close(_load(tmp_path, rank, "grads0"), _grads(reference))


# ---------------------------------------------------------------------------------------------------- FSDP2
FSDP_SCRIPT = Path(__file__).parent / "scripts" / "cached_fsdp2.py"


@pytest.mark.slow
def test_fsdp2_cached_gradients_and_step_equal_the_uncached_loss(tiny_bert_dir, mined, tmp_path) -> None:
    """2 gloo processes under ModelParallelStrategy (FSDP2), cross-device negatives, teacher masking, dropout on:
    the cached step's full (unsharded) gradients and the weights after one AdamW step equal the uncached loss's
    over the same mini-batch forwards, by row count and by token budget."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(FSDP_SCRIPT), str(tiny_bert_dir), str(mined), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for case in ("rows", "tokens"):
        for rank in range(2):
            want = torch.load(tmp_path / f"reference_{case}_rank{rank}.pt")
            got = torch.load(tmp_path / f"cached_{case}_rank{rank}.pt")
            assert got["world_size"] == 2 and got["sharded"] and want["sharded"]  # trainable params are DTensors
            assert got["mini_batches"] > 2 and got["teacher_masked"] > 0
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
            _assert_close(got["grads"], want["grads"])
            _assert_close(got["weights"], want["weights"])
            assert any(not torch.equal(got["weights"][k], v) for k, v in got["initial"].items())  # it stepped


# ------------------------------------------------------------------------- extended objective (issues 12, 13)
@pytest.mark.parametrize("objective", [
    dict(loss="infonce+kd", kd_weight=0.5, multi_positive="each", self_mask_margin=0.05,
         matryoshka_dims=[32, 8], matryoshka_weights=[1.0, 0.5]),
    dict(loss="kd", kd_teacher_temperature=0.1, matryoshka_dims=[16]),
    dict(multi_positive="logsumexp", self_mask_margin=0.0),
], ids=["infonce+kd-each-selfmask-matryoshka", "kd-only", "logsumexp-selfmask0"])
def test_cached_gradients_equal_the_uncached_objective(objective, tiny_bert_dir, mined) -> None:
    """C1 batch (an extra-positive column, absent on every other example), KD, self-masking and Matryoshka: the
    cached step's gradients equal the one-graph loss over the same mini-batch forwards."""
    from _c1_batches import relabel_c1, with_scores

    limits = (3, None)
    batch = relabel_c1(with_scores(_batch(tiny_bert_dir, mined)))
    module = _module(tiny_bert_dir, mini_batch_size=limits[0], **objective)
    reference = _module(tiny_bert_dir, **objective)
    reference.load_state_dict(module.state_dict())
    torch.manual_seed(11)
    size, group = batch["passage_ids"].shape
    queries = _encode_chunks(reference, batch["query"], limits)
    passages = _encode_chunks(reference, batch["passages"], limits).reshape(size, group, -1)
    loss = reference._objective(queries, passages, batch, None, None).loss
    loss.backward()
    torch.manual_seed(11)
    leaf = module.training_step(batch, 0)
    assert float(leaf.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    module.backward(leaf)
    _assert_close(_grads(module), _grads(reference))
