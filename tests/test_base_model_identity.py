"""A LoRA checkpoint records its base model's content fingerprint; export, resume and warm start refuse another
base (the adapter would silently be merged into the wrong weights) and accept the same weights anywhere."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from _cli import cli_error
from _training_data import fit_tiny

from nvr.modeling.base_model import BASE_KEY, base_model_record, check_base_model
from nvr.modeling.export import PARTIAL_KEY
from nvr.testing import make_tiny_bert
from nvr.utils.errors import InputError

LORA = {"pooling": "mean", "lora": {"r": 4, "alpha": 8}}


@pytest.fixture
def lora_run(tiny_bert_dir: Path, tiny_beir_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(base folder, last.ckpt) of a 2-step LoRA fit on a private copy of the tiny BERT."""
    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    ckpt = fit_tiny(tmp_path, tiny_beir_dir, {"model_name_or_path": str(base), **LORA})
    return base, ckpt


def _replace_weights(base: Path) -> None:
    """Same architecture and tokenizer, other weights, saved over the base folder (a re-downloaded revision)."""
    other = make_tiny_bert(base.parent / "other", seed=1)
    for weights in other.glob("*.safetensors"):
        shutil.copy(weights, base / weights.name)


def test_checkpoint_records_the_base_fingerprint(lora_run) -> None:
    base, ckpt = lora_run
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved[PARTIAL_KEY]
    record = saved[BASE_KEY]
    assert record == base_model_record(str(base)) and record["model_name_or_path"] == str(base)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])


def test_export_resume_and_warm_start_refuse_other_base_weights(lora_run, tiny_beir_dir, tmp_path, capsys) -> None:
    base, ckpt = lora_run
    _replace_weights(base)
    err = cli_error(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out")], capsys)
    assert str(ckpt) in err and "other base weights" in err and str(base) in err
    assert "model.safetensors" in err and "config.json" not in err  # names what changed
    assert not (tmp_path / "out").exists()
    config = tmp_path / "fit.yaml"
    err = cli_error(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "4"], capsys)
    assert "last.ckpt" in err and "other base weights" in err
    err = cli_error(["validate", "--config", str(config), "--ckpt_path", "last"], capsys)
    assert "other base weights" in err
    err = cli_error(["fit", "--config", str(config), "--model.init_from", str(ckpt),
                     "--trainer.default_root_dir", str(tmp_path / "stage2")], capsys)
    assert str(ckpt) in err and "other base weights" in err


def test_the_same_weights_in_another_folder_are_accepted(lora_run, tmp_path) -> None:
    base, ckpt = lora_run
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    check_base_model(saved, str(moved), ckpt)  # content, not the path, identifies the base
    shutil.rmtree(moved)
    with pytest.raises(InputError, match="is not on this machine"):
        check_base_model(saved, str(moved), ckpt)


def test_files_loading_never_reads_do_not_count(lora_run) -> None:
    """An onnx/ export or a model card added to the same snapshot leaves the base weights as they were."""
    base, ckpt = lora_run
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_bytes(b"onnx")
    (base / "README.md").write_text("card")
    (base / "modules.json").write_text("[]")
    check_base_model(torch.load(ckpt, map_location="cpu", weights_only=False), str(base), ckpt)
    (base / "tokenizer.json").write_text((base / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNKNOWN]"'))
    with pytest.raises(InputError, match=r"tokenizer\.json differ"):  # the tokenizer does change embeddings
        check_base_model(torch.load(ckpt, map_location="cpu", weights_only=False), str(base), ckpt)


def test_a_checkpoint_without_the_record_loads_with_a_warning(lora_run, tmp_path, caplog) -> None:
    base, ckpt = lora_run
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    del saved[BASE_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    from nvr.modeling.export import embedder_from_checkpoint

    with caplog.at_level("WARNING"):
        embedder_from_checkpoint(old)
    assert "no record of the base model's files" in caplog.text


def test_a_full_checkpoint_does_not_depend_on_the_base(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    """All weights are in the file: the base folder changing afterwards is irrelevant to export."""
    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    ckpt = fit_tiny(tmp_path, tiny_beir_dir, {"model_name_or_path": str(base), "pooling": "mean"})
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not saved.get(PARTIAL_KEY) and saved[BASE_KEY] == base_model_record(str(base))
    _replace_weights(base)
    from nvr.modeling.export import embedder_from_checkpoint

    embedder_from_checkpoint(ckpt)


def test_an_adapter_folder_refuses_other_base_weights(tiny_bert_dir, tmp_path) -> None:
    from nvr.modeling.config import EmbedderConfig, LoraSettings
    from nvr.modeling.embedder import META_FILE, Embedder

    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    folder = Embedder.from_config(EmbedderConfig(str(base), lora=LoraSettings(r=4))).save_pretrained(tmp_path / "a")
    Embedder.from_pretrained(folder)
    _replace_weights(base)
    with pytest.raises(InputError, match="other base weights") as err:
        Embedder.from_pretrained(folder)
    assert str(folder / META_FILE) in str(err.value) and "config.model_name_or_path" in str(err.value)


def test_adapter_saves_hash_the_base_once_per_process_and_still_see_new_weights(tiny_bert_dir, tmp_path,
                                                                                 monkeypatch) -> None:
    """Saving an adapter (every export or periodic save of a 7B LoRA run) must not re-read the whole base each
    time, without a cache folder to memoize into; replaced base weights are still hashed again."""
    from nvr.modeling.config import EmbedderConfig, LoraSettings
    from nvr.modeling.embedder import META_FILE, Embedder
    from nvr.utils import fingerprint as fp_module

    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    time.sleep(0.06)  # past the clock tick of the copy: the digests are settled
    embedder = Embedder.from_config(EmbedderConfig(str(base), lora=LoraSettings(r=4)))
    embedder.save_pretrained(tmp_path / "a")
    real, hashed = fp_module.sha256_file, []
    monkeypatch.setattr(fp_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    embedder.save_pretrained(tmp_path / "b")
    assert hashed == []
    assert (tmp_path / "a" / META_FILE).read_text() == (tmp_path / "b" / META_FILE).read_text()
    _replace_weights(base)
    embedder.save_pretrained(tmp_path / "c")
    assert set(hashed) == {"model.safetensors"}  # only the file that changed
    with pytest.raises(InputError, match="other base weights"):
        Embedder.from_pretrained(tmp_path / "a")
