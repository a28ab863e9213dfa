"""Issue 11 "Quiet, predictable CLI" and "Observability", through the real ``nvr`` command.

Subprocess runs (stderr is a pipe, as in a log file) check that the known third-party notices are gone unless
``--verbose`` / ``NVR_VERBOSE=1``, that progress comes as plain ``nvr <stage>:`` lines, and that ``metrics.csv``
holds the final training step of a run shorter than ``log_every_n_steps``. In-process runs check the one-line
"did you mean" errors, ``--optimizer``, ``--version``, every sub-command's ``--help`` and the TensorBoard logger.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _cli import assert_one_line_error, run_cli
from _training_data import write_fake_mined

NOISE = {
    "litlogger tip": "💡 Tip",
    "tensorboardX notice": "tensorboardX",
    "LeafSpec deprecation": "LeafSpec",
    "bitsandbytes gemm": "Failed to load CPU gemm_4bit_forward",
    "faiss loader": "Loading faiss",
    "model summary precision": "is not supported by the model summary",
    "logging interval": "smaller than the logging interval",
    "checkpoint folder": "exists and is not empty",
    "bad epoch display": "Epoch 0/-2",
    "v_num": "v_num",
}


@pytest.fixture(autouse=True)
def _not_verbose(monkeypatch) -> None:
    """These tests check the default (quiet) behaviour: a developer's NVR_VERBOSE must not change it."""
    monkeypatch.delenv("NVR_VERBOSE", raising=False)


