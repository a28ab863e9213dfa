"""Checkpoint variants: a fresh re-run, user-configured ModelCheckpoints, `best` for other monitors, foreign or
mismatching `--ckpt_path` files, float32 master weights under `precision: bf16-true` (also after a resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _cli import checkpoint_step, cli_error
from _training_data import write_fake_mined
from lightning.pytorch.callbacks import Callback

from nvr.cli.lightning_cli import main as lightning_main

MC = "lightning.pytorch.callbacks.ModelCheckpoint"


def _config(tmp_path: Path, model_dir: Path, beir_dir: Path, name: str = "fit", steps: int = 6, lr: float = 1e-12,
            embedder: dict[str, Any] | None = None, callbacks: list[dict] | None = None, **trainer: Any) -> Path:
    mined = tmp_path / "mined"
    if not mined.exists():
        write_fake_mined(beir_dir, mined, num_negatives=1)
    trainer_cfg = {"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False,
                   "enable_progress_bar": False, "enable_model_summary": False, "val_check_interval": 3,
                   "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                   "default_root_dir": str(tmp_path / "run"), **trainer}
    if callbacks:
        trainer_cfg["callbacks"] = callbacks
    cfg = {
        "trainer": trainer_cfg,
        "model": {"embedder": embedder or {"model_name_or_path": str(model_dir), "pooling": "mean"}, "lr": lr,
                  "warmup_steps": 0, "scheduler": "constant"},
        "data": {"mined_dir": str(mined), "num_negatives": 1, "batch_size": 2, "query_max_length": 8,
                 "passage_max_length": 16, "eval_sets": [{"name": "tiny", "path": str(beir_dir), "split": "test"}]},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_a_fresh_rerun_in_the_same_folder_replaces_last_ckpt(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    """Lightning's version counter wrote the second run's latest state to last-v1.ckpt, so `--ckpt_path last` and
    `init_from: .../last.ckpt` silently took the first run."""
    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, steps=6)
    lightning_main(["fit", "--config", str(config)])
    ckpts = tmp_path / "run" / "checkpoints"
    assert checkpoint_step(ckpts / "last.ckpt") == 6
    lightning_main(["fit", "--config", str(config), "--trainer.max_steps", "4"])
    assert not list(ckpts.glob("last-v*")) and checkpoint_step(ckpts / "last.ckpt") == 4

    from nvr.cli.lightning_cli import resolve_ckpt_path

    best = Path(resolve_ckpt_path("best", [ckpts], "validate"))
    # the second run's best, not the first's: same name, overwritten (no version counter), never a stale -v1
    assert checkpoint_step(best) == 3 and not list(ckpts.glob("*-v1.ckpt"))


def test_a_configured_checkpoint_without_save_last_still_gets_the_latest_state(tiny_bert_dir, tiny_beir_dir,
                                                                              tmp_path, capsys) -> None:
    """every_n_train_steps / save_top_k -1 / own dirpath and no save_last: no last.ckpt was written at all, so a
    crashed run's `--ckpt_path last` started from scratch."""
    own = tmp_path / "own"
    callbacks = [{"class_path": MC, "init_args": {"dirpath": str(own), "every_n_train_steps": 4, "save_top_k": -1}}]
    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, steps=6, callbacks=callbacks)
    lightning_main(["fit", "--config", str(config)])
    assert sorted(p.name for p in own.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert checkpoint_step(own / "last.ckpt") == 6
    lightning_main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "7"])
    assert checkpoint_step(own / "last.ckpt") == 7
    assert not (tmp_path / "run" / "checkpoints").exists()  # no stray default callbacks next to the user's

    # that callback monitors nothing: `best` says so in one line instead of blaming the eval sets
    err = cli_error(["validate", "--config", str(config), "--ckpt_path", "best"], capsys)
    assert "'best'" in err and "monitors a metric" in err and str(own) in err

    # an explicit save_last: false is respected (and `last` for validate is then a clear error)
    off = tmp_path / "off"
    callbacks = [{"class_path": MC, "init_args": {"dirpath": str(off), "every_n_train_steps": 3, "save_last": False}}]
    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, name="off", steps=3, callbacks=callbacks)
    lightning_main(["fit", "--config", str(config)])
    assert not (off / "last.ckpt").exists()
    assert "no last.ckpt in" in cli_error(["test", "--config", str(config), "--ckpt_path", "last"], capsys)


def test_best_follows_the_configured_monitor(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    """A ModelCheckpoint monitoring another metric (per-set ndcg) made `--ckpt_path best` fail."""
    own = tmp_path / "own"
    callbacks = [{"class_path": MC, "init_args": {"dirpath": str(own), "monitor": "val/tiny/ndcg@10", "mode": "max",
                                                   "save_last": True, "filename": "best-{step}"}}]
    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, steps=6, lr=5e-2, callbacks=callbacks)
    lightning_main(["fit", "--config", str(config)])
    best = [p for p in own.iterdir() if p.name.startswith("best-")]
    assert len(best) == 1 and checkpoint_step(own / "last.ckpt") == 6

    from nvr.cli import lightning_cli

    seen: list[str] = []
    original = lightning_cli.resolve_ckpt_path

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lightning_cli, "resolve_ckpt_path", spy)
        assert lightning_main(["validate", "--config", str(config), "--ckpt_path", "best"]) == 0
    assert seen == [str(best[0])]


