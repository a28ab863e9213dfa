"""BiEncoderModule with the extended objective: C1 batches (extra positives, dataset name, per-dataset in-batch
switch), KD, self-guided masking and Matryoshka against independent references; the new ``model.*`` settings'
one-line errors; the step diagnostics (grad norm, accuracy, margin, per-dataset loss) through a real fit."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _c1_batches import C1DataModule, relabel_c1, with_scores
from _training_data import write_fake_mined
from test_kd import reference_kd
from test_loss import reference_loss

from nvr.modeling.config import EmbedderConfig
from nvr.testing import make_tiny_beir
from nvr.training.datamodule import MinedDataModule
from nvr.training.loss import PAD_ID
from nvr.training.module import BiEncoderModule, teacher_false_negative_mask
from nvr.utils.errors import ConfigError

TAU = 0.05


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    beir = make_tiny_beir(tmp_path_factory.mktemp("beir"), queries_per_topic=4)
    return write_fake_mined(beir, tmp_path_factory.mktemp("mined"), num_negatives=3)


def _module(model_dir: Path, **kw) -> BiEncoderModule:
    cfg = EmbedderConfig(model_name_or_path=str(model_dir), pooling="mean")
    return BiEncoderModule(cfg, **{**dict(temperature=TAU, lr=1e-3, warmup_steps=1, seed=7), **kw})


def _data(model_dir: Path, mined: Path, cls=MinedDataModule, **kw) -> MinedDataModule:
    args = dict(query_max_length=16, passage_max_length=32, num_negatives=3, batch_size=6, seed=3)
    return cls(mined_dir=str(mined), tokenizer=str(model_dir), **{**args, **kw})


def _batch(model_dir: Path, mined: Path) -> dict:
    data = _data(model_dir, mined)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


# --------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("key, value, fragment", [
    ("loss", "mse", "infonce|kd|infonce+kd"),
    ("multi_positive", "max", "each|logsumexp"),
    ("kd_weight", 0.0, "> 0"),
    ("kd_weight", float("nan"), "finite"),
    ("kd_temperature", -1.0, "> 0"),
    ("kd_teacher_temperature", 0.0, "> 0"),
    ("self_mask_margin", -0.1, ">= 0"),
    ("self_mask_margin", float("inf"), "finite"),
    ("matryoshka_dims", [], "non-empty"),
    ("matryoshka_dims", [16, 0], "positive ints"),
    ("matryoshka_dims", [16, 16], "repeated"),
    ("matryoshka_dims", [64, 16], "exceeds the embedding size 32"),
])
def test_bad_objective_settings_name_their_key(key, value, fragment, tiny_bert_dir) -> None:
    extra = {"loss": "infonce+kd"} if key.startswith("kd_") else {}
    with pytest.raises(ConfigError, match=rf"model\.{key}.*{fragment.replace('|', '.').replace('+', '.')}"):
        _module(tiny_bert_dir, **{**extra, key: value})


@pytest.mark.parametrize("kw, key", [
    (dict(kd_temperature=0.1), "kd_temperature"),
    (dict(kd_weight=0.5), "kd_weight"),
    (dict(matryoshka_weights=[1.0]), "matryoshka_weights"),
    (dict(matryoshka_dims=[32, 8], matryoshka_weights=[1.0]), "matryoshka_weights"),
    (dict(matryoshka_dims=[32, 8], matryoshka_weights=[1.0, float("nan")]), "matryoshka_weights"),
])
def test_settings_that_would_be_silently_ignored_are_refused(kw, key, tiny_bert_dir) -> None:
    with pytest.raises(ConfigError, match=rf"model\.{key}"):
        _module(tiny_bert_dir, **kw)


# ------------------------------------------------------------------------------------------------ one step
def test_c1_step_equals_the_loop_reference(tiny_bert_dir, mined) -> None:
    """Extra positives (absent on every other example), teacher mask on the hard-negative columns only, self
    masking, logsumexp multi-positive and KD with extra-positive teacher scores, all in one step."""
    batch = relabel_c1(with_scores(_batch(tiny_bert_dir, mined)))
    module = _module(tiny_bert_dir, loss="infonce+kd", kd_weight=0.7, kd_teacher_temperature=0.1,
                     multi_positive="logsumexp", self_mask_margin=0.05, false_negative_perc=0.8).eval()
    hard = teacher_false_negative_mask(batch["negative_scores"], batch["positive_scores"], 0.8)
    assert hard.any() and not hard.all()
    out = module.training_step(batch, 0)
    with torch.no_grad():
        q = module.encode(batch["query"])
        size, group = batch["passage_ids"].shape
        p = module.encode(batch["passages"]).reshape(size, group, -1)
    nce, _, _ = reference_loss(q, p, batch["passage_ids"], batch["positive_ids"], 1, "logsumexp", margin=0.05,
                               hard_mask=hard, tau=TAU)
    teacher = torch.cat([batch["positive_scores"][:, None], batch["extra_positive_scores"],
                         batch["negative_scores"]], dim=1)
    kd, count = reference_kd(torch.einsum("bh,bgh->bg", q, p), teacher, batch["passage_ids"], TAU, 0.1)
    assert count == size
    assert out.item() == pytest.approx(nce + 0.7 * kd, rel=1e-5)


def test_per_dataset_in_batch_switch_equals_the_module_setting(tiny_bert_dir, mined) -> None:
    batch = _batch(tiny_bert_dir, mined)
    on, off = _module(tiny_bert_dir).eval(), _module(tiny_bert_dir, use_in_batch_negatives=False).eval()
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        local = off.training_step(batch, 0).item()
        assert on.training_step({**batch, "use_in_batch_negatives": False}, 0).item() == pytest.approx(local)
        assert off.training_step({**batch, "use_in_batch_negatives": True}, 0).item() == pytest.approx(
            on.training_step(batch, 0).item())
        assert on.training_step(batch, 0).item() != pytest.approx(local)


def test_kd_alone_without_teacher_scores_is_a_one_line_error(tiny_bert_dir, mined) -> None:
    batch = _batch(tiny_bert_dir, mined)
    module = _module(tiny_bert_dir, loss="kd")
    assert torch.isfinite(module.training_step(batch, 0))
    unknown = {**batch, "positive_scores": torch.full_like(batch["positive_scores"], float("nan")), "dataset": "x"}
    with pytest.raises(ConfigError, match=r"model\.loss.*dataset 'x'.*infonce\+kd"):
        module.training_step(unknown, 0)
    # with InfoNCE the KD term is simply absent for such a batch
    both = _module(tiny_bert_dir, loss="infonce+kd").eval()
    plain = _module(tiny_bert_dir).eval()
    plain.load_state_dict(both.state_dict())
    with torch.no_grad():
        assert both.training_step(unknown, 0).item() == pytest.approx(plain.training_step(unknown, 0).item())


def test_matryoshka_dims_reach_the_checkpoint_record(tiny_bert_dir) -> None:
    module = _module(tiny_bert_dir, matryoshka_dims=[32, 16, 8], matryoshka_weights=[1.0, 0.5, 0.25])
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["nvr_encoding"]["matryoshka_dims"] == [32, 16, 8]
    checkpoint = {}
    _module(tiny_bert_dir).on_save_checkpoint(checkpoint)
    assert "matryoshka_dims" not in checkpoint["nvr_encoding"]


# ------------------------------------------------------------------------------------------------------ fit
class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_fit_logs_grad_norm_accuracy_margin_and_per_dataset_loss(cached, tiny_bert_dir, mined, tmp_path) -> None:
    kw = dict(mini_batch_size=4) if cached else {}
    module = _module(tiny_bert_dir, loss="infonce+kd", matryoshka_dims=[32, 8], self_mask_margin=0.1, **kw)
    data = _data(tiny_bert_dir, mined, C1DataModule)
    data.c1_kwargs = {"dataset": "toyset"}
    recorder = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[recorder],
                         gradient_clip_val=1e-4)
    trainer.fit(module, datamodule=data)
    assert len(recorder.metrics) == 3
    for norm, metrics in zip(recorder.norms, recorder.metrics, strict=True):
        # the norm the optimizer step saw before clipping to 1e-4 (a clipped norm would read 1e-4)
        assert metrics["train/grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 1e-3
        assert metrics["train/loss/toyset"] == metrics["train/loss"]
        assert metrics["train/loss"] == pytest.approx(metrics["train/infonce"] + metrics["train/kd"], rel=1e-5)
        assert 0.0 <= metrics["train/accuracy"] <= 1.0 and math.isfinite(metrics["train/margin"])
    assert len({round(m["train/grad_norm"], 6) for m in recorder.metrics}) == 3


def test_c1_batches_keep_padding_for_absent_extra_positives(tiny_bert_dir, mined) -> None:
    batch = relabel_c1(_batch(tiny_bert_dir, mined))
    assert (batch["passage_ids"][1::2, 1] == PAD_ID).all() and (batch["passage_ids"][::2, 1] != PAD_ID).all()
    assert batch["negative_scores"].shape[1] == batch["passage_ids"].shape[1] - 2


def test_grad_norm_of_sharded_dtensor_gradients_is_the_full_norm(tmp_path) -> None:
    """FSDP2 gradients are DTensors: the logged norm is reduced over the shards (here a 1-process gloo mesh)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from nvr.training.module import grad_total_norm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        params, plain = [], []
        for shape in [(4, 3), (5,)]:
            grad = torch.randn(*shape, generator=gen)
            param = torch.nn.Parameter(distribute_tensor(torch.zeros(*shape), mesh, [Shard(0)]))
            param.grad = distribute_tensor(grad, mesh, [Shard(0)])
            params.append(param)
            plain.append(grad)
        norm = grad_total_norm(params)
        assert type(norm) is torch.Tensor
        assert float(norm) == pytest.approx(float(torch.sqrt(sum((g ** 2).sum() for g in plain))), rel=1e-6)
    finally:
        dist.destroy_process_group()
    assert grad_total_norm([torch.nn.Parameter(torch.zeros(2))]) is None  # no gradient yet: nothing logged


