"""``nvr eval --model run.ckpt``: a training checkpoint is evaluated without an export step, with the embeddings of
the folder ``nvr export`` writes (full fine-tunes, LoRA trainable-only checkpoints, nvr-only exports)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import cli_error
from _training_data import fit_tiny

from nvr.cli.main import main as nvr_main
from nvr.modeling import encode as encode_module
from nvr.modeling.export import PARTIAL_KEY

INSTRUCTION, PASSAGE_PREFIX = "retrieve passage", "passage : "

EMBEDDERS = {
    "full": {"pooling": "mean"},
    "unmasked": {"pooling": "mean"},  # trained with mask_instruction false: the query prompt is pooled
    "lora": {"pooling": "mean", "lora": {"r": 4, "alpha": 8}},
    "latent": {"pooling": "latent_attention", "latent": {"num_latents": 8, "num_heads": 2}},  # no ST export
}


def fit(tmp_path: Path, model_dir: Path, beir_dir: Path, embedder: dict, mask: bool = True) -> Path:
    prompts = {"query_instruction": INSTRUCTION, "passage_prefix": PASSAGE_PREFIX}
    return fit_tiny(tmp_path, beir_dir, {"model_name_or_path": str(model_dir), **embedder},
                    data={**prompts, "mask_instruction": mask}, eval_set=prompts)


def run_eval(argv: list[str], monkeypatch) -> tuple[dict, list[np.ndarray]]:
    """The result JSON and every embedding matrix the evaluation computed (queries, corpus)."""
    seen: list[np.ndarray] = []
    original = encode_module.encode_texts

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(np.array(out))
        return out

    monkeypatch.setattr(encode_module, "encode_texts", recording)
    with pytest.raises(SystemExit) as exc:
        nvr_main(["eval", *argv, "--cache_dir", "", "--dtype", "float32", "--device", "cpu"])
    assert exc.value.code == 0
    monkeypatch.setattr(encode_module, "encode_texts", original)
    output = argv[argv.index("--output") + 1]
    return json.loads(Path(output).read_text()), seen


@pytest.mark.parametrize("kind", sorted(EMBEDDERS))
def test_eval_checkpoint_equals_the_exported_folder(kind, tmp_path, tiny_bert_dir, tiny_beir_dir, monkeypatch):
    mask = kind != "unmasked"
    ckpt = fit(tmp_path, tiny_bert_dir, tiny_beir_dir, EMBEDDERS[kind], mask)
    if kind == "lora":
        assert torch.load(ckpt, map_location="cpu", weights_only=False)[PARTIAL_KEY]  # base weights not in the file
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    ours, ours_emb = run_eval(["--model", str(ckpt), "--beir", str(tiny_beir_dir), "--output",
                               str(tmp_path / "ckpt.json")], monkeypatch)
    assert not list(scratch.iterdir()), "the temporary export is removed after the run"
    assert ours["model"] == str(ckpt)
    assert ours["settings"]["checkpoint_export"] == {"sentence_transformers": kind != "latent"}
    # unset options took training's encoding: prompts and query masking as in the fit config
    assert ours["settings"]["query_prefix"] == f"{INSTRUCTION}: "
    assert ours["settings"]["passage_prefix"] == PASSAGE_PREFIX and ours["settings"]["mask_instruction"] is mask

    export = tmp_path / "exported"
    with pytest.raises(SystemExit) as exc:
        nvr_main(["export", "--checkpoint", str(ckpt), "--output", str(export), "--sentence_transformers",
                  str(kind != "latent").lower()])
    assert exc.value.code == 0
    # the exported folder, with training's settings spelled out (the nvr-only folder carries no ST prompts)
    explicit = ["--query_max_length", "12", "--mask_instruction", str(mask).lower()]
    if kind == "latent":
        explicit += ["--query_instruction", INSTRUCTION, "--passage_prefix", PASSAGE_PREFIX]
    theirs, theirs_emb = run_eval(["--model", str(export), "--beir", str(tiny_beir_dir), "--output",
                                   str(tmp_path / "folder.json"), *explicit], monkeypatch)
    assert len(ours_emb) == len(theirs_emb) == 2
    for a, b in zip(ours_emb, theirs_emb):
        np.testing.assert_array_equal(a, b)
    assert ours["datasets"] == theirs["datasets"]

    base, base_emb = run_eval(["--model", str(tiny_bert_dir), "--beir", str(tiny_beir_dir), "--output",
                               str(tmp_path / "base.json"), "--query_instruction", INSTRUCTION, "--passage_prefix",
                               PASSAGE_PREFIX, "--query_max_length", "12", "--max_length", "24"], monkeypatch)
    assert not np.allclose(base_emb[1], ours_emb[1], atol=1e-4), "the trained weights were evaluated"


def test_eval_checkpoint_errors_are_one_line(tmp_path, tiny_beir_dir, capsys):
    line = cli_error(["eval", "--model", str(tmp_path / "missing.ckpt"), "--beir", str(tiny_beir_dir),
                      "--output", str(tmp_path / "m.json")], capsys)
    assert "no such checkpoint file" in line and "missing.ckpt" in line
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    line = cli_error(["eval", "--model", str(junk), "--beir", str(tiny_beir_dir), "--output",
                      str(tmp_path / "m.json")], capsys)
    assert "junk.ckpt" in line and "checkpoint" in line
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    line = cli_error(["eval", "--model", str(bare), "--beir", str(tiny_beir_dir), "--output",
                      str(tmp_path / "m.json")], capsys)
    assert "not an nvr training checkpoint" in line
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    line = cli_error(["eval", "--model", str(junk), "--beir", str(tiny_beir_dir), "--output", str(taken)], capsys)
    assert "taken.json" in line and "overwrite" in line  # checked before any export work
