from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from nvr.cli.lightning_cli import main
from nvr.config.mining import MineConfig
from nvr.evaluation.data import EvalSetConfig
from nvr.modeling.config import EmbedderConfig

FIT_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "fit").glob("*.yaml"))


def test_the_shipped_fit_configs_exist() -> None:
    names = {p.name for p in FIT_CONFIGS}
    assert {"quickstart_minilm_cranfield.yaml", "e5_large_unsupervised_ablation.yaml",
            "nv_retriever_v1_stage1.yaml", "nv_retriever_v1_stage2.yaml"} <= names


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.name)
def test_fit_config_parses_through_the_cli(path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    # the link fills the data tokenizer from the model (it is not in the YAML files)
    assert printed["model"]["embedder"]["model_name_or_path"]
    assert printed["data"]["num_negatives"] >= 1


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.name)
def test_fit_config_dataclasses_validate(path: Path) -> None:
    """Builds the typed configs (``__post_init__`` range checks) without loading any model."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    parser = ArgumentParser()
    parser.add_argument("--embedder", type=EmbedderConfig)
    parser.add_argument("--mining", type=MineConfig | None)
    parser.add_argument("--eval_sets", type=list[EvalSetConfig])
    cfg = parser.parse_object({"embedder": raw["model"]["embedder"], "mining": raw["data"].get("mining"),
                               "eval_sets": raw["data"].get("eval_sets", [])})
    built = parser.instantiate_classes(cfg)
    assert isinstance(built.embedder, EmbedderConfig)
    if built.mining is not None:
        assert isinstance(built.mining, MineConfig) and built.mining.filter.method == "topk_percpos"


def test_stage2_warm_starts_from_stage1() -> None:
    stage1 = yaml.safe_load((FIT_CONFIGS[0].parent / "nv_retriever_v1_stage1.yaml").read_text())
    stage2 = yaml.safe_load((FIT_CONFIGS[0].parent / "nv_retriever_v1_stage2.yaml").read_text())
    assert stage2["model"]["init_from"].startswith(stage1["trainer"]["default_root_dir"])
    assert (stage1["data"]["num_negatives"], stage2["data"]["num_negatives"]) == (1, 5)
    assert stage1["model"]["embedder"]["lora"]["r"] == 16 and stage1["model"]["embedder"]["lora"]["alpha"] == 32