# ------------------------------------------------------------------------------ end to end with relabelled rows
def _relabelled(mined: Path, out: Path) -> Path:
    """The fake mined set with each even row's first negative relabelled as an extra positive (C2 rows)."""
    import json

    rows = [json.loads(line) for line in (mined / "mined.jsonl").read_text(encoding="utf-8").splitlines()]
    for i, row in enumerate(rows):
        if i % 2 == 0:
            first = row["negatives"].pop(0)
            row["extra_positives"] = [{"id": first["id"], "text": first["text"], "score": 0.55, "judge_score": 3.0}]
    out.mkdir()
    (out / "mined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


@pytest.mark.parametrize("mode", ["each", "logsumexp"])
def test_relabelled_mined_set_trains_with_multi_positive_infonce(mode, tiny_bert_dir, mined, tmp_path) -> None:
    data = _data(tiny_bert_dir, _relabelled(mined, tmp_path / "relabelled"), num_negatives=2, max_extra_positives=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["num_extra_positives"] == 1 and batch["passage_ids"].shape[1] == 4
    absent = batch["passage_ids"][:, 1] == PAD_ID
    assert absent.any() and not absent.all()
    module = _module(tiny_bert_dir, multi_positive=mode, loss="infonce+kd").eval()
    with torch.no_grad():
        got = module.training_step(batch, 0).item()
        q = module.encode(batch["query"])
        p = module.encode(batch["passages"]).reshape(*batch["passage_ids"].shape, -1)
    want, _, _ = reference_loss(q, p, batch["passage_ids"], batch["positive_ids"], 1, mode, tau=TAU)
    teacher = torch.cat([batch["positive_scores"][:, None], batch["extra_positive_scores"],
                         batch["negative_scores"]], dim=1)
    kd, count = reference_kd(torch.einsum("bh,bgh->bg", q, p), teacher, batch["passage_ids"], TAU, TAU)
    assert count == batch["passage_ids"].shape[0]
    assert got == pytest.approx(want + kd, rel=1e-5)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(_module(tiny_bert_dir, multi_positive=mode), datamodule=data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


# --------------------------------------------------------------------------------------------- through nvr fit
@pytest.mark.parametrize("args, key", [
    (["--model.matryoshka_dims", "[64, 16]"], "model.matryoshka_dims"),
    (["--model.loss", "infonce", "--model.kd_temperature", "0.1"], "model.kd_temperature"),
    (["--model.self_mask_margin", "-1"], "model.self_mask_margin"),
], ids=["dims", "kd-without-kd", "margin"])
def test_nvr_fit_bad_objective_setting_is_one_line(args, key, tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                   capsys) -> None:
    from _cli import cli_error
    from test_cli_fit import _config

    line = cli_error(["fit", "--config", str(_config(tmp_path, tiny_bert_dir, tiny_beir_dir)), *args], capsys)
    assert f"config key '{key}'" in line, line