def _nvr(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "NVR_VERBOSE"}
    full_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    return subprocess.run([sys.executable, "-m", "nvr", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _fit_config(tmp_path: Path, model: Path, beir: Path, lora: bool = False, **trainer) -> Path:
    mined = write_fake_mined(beir, tmp_path / "mined", num_negatives=2)
    embedder: dict = {"model_name_or_path": str(model), "pooling": "mean"}
    if lora:
        embedder["lora"] = {"r": 2, "alpha": 4}  # imports peft (and so bitsandbytes)
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "val_check_interval": 3,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path / "run"), **trainer},
        "model": {"embedder": embedder, "lr": 1e-3, "warmup_steps": 1},
        "data": {"mined_dir": str(mined), "num_negatives": 2, "batch_size": 2, "query_max_length": 16,
                 "passage_max_length": 32, "eval_sets": [{"name": "tiny", "path": str(beir), "split": "test"}]},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _metrics_rows(run: Path) -> list[dict[str, str]]:
    (csv_file,) = list((run / "lightning_logs").glob("version_*/metrics.csv"))
    with open(csv_file, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------- subprocess: quiet fit
@pytest.mark.slow
def test_fit_is_quiet_shows_line_progress_and_logs_the_final_step(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir, lora=True)
    done = _nvr("fit", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for what, text in NOISE.items():
        assert text not in output, f"{what}: {text!r} in\n{output[-3000:]}"
    assert "Traceback" not in output
    # not a terminal: plain lines instead of carriage-return bars
    assert "nvr train: starting at step 0 (until 3 steps)" in done.stderr
    assert "nvr validate: encoding eval sets at step 3" in done.stderr
    assert "nvr validate: done in" in done.stderr and "val/ndcg@10" in done.stderr
    assert "nvr train: done at step 3" in done.stderr
    assert "\r" not in done.stderr.split("nvr train: starting")[1]  # no tqdm redraws from the training loop
    # log_every_n_steps (50) > 3 steps: the final step's loss is still in metrics.csv, at the step Lightning uses
    rows = _metrics_rows(tmp_path / "run")
    train = [r for r in rows if r.get("train/loss")]
    assert [r["step"] for r in train] == ["2"], rows
    assert float(train[0]["train/loss"]) > 0
    assert any(r.get("val/ndcg@10") for r in rows)


@pytest.mark.slow
def test_verbose_flag_after_the_command_keeps_the_notices(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir)
    done = _nvr("fit", "--verbose", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert NOISE["litlogger tip"] in done.stderr and NOISE["logging interval"] in done.stderr
    assert NOISE["LeafSpec deprecation"] in done.stderr


@pytest.mark.slow
def test_eval_is_quiet_about_faiss_unless_nvr_verbose(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    pytest.importorskip("faiss")
    args = ["eval", "--model", str(tiny_bert_dir), "--beir", str(tiny_beir_dir), "--cache_dir", str(tmp_path / "c"),
            "--device", "cpu"]
    quiet = _nvr(*args, "--output", str(tmp_path / "a.json"), cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert NOISE["faiss loader"] not in quiet.stderr and "ndcg@10" in quiet.stdout
    loud = _nvr(*args, "--output", str(tmp_path / "b.json"), cwd=tmp_path, env={"NVR_VERBOSE": "1"})
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert NOISE["faiss loader"] in loud.stderr


def test_version_names_nvr_and_its_dependencies(tmp_path) -> None:
    for args in (["--version"], ["fit", "--version"]):
        done = _nvr(*args, cwd=tmp_path, timeout=60)
        assert done.returncode == 0, done.stderr
        line = done.stdout.strip()
        assert len(line.splitlines()) == 1 and line.startswith("nvr 0.")
        for package in ("torch", "transformers", "lightning", "python"):
            assert f"{package} " in line, line


# ------------------------------------------------------------------------------- in-process: one-line errors
def test_unknown_command_suggests_the_nearest(capsys) -> None:
    code, err = run_cli("fitt", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unknown command 'fitt'" in err and "did you mean 'fit'?" in err and "ablate" in err


@pytest.mark.parametrize("command,args,fragments", [
    ("eval", ["--modle", "m"], ["'modle'", "did you mean --model?"]),
    ("eval", ["--kvalues=10"], ["'kvalues'", "did you mean --k_values?"]),
    ("export", ["--chekpoint", "x.ckpt", "--output", "o"], ["'chekpoint'", "did you mean --checkpoint?"]),
    ("ablate", ["--config", "spec.yaml", "--dryrun"], ["'dryrun'", "did you mean --dry_run?"]),
    ("mine", ["--num_negativs", "3"], ["'num_negativs'", "did you mean --num_negatives?"]),
    ("mine", ["--filter.prec", "0.9"], ["'filter.prec'", "did you mean --filter.perc?"]),
    ("mine", ["--zzzz", "1"], ["'zzzz'", "see nvr mine --help"]),
])
def test_unknown_option_is_one_line_with_a_suggestion(command, args, fragments, capsys) -> None:
    code, err = run_cli(command, *args, capsys=capsys)
    last = assert_one_line_error(code, err, *fragments, command=command)
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    assert "unknown option" in last


@pytest.mark.parametrize("text,key,line,suggestion", [
    ("num_negativs: 3\n", "num_negativs", 1, "num_negatives"),
    ("seed: 1\nfilter:\n  method: topk_percpos\n  prec: 0.9\n", "filter.prec", 4, "filter.perc"),
    ("teachers:\n  - name: t\n    kind: bm25\n    nmae: u\n", "teachers.nmae", 4, "teachers.name"),
])
def test_unknown_key_in_a_mine_config_names_file_and_line(text, key, line, suggestion, tmp_path, capsys) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(text, encoding="utf-8")
    code, err = run_cli("mine", "--config", str(path), capsys=capsys)
    assert_one_line_error(code, err, f"{path}:{line}:", f"unknown key '{key}'", f"did you mean '{suggestion}'?")


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_unknown_fit_key_on_the_command_line_and_in_the_config(command, tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                              capsys) -> None:
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir)
    code, err = run_cli(command, "--config", str(config), "--model.lrr", "0.1", capsys=capsys)
    assert_one_line_error(code, err, "'model.lrr'", "unknown option --model.lrr", "did you mean --model.lr?",
                          command=command)
    assert "usage:" not in err
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["trainer"]["max_stepz"] = 3
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    line = next(i for i, t in enumerate(config.read_text().splitlines(), 1) if t.strip().startswith("max_stepz"))
    code, err = run_cli(command, "--config", str(config), capsys=capsys)
    assert_one_line_error(code, err, f"{config}:{line}:", "unknown key 'trainer.max_stepz'",
                          "did you mean 'trainer.max_steps'?", command=command)


def test_bad_value_and_missing_logger_argument_are_one_line(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys) -> None:
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir)
    code, err = run_cli("fit", "--config", str(config), "--model.lr", "abc", capsys=capsys)
    assert_one_line_error(code, err, "'model.lr'", "abc", command="fit")
    code, err = run_cli("fit", "--config", str(config), "--trainer.logger", "TensorBoardLogger", capsys=capsys)
    assert_one_line_error(code, err, "'trainer.logger'", "save_dir", "--trainer.logger.save_dir", command="fit")


@pytest.mark.parametrize("args", [["--optimizer", "AdamW"], ["--optimizer.lr", "0.1"],
                                  ["--lr_scheduler", "StepLR"]], ids=["optimizer", "optimizer.lr", "lr_scheduler"])
def test_optimizer_options_are_refused_not_silently_applied(args, tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                            capsys) -> None:
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir)
    code, err = run_cli("fit", "--config", str(config), *args, capsys=capsys)
    key = args[0][2:].split(".")[0]
    assert_one_line_error(code, err, f"'{key}'", "model.lr", "model.warmup_steps", command="fit")
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    code, err = run_cli("fit", "--config", str(config), capsys=capsys)
    assert_one_line_error(code, err, "'optimizer'", "model.lr", command="fit")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["mine", "fit", "validate", "test", "eval", "export", "ablate"])
def test_help_text_has_no_function_reprs(command, capsys) -> None:
    from nvr.cli.main import main as nvr_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        nvr_main([command, "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and "--" in text
    for bad in ("<function", "<lambda>", " object at 0x"):
        assert bad not in text, f"{bad!r} in nvr {command} --help"


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_logger_without_tensorboard_is_one_line(tiny_bert_dir, tiny_beir_dir, tmp_path, monkeypatch,
                                                            capsys) -> None:
    from lightning.fabric.loggers import tensorboard

    monkeypatch.setattr(tensorboard, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tensorboard, "_TENSORBOARDX_AVAILABLE", False)
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir)
    code, err = run_cli("fit", "--config", str(config), "--trainer.logger", "TensorBoardLogger",
                        "--trainer.logger.save_dir", str(tmp_path / "tb"), capsys=capsys)
    assert_one_line_error(code, err, "'trainer.logger'", "pip install 'nvr[tensorboard]'", command="fit")
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(tmp_path / "tb")}}
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    code, err = run_cli("fit", "--config", str(config), capsys=capsys)
    assert_one_line_error(code, err, "'trainer.logger'", "nvr[tensorboard]", command="fit")


def test_documented_tensorboard_example_writes_events(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys) -> None:
    pytest.importorskip("tensorboard")
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir, enable_progress_bar=False)
    code, err = run_cli("fit", "--config", str(config), "--trainer.logger", "TensorBoardLogger",
                        "--trainer.logger.save_dir", str(tmp_path / "run" / "tb"), capsys=capsys)
    assert code == 0, err[-3000:]
    assert list((tmp_path / "run" / "tb").glob("lightning_logs/version_0/events.out.tfevents.*"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_default_logger_is_csv_even_with_tensorboard_installed(tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                               capsys) -> None:
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir, enable_progress_bar=False)
    code, err = run_cli("fit", "--config", str(config), capsys=capsys)
    assert code == 0, err[-3000:]
    rows = _metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows if r.get("train/loss")] == ["2"]
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------------------------- disk
@pytest.mark.slow
def test_rerun_into_the_same_folder_never_writes_versioned_names(tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                                 capsys, caplog, recwarn) -> None:
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir, enable_progress_bar=False)
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="nvr.cli.lightning_cli"):
            code, err = run_cli("fit", "--config", str(config), capsys=capsys)
        assert code == 0, err[-3000:]
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "last.ckpt" in names and not any("-v1" in n for n in names), names
    assert len(names) == 2, names  # same seed, same step and score: the best file is overwritten, not versioned
    assert "1 checkpoint(s) of an earlier run" in caplog.text and "is from an earlier run" in caplog.text
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]  # Lightning's, superseded


