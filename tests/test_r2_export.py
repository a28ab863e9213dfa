"""Export variants: a bf16 latent-attention + LoRA checkpoint keeps its float32 head, max lengths above the
position limit are clamped, the model card of an nvr-only export does not describe sentence-transformers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _training_data import fit_tiny, write_fake_mined

from nvr.cli.lightning_cli import main as lightning_main
from nvr.cli.main import main as nvr_main
from nvr.modeling.embedder import POOLER_FILE, Embedder
from nvr.modeling.encode import encode_texts
from nvr.training.module import BiEncoderModule

TEXTS = ["wing lift drag", "shock wave supersonic flow", "heat transfer boundary layer study of the flow"]


def _fit(tmp_path: Path, beir_dir: Path, embedder: dict) -> Path:
    return fit_tiny(tmp_path, beir_dir, embedder)


def _export(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        nvr_main(["export", *argv])
    assert exc.value.code == 0


def test_bf16_latent_attention_lora_export_keeps_the_float32_head(tiny_mistral_dir, tiny_beir_dir, tmp_path) -> None:
    """The head trains in float32 over a bf16 backbone; the export loaded it into the bf16 module (rounded)."""
    embedder = {"model_name_or_path": str(tiny_mistral_dir), "pooling": "latent_attention", "bidirectional": True,
                "dtype": "bfloat16", "latent": {"num_latents": 4, "num_heads": 2}, "lora": {"r": 4, "alpha": 8}}
    ckpt = _fit(tmp_path, tiny_beir_dir, embedder)
    module = BiEncoderModule.load_from_checkpoint(str(ckpt), map_location="cpu").embedder.eval()
    ours = encode_texts(module, TEXTS, max_length=24, show_progress=False)

    for merge in ("false", "true"):
        out = tmp_path / f"export_merge_{merge}"
        _export(["--checkpoint", str(ckpt), "--output", str(out), "--sentence_transformers", "false",
                 "--merge_lora", merge])
        from safetensors.torch import load_file

        assert {t.dtype for t in load_file(str(out / POOLER_FILE)).values()} == {torch.float32}
        loaded = Embedder.from_pretrained(out).eval()
        assert {p.dtype for p in loaded.pooler.parameters()} == {torch.float32}
        if merge == "true":  # a plain folder: AutoModel / ST read the attention direction from config.json
            assert json.loads((out / "config.json").read_text())["is_causal"] is False
        assert loaded.backbone.config.is_causal is False
        theirs = encode_texts(loaded, TEXTS, max_length=24, show_progress=False)
        # unmerged: the very same computation; merged: LoRA folded into bf16 weights (bf16 rounding only)
        np.testing.assert_allclose(theirs, ours, atol=1e-6 if merge == "false" else 1e-2)

        card = (out / "README.md").read_text()
        assert "library_name: nvr" in card and "sentence-transformers" not in card
        assert "Embedder.from_pretrained" in card and "max_length=24" in card and "pooling: latent_attention" in card


def test_export_clamps_max_lengths_to_the_position_limit(tiny_bert_dir, tmp_path, caplog) -> None:
    """ST with max_seq_length 1024 on a 128-position model crashes on the first long text."""
    import sentence_transformers as st

    from nvr.modeling.config import EmbedderConfig

    folder = Embedder.from_config(EmbedderConfig(str(tiny_bert_dir))).save_pretrained(tmp_path / "emb")
    out = tmp_path / "exported"
    with caplog.at_level(logging.WARNING, logger="nvr.modeling.export"):
        _export(["--embedder", str(folder), "--output", str(out), "--max_length", "1024"])
    assert "--max_length: 1024 exceeds the 128 positions" in caplog.text
    assert "query_max_length (not given: training's value, else the passage length): 1024 exceeds" in caplog.text
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert json.loads((out / "config_sentence_transformers.json").read_text())["nvr"]["query_max_length"] == 128
    model = st.SentenceTransformer(str(out), device="cpu")
    assert model.encode([" ".join(["wing lift drag"] * 200)]).shape == (1, 32)


def test_model_card_names_the_step_its_metrics_come_from(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    """last.ckpt is also written at the end of fit, after the last validation: the card said the metrics were
    measured at the checkpoint's step."""
    mined = write_fake_mined(tiny_beir_dir, tmp_path / "mined", num_negatives=1)
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 1,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {"embedder": {"model_name_or_path": str(tiny_bert_dir)}, "lr": 5e-2, "warmup_steps": 0},
        "data": {"mined_dir": str(mined), "num_negatives": 1, "batch_size": 2, "query_max_length": 12,
                 "passage_max_length": 24,
                 "eval_sets": [{"name": "tiny", "path": str(tiny_beir_dir), "split": "test"}]},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    lightning_main(["fit", "--config", str(path)])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    record = torch.load(ckpt, map_location="cpu", weights_only=False)["nvr_encoding"]
    assert record["global_step"] == 3 and record["metrics_step"] == 2
    out = tmp_path / "exported"
    _export(["--checkpoint", str(ckpt), "--output", str(out)])
    card = (out / "README.md").read_text()
    assert "## Evaluation (last validation, step 2; checkpoint saved at step 3)" in card
    assert "library_name: sentence-transformers" in card and "SentenceTransformer(" in card
