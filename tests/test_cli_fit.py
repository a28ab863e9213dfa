from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _training_data import write_fake_mined

from nvr.cli.lightning_cli import main
from nvr.utils.errors import ConfigError


def _config(tmp_path: Path, model_dir: Path, beir_dir: Path) -> Path:
    mined = write_fake_mined(beir_dir, tmp_path / "mined", num_negatives=2)
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {"embedder": {"model_name_or_path": str(model_dir), "pooling": "mean"}, "lr": 1e-3,
                  "warmup_steps": 1},
        "data": {"mined_dir": str(mined), "num_negatives": 2, "batch_size": 2, "query_max_length": 16,
                 "passage_max_length": 32,
                 "eval_sets": [{"name": "tiny", "path": str(beir_dir), "split": "test"}]},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_print_config_shows_linked_defaults(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config(tmp_path, tiny_bert_dir, tiny_beir_dir)), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["temperature"] == 0.02 and printed["data"]["batch_size"] == 2


def test_fit_then_resume_with_ckpt_path_last_then_validate(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir)
    main(["fit", "--config", str(config)])
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "last.ckpt").exists() and (tmp_path / "run" / "config.yaml").exists()
    assert any(p.name.startswith("step=2-ndcg=") for p in ckpts.iterdir())  # monitored val/ndcg@10
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "3"])
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    assert main(["validate", "--config", str(config), "--ckpt_path", str(ckpts / "last.ckpt")]) == 0
    assert main(["test", "--config", str(config), "--ckpt_path", str(ckpts / "last.ckpt")]) == 0


def test_test_loop_logs_the_validation_metrics_under_test(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    import lightning as L

    from nvr.evaluation.callback import RetrievalEvaluator
    from nvr.evaluation.data import EvalSetConfig
    from nvr.modeling.config import EmbedderConfig
    from nvr.training.datamodule import MinedDataModule
    from nvr.training.module import BiEncoderModule

    mined = write_fake_mined(tiny_beir_dir, tmp_path / "mined", num_negatives=1)
    module = BiEncoderModule(embedder=EmbedderConfig(model_name_or_path=str(tiny_bert_dir)))
    data = MinedDataModule(mined_dir=str(mined), tokenizer=str(tiny_bert_dir), num_negatives=1, batch_size=2,
                           eval_sets=[EvalSetConfig(name="tiny", path=str(tiny_beir_dir), split="test")])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RetrievalEvaluator()])
    val = trainer.validate(module, datamodule=data, verbose=False)[0]
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    assert set(test) == {k.replace("val/", "test/", 1) for k in val}
    assert test["test/tiny/ndcg@10"] == pytest.approx(val["val/tiny/ndcg@10"], abs=1e-6)


def test_unknown_subcommand_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fit"):
        main(["predict"])


# ------------------------------------------------------------------------------------ precision: auto
def _cli(config: Path, *extra: str):
    from nvr.cli.lightning_cli import NvrCLI
    from nvr.training.datamodule import MinedDataModule
    from nvr.training.module import BiEncoderModule

    return NvrCLI(BiEncoderModule, MinedDataModule, args=["--config", str(config), *extra], run=False)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("given", [[], ["--trainer.precision", "auto"]], ids=["unset", "auto"])
def test_precision_auto_is_bf16_mixed_only_where_bf16_is_native(native, given, tiny_bert_dir, tiny_beir_dir,
                                                                 tmp_path, monkeypatch) -> None:
    import nvr.utils.precision

    monkeypatch.setattr(nvr.utils.precision, "bf16_supported", lambda device="cpu": native)
    cli = _cli(_config(tmp_path, tiny_bert_dir, tiny_beir_dir), *given)
    assert cli.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert cli.config["trainer"]["precision"] == "auto"  # recorded as given: a resume re-resolves on its machine
    # fp32 master weights under bf16-mixed
    assert all(p.dtype == torch.float32 for p in cli.model.parameters() if p.requires_grad)


def test_an_explicit_precision_is_respected(tiny_bert_dir, tiny_beir_dir, tmp_path, monkeypatch) -> None:
    import nvr.utils.precision

    monkeypatch.setattr(nvr.utils.precision, "bf16_supported", lambda device="cpu": True)
    cli = _cli(_config(tmp_path, tiny_bert_dir, tiny_beir_dir), "--trainer.precision", "32-true")
    assert cli.trainer.precision == "32-true"


def test_resolve_trainer_precision_per_accelerator(monkeypatch) -> None:
    import nvr.utils.precision
    from nvr.cli.lightning_cli import resolve_trainer_precision

    seen: list[str] = []
    monkeypatch.setattr(nvr.utils.precision, "bf16_supported", lambda device="cpu": seen.append(device) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_trainer_precision("cpu") == "bf16-mixed" and seen[-1] == "cpu"
    assert resolve_trainer_precision("gpu") == "bf16-mixed" and seen[-1] == "cuda"
    assert resolve_trainer_precision(None) == "bf16-mixed" and seen[-1] == "cpu"  # auto without CUDA
    assert resolve_trainer_precision("tpu") == "32-true"


@pytest.mark.parametrize("native", [True, False])
def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(native, monkeypatch, caplog) -> None:
    import nvr.utils.precision
    from nvr.cli.lightning_cli import warn_emulated_bf16

    monkeypatch.setattr(nvr.utils.precision, "bf16_supported", lambda device="cpu": native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="nvr.cli.lightning_cli"):
        assert warn_emulated_bf16("bf16-mixed", "cpu") is (not native)
        assert warn_emulated_bf16("bf16-true", None) is (not native)  # accelerator auto -> cpu here
        assert not warn_emulated_bf16("32-true", "cpu") and not warn_emulated_bf16("bf16-mixed", "gpu")
    assert ("generic fallback" in caplog.text) is (not native)


# ------------------------------------------------------------------------------ finite hyper-parameters
@pytest.mark.parametrize("path,value", [
    (("lr",), float("nan")), (("temperature",), float("inf")), (("weight_decay",), float("-inf")),
    (("false_negative_perc",), float("nan")), (("embedder", "lora"), {"dropout": float("nan")}),
    (("embedder", "lora"), {"r": 0}),
], ids=["lr", "temperature", "weight_decay", "false_negative_perc", "lora.dropout", "lora.r"])
def test_non_finite_model_float_is_a_one_line_config_error(path, value, tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                           capsys) -> None:
    from nvr.cli.main import main as nvr_main

    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir)
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    node = cfg["model"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        nvr_main(["fit", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    if isinstance(value, dict):  # LoraSettings' own range check, raised inside jsonargparse's instantiation
        assert f"embedder.lora.{next(iter(value))}" in err and "must be" in err, err
    else:
        assert f"model.{path[0]}" in err and "finite" in err, err