# ------------------------------------------------------------------------------------------------ progress
def test_progress_lines_label_steps_and_eval_sets(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys) -> None:
    """A configured NvrProgressBar replaces the default one; line_interval_s 0 prints every batch."""
    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir)
    code, err = run_cli("fit", "--config", str(config), "--trainer.callbacks+=nvr.cli.progress.NvrProgressBar",
                        "--trainer.callbacks.line_interval_s=0", "--trainer.callbacks.lines=true", capsys=capsys)
    assert code == 0, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("nvr ")]
    steps = [ln.split("|")[0].strip() for ln in lines if ln.startswith("nvr train: step")]
    assert steps == ["nvr train: step 1/3", "nvr train: step 2/3", "nvr train: step 3/3"], lines
    assert any("train/loss" in ln and "eta" in ln for ln in lines if ln.startswith("nvr train: step"))
    assert any(ln.startswith("nvr validate: tiny queries batch 1/") for ln in lines), lines
    assert any(ln.startswith("nvr validate: tiny corpus batch 1/") for ln in lines), lines
    assert "v_num" not in err and "Epoch 0/-2" not in err


@pytest.mark.parametrize("max_steps,max_epochs,total,desc", [(4, -1, 4, "train (epoch"), (-1, 2, 4, "epoch 2/2")])
def test_terminal_bar_counts_steps_or_epochs(max_steps, max_epochs, total, desc, tmp_path) -> None:
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from nvr.cli.progress import NvrProgressBar

    bar = NvrProgressBar(lines=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=max_epochs, limit_train_batches=4,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[bar], default_root_dir=str(tmp_path))
    trainer.fit(BoringModel())
    train_bar = bar.train_progress_bar
    assert train_bar.desc.startswith(desc), train_bar.desc
    # by steps: the whole run (4 steps); by epochs: the current epoch's 4 batches
    assert train_bar.total == total and train_bar.n == total
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)


