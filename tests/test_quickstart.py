"""``nvr quickstart`` is ``nvr fit`` on the quick-start recipe plus base eval, export and eval of the export.

The recipe (``configs/fit/quickstart_minilm_cranfield.yaml``) is run with a tiny model and tiny BEIR data swapped in
(paths and sizes only), through the real ``nvr`` entry point.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _cli import cli_error

import nvr.evaluation.data as data_module
import nvr.modeling.encode as encode_module
from nvr.cli.main import main as nvr_main
from nvr.cli.quickstart import DEFAULT_CONFIG, EXPORT_NAME, RESULTS_NAME, fit_argv, parse_args
from nvr.data.beir import load_beir
from nvr.modeling.encode import encode_texts
from nvr.training.module import BiEncoderModule

st = pytest.importorskip("sentence_transformers")

TEXTS = ["wing lift drag", "heat transfer boundary layer study of the flow"]


def tiny_recipe(tmp_path: Path, model: Path, beir: Path) -> Path:
    """The shipped recipe with only model, data, cache and sizes replaced."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    cfg["trainer"].update(accelerator="cpu", max_steps=3, val_check_interval=3, enable_progress_bar=False,
                          default_root_dir=str(tmp_path / "run"))
    cfg["model"]["embedder"]["model_name_or_path"] = str(model)
    cfg["model"]["lr"] = 5e-2
    mining = cfg["data"]["mining"]
    mining["data"]["beir_dir"] = str(beir)
    mining["teachers"][0].update(model_name_or_path=str(model), passage_max_length=48, query_max_length=16)
    mining.update(num_negatives=2, depth=10, cache_dir=str(tmp_path / "cache"))
    cfg["data"].update(batch_size=4, passage_max_length=48, query_max_length=16)
    cfg["data"]["eval_sets"] = [{"name": "tiny", "path": str(beir), "split": "test", "query_max_length": 16,
                                 "passage_max_length": 48}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_ok(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        nvr_main(argv)
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err[-3000:]
    return out.out


def module_embeddings(ckpt: Path) -> np.ndarray:
    module = BiEncoderModule.load_from_checkpoint(str(ckpt), map_location="cpu")
    return encode_texts(module.embedder.eval(), TEXTS, prefix="", max_length=48, show_progress=False)


def state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_quickstart_is_fit_plus_export_and_evaluation(tmp_path, tiny_bert_dir, tiny_beir_dir, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, tiny_beir_dir)
    printed = run_ok(["quickstart", "--config", str(recipe)], capsys)
    root = tmp_path / "run"
    results = json.loads((root / RESULTS_NAME).read_text())
    for phase in ("before", "after"):
        assert 0.0 <= results[phase]["tiny"]["ndcg@10"] <= 1.0
    assert results["before"] != results["after"], "fine-tuning should change the metrics"
    assert results["global_step"] == 3
    ckpt = Path(results["checkpoint"])
    assert ckpt.parent == root / "checkpoints" and ckpt.is_file() and results["checkpoint_kind"].startswith("best")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3

    # the export is a SentenceTransformer folder with a model card, holding the trained weights
    export = root / EXPORT_NAME
    assert results["export_dir"] == str(export) and results["sentence_transformers"] is True
    assert "fine-tuned from" in (export / "README.md").read_text()
    model = st.SentenceTransformer(str(export), device="cpu")
    np.testing.assert_allclose(model.encode_document(TEXTS), module_embeddings(ckpt), atol=1e-5)
    # "after" is the exported folder evaluated with the eval set's settings: the fit's own last validation agrees
    assert results["after"]["tiny"]["ndcg@10"] == pytest.approx(results["fit_validation"]["val/tiny/ndcg@10"],
                                                                abs=1e-6)
    assert f'SentenceTransformer("{export}")' in printed and "ndcg@10" in printed and "before" in printed
    assert f"nvr eval --model {export} --beir {tiny_beir_dir}" in printed

    # one recipe: `nvr fit` with the same config trains the same weights
    fit_root = tmp_path / "fit"
    run_ok(["fit", "--config", str(recipe), "--trainer.default_root_dir", str(fit_root)], capsys)
    ours, theirs = state(root / "checkpoints" / "last.ckpt"), state(fit_root / "checkpoints" / "last.ckpt")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    # a second run in the same folder points at its own checkpoint and replaces the export (no stale last-v1)
    printed = run_ok(["quickstart", "--config", str(recipe), "--trainer.max_steps", "2",
                      "--trainer.val_check_interval", "2"], capsys)
    again = json.loads((root / RESULTS_NAME).read_text())
    ckpt2 = Path(again["checkpoint"])
    assert again["global_step"] == 2 and ckpt2 != ckpt
    assert torch.load(ckpt2, map_location="cpu", weights_only=False)["global_step"] == 2
    assert not list((root / "checkpoints").glob("last-v*.ckpt"))
    model = st.SentenceTransformer(str(export), device="cpu")
    np.testing.assert_allclose(model.encode_document(TEXTS), module_embeddings(ckpt2), atol=1e-5)
    assert str(ckpt2) in printed


def test_quickstart_corpus_encodes(tmp_path, tiny_bert_dir, tiny_beir_dir, monkeypatch, capsys):
    """The base model's eval and mining share one corpus encode (same key: the base eval runs first and mining
    reuses it); the in-fit validation encodes with the trained weights, the export's eval once more."""
    encodes: list[int] = []
    real = encode_module.encode_texts

    def counting(embedder, texts, **kwargs):
        encodes.append(len(texts))
        return real(embedder, texts, **kwargs)

    validation_rows: list[int] = []
    real_call = data_module.EvalCollator.__call__

    def collating(self, positions):
        if self.kind == "corpus":
            validation_rows.append(len(positions))
        return real_call(self, positions)

    monkeypatch.setattr(encode_module, "encode_texts", counting)
    monkeypatch.setattr(data_module.EvalCollator, "__call__", collating)
    n_docs = len(load_beir(str(tiny_beir_dir), "test").corpus)
    run_ok(["quickstart", "--config", str(tiny_recipe(tmp_path, tiny_bert_dir, tiny_beir_dir))], capsys)
    assert encodes.count(n_docs) == 2  # base eval (mining reused it) + the exported folder
    assert sum(validation_rows) == n_docs  # the in-fit validation at the last step


def test_quickstart_needs_eval_sets_and_checkpoints(tmp_path, tiny_bert_dir, tiny_beir_dir, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, tiny_beir_dir)
    line = cli_error(["quickstart", "--config", str(recipe), "--data.eval_sets", "[]"], capsys)
    assert "data.eval_sets" in line
    line = cli_error(["quickstart", "--config", str(recipe), "--trainer.enable_checkpointing", "false"], capsys)
    assert "trainer.enable_checkpointing" in line
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_quickstart_default_is_the_shipped_recipe(monkeypatch, tmp_path):
    monkeypatch.chdir(DEFAULT_CONFIG.parents[2])
    options = parse_args(["--trainer.max_steps", "5"])
    assert fit_argv(options) == ["fit", "--config", str(DEFAULT_CONFIG), "--trainer.max_steps", "5"]
    monkeypatch.chdir(tmp_path)  # the recipe's data paths are relative to the repository root
    with pytest.raises(Exception, match="--config"):
        parse_args([])


def test_quickstart_cli_help_runs(capsys):
    with pytest.raises(SystemExit) as exc:
        nvr_main(["quickstart", "--help"])
    assert exc.value.code == 0
    assert "--export_dir" in capsys.readouterr().out
