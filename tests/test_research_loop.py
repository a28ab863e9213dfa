"""The research loop end to end on tiny models: mine -> fit (LoRA) -> export -> re-mine with the fine-tuned model
-> stage-2 fit from stage 1's final weights. Each stage must consume fresh inputs (changed weights => changed mined
set; changed prefix => re-encoded; a model retrained in place => re-mined) and unchanged inputs must hit the caches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from nvr.cli import export as export_cli
from nvr.cli.lightning_cli import main as lightning_main
from nvr.mining.mined_set import MANIFEST_FILE, MINED_FILE

pytestmark = pytest.mark.slow


class EncodeCounter:
    """Counts the texts every teacher encodes (wraps ``nvr.modeling.encode.encode_texts``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import nvr.modeling.encode as encode

        self.texts = 0
        original = encode.encode_texts

        def counting(embedder, texts, *args: Any, **kwargs: Any):
            self.texts += len(texts)
            return original(embedder, texts, *args, **kwargs)

        monkeypatch.setattr(encode, "encode_texts", counting)


def _mining(beir: Path, teacher: Path, cache: Path, **teacher_kw: Any) -> dict[str, Any]:
    return {
        "data": {"beir_dir": str(beir), "split": "train"},
        "teachers": [{"name": "t", "model_name_or_path": str(teacher), "device": "cpu", "batch_size": 16,
                      "query_max_length": 32, "passage_max_length": 64, **teacher_kw}],
        "num_negatives": 2, "depth": 20, "max_depth": 40, "cache_dir": str(cache),
        "filter": {"method": "topk_percpos", "perc": 0.95},
    }


def _fit_config(tmp: Path, name: str, base: Path, beir: Path, mining: dict[str, Any], steps: int,
                init_from: Path | None = None) -> Path:
    model: dict[str, Any] = {"embedder": {"model_name_or_path": str(base), "pooling": "mean",
                                          "lora": {"r": 4, "alpha": 8}},
                             "lr": 5e-2, "warmup_steps": 0, "temperature": 0.05}
    if init_from is not None:
        model["init_from"] = str(init_from)
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp / name)},
        "model": model,
        "data": {"mining": mining, "num_negatives": 2, "batch_size": 4, "query_max_length": 16,
                 "passage_max_length": 32, "eval_sets": [{"name": "tiny", "path": str(beir), "split": "test"}]},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _mined_dirs(cache: Path) -> set[Path]:
    return {p for p in (cache / "mined").iterdir() if (p / MINED_FILE).is_file()} if (cache / "mined").exists() \
        else set()


def _only_new(before: set[Path], after: set[Path]) -> Path:
    new = after - before
    assert len(new) == 1, f"expected exactly one new mined set, got {sorted(new)}"
    return new.pop()


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))


def _scores(folder: Path) -> list[list[float]]:
    rows = [json.loads(line) for line in (folder / MINED_FILE).read_text(encoding="utf-8").splitlines()]
    return [[n["score"] for n in r["negatives"]] for r in rows]


def _trainable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "lora_" in k}


def test_mine_fit_export_remine_stage2(tiny_bert_dir, tiny_beir_dir, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    counter = EncodeCounter(monkeypatch)

    # stage 1: the base model mines its own negatives, then trains a LoRA adapter on them
    stage1 = _fit_config(tmp_path, "stage1", tiny_bert_dir, tiny_beir_dir, _mining(tiny_beir_dir, tiny_bert_dir,
                                                                                   cache), steps=4)
    lightning_main(["fit", "--config", str(stage1)])
    mined_base = _only_new(set(), _mined_dirs(cache))
    encoded_once = counter.texts
    assert encoded_once > 0
    last1 = tmp_path / "stage1" / "checkpoints" / "last.ckpt"
    assert torch.load(last1, map_location="cpu", weights_only=False)["global_step"] == 4

    # the same inputs again (a new run folder): every cache hits, nothing is encoded or mined again
    again = _fit_config(tmp_path, "again", tiny_bert_dir, tiny_beir_dir, _mining(tiny_beir_dir, tiny_bert_dir,
                                                                                 cache), steps=2)
    lightning_main(["fit", "--config", str(again)])
    assert counter.texts == encoded_once and _mined_dirs(cache) == {mined_base}

    # export stage 1 (a LoRA checkpoint: the base is refilled from the base model and the adapter merged)
    exported = tmp_path / "exported"
    assert export_cli.main(["--checkpoint", str(last1), "--output", str(exported)]) == 0

    # stage 2 re-mines with the fine-tuned model (changed weights => re-encoded, new mined set) and starts from
    # stage 1's final weights
    before = _mined_dirs(cache)
    stage2 = _fit_config(tmp_path, "stage2", tiny_bert_dir, tiny_beir_dir, _mining(tiny_beir_dir, exported, cache),
                         steps=2, init_from=last1)
    lightning_main(["fit", "--config", str(stage2)])
    mined_tuned = _only_new(before, _mined_dirs(cache))
    assert counter.texts > encoded_once
    assert _manifest(mined_tuned)["teachers"] != _manifest(mined_base)["teachers"]
    assert _scores(mined_tuned) != _scores(mined_base)

    from nvr.modeling.config import EmbedderConfig, LoraSettings
    from nvr.training.module import BiEncoderModule

    warm = BiEncoderModule(embedder=EmbedderConfig(str(tiny_bert_dir), lora=LoraSettings(r=4, alpha=8)),
                           init_from=str(last1))
    final1 = _trainable(torch.load(last1, map_location="cpu", weights_only=False)["state_dict"])
    started2 = _trainable(warm.state_dict())
    assert final1 and set(final1) <= set(started2)
    for name, tensor in final1.items():
        torch.testing.assert_close(started2[name], tensor)

    # a changed encoding setting (query prefix) re-encodes the queries and mines a new set
    texts = counter.texts
    before = _mined_dirs(cache)
    prefixed = _fit_config(tmp_path, "prefixed", tiny_bert_dir, tiny_beir_dir,
                           _mining(tiny_beir_dir, exported, cache, query_prefix="query: "), steps=2)
    lightning_main(["fit", "--config", str(prefixed)])
    _only_new(before, _mined_dirs(cache))
    assert counter.texts > texts

    # the self-mining loop: the teacher folder is retrained in place (stage 2's weights exported over it)
    last2 = tmp_path / "stage2" / "checkpoints" / "last.ckpt"
    assert export_cli.main(["--checkpoint", str(last2), "--output", str(exported), "--overwrite", "true"]) == 0
    before, texts = _mined_dirs(cache), counter.texts
    lightning_main(["fit", "--config", str(stage2), "--trainer.default_root_dir", str(tmp_path / "stage3")])
    mined_retrained = _only_new(before, _mined_dirs(cache))
    assert counter.texts > texts
    assert _manifest(mined_retrained)["teachers"] != _manifest(mined_tuned)["teachers"]