# ------------------------------------------------------------------------------------------ mining in fit
@pytest.mark.slow
def test_mining_inside_fit_prints_the_nvr_mine_summary(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys) -> None:
    from _reliability import mine_config

    from nvr.cli.main import main as nvr_main
    from nvr.mining.report import print_mining_summary

    config = _fit_config(tmp_path, tiny_bert_dir, tiny_beir_dir, enable_progress_bar=False)
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    mining = mine_config(tiny_beir_dir, tiny_bert_dir, tmp_path / "unused", tmp_path / "cache")
    mining.pop("output_dir")
    cfg["data"].pop("mined_dir")
    cfg["data"]["mining"] = mining
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        nvr_main(["fit", "--config", str(config)])
    assert exc.value.code == 0
    fit_out = capsys.readouterr().out
    (mined,) = [p for p in (tmp_path / "cache" / "mined").iterdir() if p.is_dir()]
    print_mining_summary(mined)
    summary = capsys.readouterr().out
    assert summary.startswith("teacher") and f"mined -> {mined}" in summary and "queries " in summary
    assert summary in fit_out  # the same lines `nvr mine` prints, once
    with pytest.raises(SystemExit):  # a second fit reuses the mined set: no summary
        nvr_main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run2")])
    assert "mined ->" not in capsys.readouterr().out