def test_ckpt_path_to_a_foreign_or_mismatching_checkpoint_is_one_line(tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                                     capsys) -> None:
    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, steps=3,
                     embedder={"model_name_or_path": str(tiny_bert_dir), "pooling": "mean", "lora": {"r": 4}})
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, plain)  # a zip with data.pkl, but no Lightning checkpoint
    for sub in ("fit", "validate"):
        err = cli_error([sub, "--config", str(config), "--ckpt_path", str(plain)], capsys)
        assert str(plain) in err and "not a Lightning checkpoint" in err
    lightning_main(["fit", "--config", str(config)])
    # resuming / evaluating with another LoRA r: a RuntimeError listing every key before, one line now
    for sub in ("fit", "validate"):
        err = cli_error([sub, "--config", str(config), "--ckpt_path", "last", "--model.embedder.lora.r", "8",
                          "--trainer.max_steps", "4"], capsys)
        assert "last.ckpt" in err and "shape mismatch" in err and "(4, 32) vs this model's (8, 32)" in err

    # stage 2 warm start from that LoRA last.ckpt: the adapter weights are loaded; another r / a truncated file
    # are one line naming the file
    from nvr.modeling.config import EmbedderConfig, LoraSettings
    from nvr.training.module import BiEncoderModule

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    stage2 = BiEncoderModule(EmbedderConfig(str(tiny_bert_dir), lora=LoraSettings(r=4)), init_from=str(last))
    own = stage2.state_dict()
    assert saved and all(torch.equal(own[k], v) for k, v in saved.items())
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:3000])
    for source, expected in ((last, "(4, 32) vs this model's (8, 32)"), (truncated, "cannot read checkpoint")):
        err = cli_error(["fit", "--config", str(config), "--model.embedder.lora.r", "8", "--model.init_from",
                          str(source)], capsys)
        assert str(source) in err and expected in err


class _DtypeProbe(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[set, set, set]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainable = {p.dtype for p in pl_module.parameters() if p.requires_grad}
        frozen = {p.dtype for p in pl_module.parameters() if not p.requires_grad}
        state = {v.dtype for s in trainer.optimizers[0].state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.ndim > 0}
        self.seen.append((trainable, frozen, state))


def test_bf16_true_precision_keeps_fp32_master_weights_also_after_resume(tiny_mistral_dir, tiny_beir_dir,
                                                                        tmp_path, monkeypatch) -> None:
    """`precision: bf16-true` casts the whole module after __init__: the head and adapters were trained in bf16."""
    from nvr.cli import lightning_cli

    probe = _DtypeProbe()
    original = lightning_cli.default_callbacks
    monkeypatch.setattr(lightning_cli, "default_callbacks", lambda *a, **k: [*original(*a, **k), probe])
    embedder = {"model_name_or_path": str(tiny_mistral_dir), "pooling": "latent_attention", "bidirectional": True,
                "latent": {"num_latents": 4, "num_heads": 2}, "lora": {"r": 4, "alpha": 8}}
    config = _config(tmp_path, tiny_mistral_dir, tiny_beir_dir, steps=1, lr=1e-3, embedder=embedder,
                     precision="bf16-true", val_check_interval=1)
    lightning_main(["fit", "--config", str(config)])
    lightning_main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "2"])
    assert len(probe.seen) == 2
    for trainable, frozen, state in probe.seen:
        assert trainable == {torch.float32} and frozen == {torch.bfloat16} and state == {torch.float32}
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {v.dtype for v in saved["state_dict"].values()} == {torch.float32}


def test_last_and_best_resolve_to_fsdp2_checkpoint_folders(tmp_path) -> None:
    """Under ModelParallelStrategy last.ckpt is a folder (shards + .metadata + meta.pt): `last` was not found
    (fit silently restarted from scratch) and `best` could not read it."""
    from nvr.cli.lightning_cli import resolve_ckpt_path
    from nvr.utils.errors import InputError

    ckpts = tmp_path / "checkpoints"
    best = ckpts / "step=2-ndcg=0.5000.ckpt"
    for folder in (ckpts / "last.ckpt", best):
        folder.mkdir(parents=True)
        (folder / ".metadata").write_bytes(b"x")
        torch.save({"pytorch-lightning_version": "2.6", "global_step": 4, "callbacks": {
            "ModelCheckpoint{'monitor': 'val/ndcg@10'}": {"monitor": "val/ndcg@10", "best_model_path": str(best)},
        }}, folder / "meta.pt")
    assert resolve_ckpt_path("last", [ckpts], "fit") == str(ckpts / "last.ckpt")
    assert resolve_ckpt_path("best", [ckpts], "test") == str(best)
    (best / "meta.pt").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        resolve_ckpt_path(str(best), [ckpts], "validate")
