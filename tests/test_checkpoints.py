"""Checkpoints are what their names say: last.ckpt = the latest step, best = monitored, --ckpt_path resolution."""

from __future__ import annotations

from pathlib import Path

import yaml
from _cli import checkpoint_step, cli_error
from _training_data import write_fake_mined

from nvr.cli.lightning_cli import main as lightning_main


def _config(tmp_path: Path, model_dir: Path, beir_dir: Path, lr: float, steps: int, callbacks=None) -> Path:
    mined = write_fake_mined(beir_dir, tmp_path / "mined", num_negatives=1)
    trainer = {"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False,
               "enable_progress_bar": False, "enable_model_summary": False, "val_check_interval": 4,
               "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path / "run")}
    if callbacks:
        trainer["callbacks"] = callbacks
    cfg = {
        "trainer": trainer,
        "model": {"embedder": {"model_name_or_path": str(model_dir), "pooling": "mean"}, "lr": lr,
                  "warmup_steps": 0, "scheduler": "constant"},
        "data": {"mined_dir": str(mined), "num_negatives": 1, "batch_size": 2, "query_max_length": 8,
                 "passage_max_length": 16, "eval_sets": [{"name": "tiny", "path": str(beir_dir), "split": "test"}]},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_last_holds_the_final_step_when_validation_never_improves(tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                                  capsys) -> None:
    # lr 1e-12: weights (and so val/ndcg@10) never change, so the monitored top-1 stays at step 4
    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, lr=1e-12, steps=12)
    lightning_main(["fit", "--config", str(config)])
    ckpts = tmp_path / "run" / "checkpoints"
    best = [p for p in ckpts.iterdir() if p.name.startswith("step=")]
    assert [p.name.split("-")[0] for p in best] == ["step=4"]
    assert checkpoint_step(ckpts / "last.ckpt") == 12

    lightning_main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "14"])
    assert checkpoint_step(ckpts / "last.ckpt") == 14
    assert not list((tmp_path / "run").glob("**/last-v*.ckpt"))

    from nvr.cli.lightning_cli import resolve_ckpt_path

    assert resolve_ckpt_path("best", [ckpts], "validate") == str(best[0])
    assert resolve_ckpt_path("last", [ckpts], "test") == str(ckpts / "last.ckpt")
    assert lightning_main(["validate", "--config", str(config), "--ckpt_path", "best"]) == 0

    # validate/test never fall back to the base model: a run folder without checkpoints is a one-line error
    err = cli_error(["validate", "--config", str(config), "--ckpt_path", "last", "--trainer.default_root_dir",
                      str(tmp_path / "elsewhere")], capsys)
    assert "ckpt_path" in err and str(tmp_path / "elsewhere" / "checkpoints") in err and "last.ckpt" in err
    err = cli_error(["test", "--config", str(config), "--ckpt_path", "best", "--trainer.default_root_dir",
                      str(tmp_path / "elsewhere")], capsys)
    assert "'best'" in err and "val/ndcg@10" in err

    # a missing or truncated checkpoint file: one line naming the file
    missing = tmp_path / "nope.ckpt"
    assert str(missing) in cli_error(["validate", "--config", str(config), "--ckpt_path", str(missing)], capsys)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((ckpts / "last.ckpt").read_bytes()[:5000])
    err = cli_error(["fit", "--config", str(config), "--ckpt_path", str(truncated)], capsys)
    assert str(truncated) in err and "truncated" in err


def test_resume_from_last_continues_at_the_final_step(tiny_bert_dir, tiny_beir_dir, tmp_path, monkeypatch) -> None:
    """A configured ModelCheckpoint(save_last=True, monitored) is also served by LastCheckpoint."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "mine"), "monitor": "val/ndcg@10", "mode": "max",
                                "save_top_k": 1, "save_last": True}}]
    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, lr=1e-12, steps=6, callbacks=callbacks)
    lightning_main(["fit", "--config", str(config)])
    last = tmp_path / "mine" / "last.ckpt"
    assert checkpoint_step(last) == 6

    from lightning.pytorch.callbacks import Callback

    seen: list[int] = []

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(trainer.global_step)

    from nvr.cli import lightning_cli

    original = lightning_cli.default_callbacks

    def with_probe(*args, **kwargs):
        return [*original(*args, **kwargs), FirstStep()]

    monkeypatch.setattr(lightning_cli, "default_callbacks", with_probe)
    lightning_main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "7"])
    assert seen == [6] and checkpoint_step(last) == 7
