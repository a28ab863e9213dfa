"""`nvr export` of real `nvr fit` LoRA checkpoints (base weights not in the file) and export-folder safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_data import fit_tiny

from nvr.cli.main import main as nvr_main
from nvr.modeling.encode import encode_texts
from nvr.modeling.export import PARTIAL_KEY
from nvr.training.module import BiEncoderModule

st = pytest.importorskip("sentence_transformers")

QUERIES = ["wing lift drag", "shock wave supersonic flow", "heat"]
PASSAGES = ["heat transfer boundary layer study of the flow", "rocket nozzle thrust data", "panel flutter"]
INSTRUCTION, PASSAGE_PREFIX = "retrieve passage", "passage : "


def _fit(tmp_path: Path, model_dir: Path, beir_dir: Path, embedder: dict) -> Path:
    prompts = {"query_instruction": INSTRUCTION, "passage_prefix": PASSAGE_PREFIX}
    return fit_tiny(tmp_path, beir_dir, embedder, data={**prompts, "mask_instruction": True}, eval_set=prompts)


def _module_embeddings(ckpt: Path) -> tuple[np.ndarray, np.ndarray]:
    """What the trained module computes, with training's prompts, masking and max lengths."""
    module = BiEncoderModule.load_from_checkpoint(str(ckpt), map_location="cpu")
    emb = module.embedder.eval()
    q = encode_texts(emb, QUERIES, prefix=f"{INSTRUCTION}: ", mask_prefix=True, max_length=12, show_progress=False)
    p = encode_texts(emb, PASSAGES, prefix=PASSAGE_PREFIX, mask_prefix=False, max_length=24, show_progress=False)
    return q, p


@pytest.mark.parametrize("kind", ["bert", "mistral"])
def test_export_real_lora_checkpoint_matches_the_module(kind, tiny_bert_dir, tiny_mistral_dir, tiny_beir_dir,
                                                        tmp_path) -> None:
    model_dir = tiny_bert_dir if kind == "bert" else tiny_mistral_dir
    embedder = {"model_name_or_path": str(model_dir), "pooling": "mean", "lora": {"r": 4, "alpha": 8}}
    if kind == "mistral":
        embedder["bidirectional"] = True
    ckpt = _fit(tmp_path, model_dir, tiny_beir_dir, embedder)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved[PARTIAL_KEY] and all("lora_" in k for k in saved["state_dict"])  # base weights not in the file

    out = tmp_path / "exported"
    assert nvr_main_ok(["export", "--checkpoint", str(ckpt), "--output", str(out)])
    ours_q, ours_p = _module_embeddings(ckpt)
    model = st.SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(model.encode_query(QUERIES), ours_q, atol=1e-5)
    np.testing.assert_allclose(model.encode_document(PASSAGES), ours_p, atol=1e-5)
    assert not np.allclose(ours_q, _base_embeddings(model_dir, kind), atol=1e-3)  # the adapter was applied

    # training's prompts and lengths travel with the export; the model card names data and metrics
    st_cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"] == {"query": f"{INSTRUCTION}: ", "document": PASSAGE_PREFIX}
    assert st_cfg["nvr"] == {"query_max_length": 12, "passage_max_length": 24, "note": st_cfg["nvr"]["note"]}
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 24
    card = (out / "README.md").read_text()
    assert "val/ndcg@10" in card and str(model_dir) in card and "masked from pooling: True" in card


def _base_embeddings(model_dir: Path, kind: str) -> np.ndarray:
    from nvr.modeling.config import EmbedderConfig
    from nvr.modeling.embedder import Embedder

    base = Embedder.from_config(EmbedderConfig(str(model_dir), pooling="mean", bidirectional=kind == "mistral"))
    return encode_texts(base, QUERIES, prefix=f"{INSTRUCTION}: ", mask_prefix=True, max_length=12,
                        show_progress=False)


def nvr_main_ok(argv: list[str]) -> bool:
    with pytest.raises(SystemExit) as exc:
        nvr_main(argv)
    return exc.value.code == 0


def test_export_refuses_an_output_that_overlaps_its_inputs(tiny_bert_dir, tmp_path, capsys) -> None:
    """`--overwrite` into the checkpoint's own folder (or around it, or into the base model) would delete it."""
    from nvr.modeling.config import EmbedderConfig, LoraSettings
    from nvr.modeling.embedder import Embedder

    cfg = EmbedderConfig(str(tiny_bert_dir), lora=LoraSettings(r=4))
    emb = Embedder.from_config(cfg)
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    ckpt = run / "last.ckpt"
    torch.save({"state_dict": {f"embedder.{k}": v for k, v in emb.state_dict().items()},
                "hyper_parameters": {"embedder": cfg.to_dict()}}, str(ckpt))
    before = {p: p.stat().st_size for p in [*run.iterdir(), *tiny_bert_dir.iterdir()]}
    for output in (run, tmp_path / "run", ckpt, tiny_bert_dir, tiny_bert_dir / "inside"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            nvr_main(["export", "--checkpoint", str(ckpt), "--output", str(output), "--overwrite", "true"])
        assert exc.value.code == 2, output
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nvr export: error:")]
        assert len(err) == 1 and "overlaps the input" in err[0], output
    assert {p: p.stat().st_size for p in [*run.iterdir(), *tiny_bert_dir.iterdir()]} == before
    assert not (tiny_bert_dir / "inside").exists()
    # beside the checkpoint (a new sub-folder of its folder) replaces nothing: allowed
    assert nvr_main_ok(["export", "--checkpoint", str(ckpt), "--output", str(run / "exported")])
