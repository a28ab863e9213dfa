"""Seams between features built separately: Matryoshka dims in exports, nvr-only export prompts read back by
``nvr eval``, the instruction-length check on eval sets, the validation cache of multi-dataset runs, and the
relabel judge checked before any encoding."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from nvr.evaluation.callback import datamodule_cache_dir
from nvr.evaluation.data import EvalSetConfig, build_eval_dataloaders, load_eval_set
from nvr.evaluation.evaluate import read_folder_settings
from nvr.modeling.config import EmbedderConfig
from nvr.modeling.export import matryoshka_lines, write_st_files
from nvr.utils.errors import ConfigError


def test_matryoshka_dims_reach_the_st_config_and_the_card(tmp_path: Path) -> None:
    cfg = EmbedderConfig(model_name_or_path="x", pooling="mean", normalize=True)
    enc = {"query_prefix": "q: ", "passage_prefix": "", "mask_prefix": False, "query_max_length": 32,
           "passage_max_length": 64}
    write_st_files(tmp_path, cfg, 16, enc, [16, 8, 4])
    st = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
    assert st["nvr"]["matryoshka_dims"] == [16, 8, 4]
    other = tmp_path / "plain"
    other.mkdir()
    write_st_files(other, cfg, 16, enc, None)
    assert "matryoshka_dims" not in json.loads((other / "config_sentence_transformers.json").read_text())["nvr"]
    assert "truncate_dim=4" in matryoshka_lines([16, 8, 4], True)[0]
    assert "--truncate_dim 4" in matryoshka_lines([16, 8, 4], False)[0] and matryoshka_lines(None, True) == []


def test_nvr_only_export_prompts_are_read_back(tmp_path: Path) -> None:
    """An nvr folder without sentence-transformers files (latent attention) keeps its prompts and masking."""
    meta = {"config": {"pooling": "latent_attention", "normalize": True, "max_length": 128},
            "prompts": {"query_prefix": "Given a claim: ", "passage_prefix": "passage: ", "mask_prefix": False,
                        "query_max_length": 64, "passage_max_length": 96}}
    (tmp_path / "nvr_embedder.json").write_text(json.dumps(meta))
    settings = read_folder_settings(str(tmp_path))
    assert settings == {"pooling": "latent_attention", "normalize": True, "max_length": 96,
                        "query_prefix": "Given a claim: ", "passage_prefix": "passage: ", "mask_instruction": False}
    meta["prompts"] = {"mask_prefix": "yes", "passage_max_length": True}  # wrong types are ignored, not trusted
    (tmp_path / "nvr_embedder.json").write_text(json.dumps(meta))
    assert read_folder_settings(str(tmp_path))["max_length"] == 128
    assert "mask_instruction" not in read_folder_settings(str(tmp_path))


@pytest.mark.parametrize("field", ["query_instruction", "passage_prefix"])
def test_eval_set_prompt_longer_than_max_length_names_the_key(field, tiny_bert_dir, tiny_beir_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    long = " ".join(["instruction"] * 40)
    cfg = EvalSetConfig(name="tiny", path=str(tiny_beir_dir), query_max_length=8, passage_max_length=8,
                        **{field: long})
    with pytest.raises(ConfigError, match=rf"data\.eval_sets\[tiny\]\.{field}"):
        build_eval_dataloaders([load_eval_set(cfg)], tokenizer, batch_size=4)
    ok = EvalSetConfig(name="tiny", path=str(tiny_beir_dir), query_max_length=64, **{field: "short"})
    assert len(build_eval_dataloaders([load_eval_set(ok)], tokenizer, batch_size=4)) == 2


def test_validation_cache_dir_of_a_multi_dataset_run() -> None:
    single = types.SimpleNamespace(mining=types.SimpleNamespace(cache_dir="/c/single"))
    assert datamodule_cache_dir(single) == "/c/single"
    multi = types.SimpleNamespace(mining=None, mined_datasets=["retrieval", "other"],
                                  mining_config=lambda name: types.SimpleNamespace(cache_dir=f"/c/{name}"))
    assert datamodule_cache_dir(multi) == "/c/retrieval"
    fixed = types.SimpleNamespace(mining=None, mined_datasets=["d"], mining_config=lambda name: None)
    assert datamodule_cache_dir(fixed) is None and datamodule_cache_dir(None) is None


def test_missing_relabel_judge_fails_before_any_encoding(tiny_bert_dir, tiny_beir_dir, tmp_path, monkeypatch) -> None:
    from nvr.config.mining import DataSource, FilterConfig, MineConfig, RelabelConfig, TeacherConfig
    from nvr.mining.preflight import preflight_mine

    cfg = MineConfig(data=DataSource(beir_dir=str(tiny_beir_dir), split="train"),
                     teachers=[TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir))],
                     filter=FilterConfig(method="topk_percpos", perc=0.95), num_negatives=2,
                     relabel=RelabelConfig(model_name_or_path=str(tmp_path / "no-such-judge")),
                     cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    with pytest.raises(Exception, match="relabel.model_name_or_path"):
        preflight_mine(cfg)


def test_neutral_new_settings_keep_old_mined_set_addresses(tiny_beir_dir, tmp_path) -> None:
    """Settings added later (per-teacher filter, cache dtype, ANN search, column mappings, calibration) are left out
    of the content address at their neutral value, and are part of it at any other value."""
    import dataclasses

    from nvr.config.mining import CalibrateConfig, DataSource, FilterConfig, MineConfig, TeacherConfig
    from nvr.mining.pipeline import content_config, mining_fingerprint

    base = MineConfig(data=DataSource(beir_dir=str(tiny_beir_dir), split="train"),
                      teachers=[TeacherConfig(name="t", model_name_or_path="m")],
                      filter=FilterConfig(method="topk_percpos", perc=0.95), cache_dir=str(tmp_path))
    content = content_config(base)
    assert not {"filter", "cache_dtype", "search", "search_params"} & set(content["teachers"][0])
    assert not {"columns", "corpus_columns"} & set(content["data"]) and "calibrate" not in content["filter"]
    changed = [
        dataclasses.replace(base, teachers=[dataclasses.replace(base.teachers[0], cache_dtype="float16")]),
        dataclasses.replace(base, teachers=[dataclasses.replace(base.teachers[0], search="hnsw")]),
        dataclasses.replace(base, teachers=[dataclasses.replace(base.teachers[0], filter=FilterConfig())]),
        dataclasses.replace(base, filter=dataclasses.replace(base.filter, calibrate=CalibrateConfig())),
    ]
    prints = {mining_fingerprint(c, inputs={"files": {}}) for c in [base, *changed]}
    assert len(prints) == 1 + len(changed)
