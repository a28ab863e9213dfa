"""Strict config handling (issue 9 "Also" / "Config values", issue 16 key naming and ablate dry runs).

Every case goes through the real CLI parser or dispatcher: later options win over earlier ones, NaN/inf and
duplicate YAML keys are refused naming the key and file:line, unusable model folders fail before any encoding,
too-long max lengths are clamped with a warning, outputs honour the umask, and an ablation override with a typo is
refused at dry-run time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from _cli import assert_one_line_error, run_cli
from _reliability import copy_beir, leftovers, mine_config, write_yaml

from nvr.cli.mine import parse_config
from nvr.utils.atomic import atomic_dir, atomic_file, write_text_atomic
from nvr.utils.errors import ConfigError, InputError
from nvr.utils.models import check_max_length, check_model_source, position_limit
from nvr.utils.yamlcheck import check_config_args, check_yaml_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def beir(tiny_beir_dir: Path, tmp_path: Path) -> Path:
    return copy_beir(tiny_beir_dir, tmp_path / "beir")


@pytest.fixture
def job(beir: Path, tiny_bert_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    def make(model: Path | str | None = None, **overrides) -> Path:
        cfg = mine_config(beir, model or tiny_bert_dir, tmp_path / "runs" / "out", tmp_path / "cache", **overrides)
        return write_yaml(tmp_path / "mine.yaml", cfg)

    return make


# ------------------------------------------------------------------------------------ --preset vs --config
PERCPOS = REPO / "configs" / "mine" / "topk_percpos_cranfield.yaml"


def test_readme_example_preset_after_config_wins() -> None:
    cfg, extra = parse_config(["--config", str(PERCPOS), "--preset", "topk_marginpos_0.05", "--output_dir", "x"])
    assert (cfg.filter.method, cfg.filter.margin, cfg.sampler.method) == ("topk_marginpos", 0.05, "topk")
    assert extra["preset"] == "topk_marginpos_0.05" and cfg.output_dir == "x"
    assert cfg.teachers[0].name == "minilm"  # the rest of the config is kept


@pytest.mark.parametrize("preset,method", [("naive_topk", "naive_topk"), ("topk_shifted_10", "topk_shifted"),
                                           ("topk_abs_0.7", "topk_abs"), ("sampled_topk_10", "topk_percpos")])
def test_every_preset_after_config_replaces_its_filter_and_sampler(preset: str, method: str) -> None:
    cfg, _ = parse_config(["--config", str(PERCPOS), f"--preset={preset}"])
    assert cfg.filter.method == method
    from nvr.mining.presets import get_preset

    filt, sampler = get_preset(preset)
    assert cfg.filter == filt and cfg.sampler == sampler


def test_config_or_flag_after_preset_wins(tmp_path: Path) -> None:
    cfg, _ = parse_config(["--preset", "topk_marginpos_0.05", "--config", str(PERCPOS)])
    assert cfg.filter.method == "topk_percpos" and cfg.filter.perc == 0.95
    cfg, _ = parse_config(["--config", str(PERCPOS), "--preset", "topk_marginpos_0.05", "--filter.margin", "0.1"])
    assert (cfg.filter.method, cfg.filter.margin) == ("topk_marginpos", 0.1)
    cfg, _ = parse_config(["--config", str(PERCPOS), "--preset", "naive_topk", "--preset", "top1_sampled_10"])
    assert (cfg.filter.method, cfg.sampler.method, cfg.sampler.window) == ("topk_percpos", "top1_sampled", 10)


def test_unknown_or_missing_preset_is_a_one_line_error(capsys) -> None:
    code, err = run_cli("mine", "--config", str(PERCPOS), "--preset", "topk_percpos_9", capsys=capsys)
    assert_one_line_error(code, err, "'preset'", "topk_percpos_9", "topk_percpos_0.95")
    code, err = run_cli("mine", "--config", str(PERCPOS), "--preset", capsys=capsys)
    assert_one_line_error(code, err, "'preset'", "expected a preset name")


# ------------------------------------------------------------------------------------------ NaN / inf
FLOAT_KEYS = [("filter", "margin"), ("filter", "max_score"), ("filter", "min_score"), ("filter", "perc"),
              ("sampler", "temperature")]


@pytest.mark.parametrize("group,key", FLOAT_KEYS, ids=lambda v: str(v))
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_float_in_yaml_is_refused(group: str, key: str, value: str, job, tmp_path: Path, capsys) -> None:
    path = job()
    text = path.read_text(encoding="utf-8")
    block = "filter:\n  method: topk_percpos\n" if group == "filter" else "sampler:\n  method: topk\n"
    text = text.split("filter:")[0] + block + f"  {key}: {value}\n"
    path.write_text(text, encoding="utf-8")
    code, err = run_cli("mine", "--config", str(path), capsys=capsys)
    assert_one_line_error(code, err, f"'{group}.{key}'", "finite")
    assert not (tmp_path / "runs" / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag", ["--filter.margin", "--sampler.temperature", "--filter.min_score"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_float_flag_is_refused(flag: str, value: str, job, capsys) -> None:
    code, err = run_cli("mine", "--config", str(job()), flag, value, capsys=capsys)
    assert_one_line_error(code, err, flag[2:])


# ------------------------------------------------------------------------------------ duplicate YAML keys
def test_duplicate_top_level_key_names_key_and_line(job, tmp_path: Path, capsys) -> None:
    path = job()
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next(i for i, ln in enumerate(lines, 1) if ln.startswith("num_negatives:"))
    lines.append("num_negatives: 9")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, err = run_cli("mine", "--config", str(path), capsys=capsys)
    assert_one_line_error(code, err, f"{path}:{len(lines)}:", "duplicate key 'num_negatives'", f"line {first}")
    assert not (tmp_path / "runs" / "out").exists()


@pytest.mark.parametrize("text,key,line", [
    ("filter:\n  perc: 0.9\n  method: topk_percpos\n  perc: 0.8\n", "filter.perc", 4),
    ("teachers:\n  - name: a\n    kind: bm25\n    name: b\n", "teachers[0].name", 4),
    ("a: 1\n---\nb: 1\nb: 2\n", "b", 4),
])
def test_duplicate_nested_keys(text: str, key: str, line: int, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"cfg\.yaml:{line}: duplicate key '{re.escape(key)}'"):
        check_yaml_text(text, tmp_path / "cfg.yaml")
    check_yaml_text("a: 1\nb: {a: 1}\nc: [{a: 1}, {a: 2}]\n", tmp_path / "ok.yaml")  # equal keys, other mappings


def test_duplicate_key_in_fit_config_and_ablation_spec(tmp_path: Path, capsys) -> None:
    fit = tmp_path / "fit.yaml"
    fit.write_text("model:\n  lr: 0.1\n  lr: 0.2\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"fit\.yaml:3: duplicate key 'model\.lr'"):
        check_config_args(["fit", "--config", str(fit)])
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: a\nseeds: [0]\nseeds: [1]\n", encoding="utf-8")
    code, err = run_cli("ablate", "--config", str(spec), "--dry_run", capsys=capsys)
    assert_one_line_error(code, err, f"{spec}:3:", "duplicate key 'seeds'", command="ablate")


# ---------------------------------------------------------------------------------------- model folders
def _truncate(folder: Path) -> str:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return "truncated safetensors file"


def _empty(folder: Path) -> str:
    shutil.rmtree(folder)
    folder.mkdir()
    return "no config.json"


def _no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return "no model weights"


def _bad_header(folder: Path) -> str:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    weights.write_bytes(bytes(data))
    return "damaged safetensors header"


def _huge_header(folder: Path) -> str:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    return "truncated or damaged safetensors file"


@pytest.mark.parametrize("fault", [_truncate, _empty, _no_weights, _bad_header, _huge_header],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_unusable_teacher_folder_fails_before_encoding(fault, job, tiny_bert_dir: Path, tmp_path: Path,
                                                       monkeypatch, capsys) -> None:
    model = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, model)
    what = fault(model)
    import nvr.modeling.embedder as embedder_module

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the folder check")

    monkeypatch.setattr(embedder_module.Embedder, "from_config", classmethod(no_load))
    code, err = run_cli("mine", "--config", str(job(model=model)), capsys=capsys)
    assert_one_line_error(code, err, "'teachers[tiny].model_name_or_path'", str(model), what)
    assert not (tmp_path / "runs" / "out").exists() and not (tmp_path / "cache" / "embeddings").exists()


def test_sharded_checkpoint_with_missing_shard(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "sharded"
    shutil.copytree(tiny_bert_dir, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'embedder.model_name_or_path'.*model-00002-of-00002.* missing"):
        check_model_source(str(model), "embedder.model_name_or_path")
    index["weight_map"].pop("b")
    (model / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    check_model_source(str(model), "embedder.model_name_or_path")  # complete again


def test_teacher_load_error_names_the_teacher_key(job, tmp_path: Path, capsys) -> None:
    """The backbone loader reports ``embedder.model_name_or_path``; in a mine config the key is the teacher's."""
    code, err = run_cli("mine", "--config", str(job(model="nvr-test-org/no-such-teacher")), capsys=capsys)
    last = assert_one_line_error(code, err, "'teachers[tiny].model_name_or_path'", "nvr-test-org/no-such-teacher")
    assert "embedder.model_name_or_path" not in last
    assert not (tmp_path / "runs" / "out").exists()


# ---------------------------------------------------------------------------------------------- max_length
def test_position_limits_from_config_json(tiny_bert_dir: Path, tmp_path: Path) -> None:
    assert position_limit(str(tiny_bert_dir)) == (128, "max_position_embeddings")
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "xlm-roberta", "max_position_embeddings": 514,
                                                     "pad_token_id": 1}), encoding="utf-8")
    assert position_limit(str(roberta))[0] == 512  # positions start after the padding index
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}), encoding="utf-8")
    assert position_limit(str(gpt)) == (1024, "n_positions")
    assert position_limit("some-org/not-downloaded") is None
    assert check_max_length("some-org/not-downloaded", 4096, "k") == 4096


def test_check_max_length_clamps_with_a_warning_naming_the_key(tiny_bert_dir: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="nvr.utils.models"):
        assert check_max_length(str(tiny_bert_dir), 100, "teachers[t].query_max_length") == 100
        assert not caplog.records
        assert check_max_length(str(tiny_bert_dir), 1024, "teachers[t].query_max_length") == 128
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "teachers[t].query_max_length" in record.getMessage()
    assert "1024" in record.getMessage() and "128" in record.getMessage()


def test_mine_clamps_teacher_max_length_and_records_it(job, tmp_path: Path, capsys, caplog) -> None:
    cfg = yaml.safe_load(job().read_text(encoding="utf-8"))
    cfg["teachers"][0].update(query_max_length=1024, passage_max_length=100)
    path = write_yaml(tmp_path / "long.yaml", cfg)
    with caplog.at_level(logging.WARNING, logger="nvr.utils.models"):
        code, err = run_cli("mine", "--config", str(path), capsys=capsys)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'teachers[tiny].query_max_length': 1024" in m for m in warned), warned
    assert not any("passage_max_length" in m for m in warned)
    teacher = json.loads((tmp_path / "runs" / "out" / "manifest.json").read_text())["config"]["teachers"][0]
    assert (teacher["query_max_length"], teacher["passage_max_length"]) == (128, 100)


def test_eval_clamps_max_length(tiny_bert_dir: Path, tmp_path: Path, caplog) -> None:
    from nvr.cli import eval as eval_cli

    args = eval_cli.build_parser().parse_args(["--model", str(tiny_bert_dir), "--beir", "x", "--output",
                                               str(tmp_path / "m.json"), "--max_length", "4096",
                                               "--cache_dir", str(tmp_path / "c")])
    with caplog.at_level(logging.WARNING, logger="nvr.utils.models"):
        eval_cli.preflight(args)
    assert args.max_length == 128 and "'--max_length': 4096" in caplog.text


# ---------------------------------------------------------------------------------------------- umask
@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_outputs_honour_the_umask(mask: int, umask, tmp_path: Path) -> None:
    umask(mask)
    write_text_atomic(tmp_path / "a.txt", "x")
    with atomic_file(tmp_path / "b.bin", "wb") as fh:
        fh.write(b"x")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inner.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~mask
    assert leftovers(tmp_path) == []


def test_mined_folder_is_readable_by_the_group(job, umask, tmp_path: Path, capsys) -> None:
    umask(0o002)
    code, err = run_cli("mine", "--config", str(job()), capsys=capsys)
    assert code == 0, err
    out = tmp_path / "runs" / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    for name in ("mined.jsonl", "manifest.json", "report.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name


# ------------------------------------------------------------------------------------ nvr ablate --dry_run
def _ablation(tmp_path: Path, model: Path, beir: Path, overrides: dict) -> Path:
    base = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "enable_checkpointing": False},
        "model": {"embedder": {"model_name_or_path": str(model)}},
        "data": {"mining": {"data": {"beir_dir": str(beir)}, "teachers": [{"name": "t", "model_name_or_path":
                                                                             str(model)}]}},
    }
    write_yaml(tmp_path / "base.yaml", base)
    spec = {"name": "typo", "base_config": str(tmp_path / "base.yaml"), "output_dir": str(tmp_path / "abl"),
            "seeds": [0], "variants": [{"name": "ok", "overrides": {"data.mining.filter.method": "naive_topk"}},
                                       {"name": "bad", "overrides": overrides}]}
    return write_yaml(tmp_path / "spec.yaml", spec)


@pytest.mark.parametrize("overrides,key,reason", [
    ({"data.mining.filtr.perc": 0.9}, "overrides.data.mining.filtr.perc", "filtr"),
    ({"data.mining.filter.method": "naive_topk", "model.lrr": 0.1}, "overrides.model.lrr", "lrr"),
    ({"data.mining.filter.perc": 7.0}, "overrides.data.mining.filter.perc", "(0, 2]"),
    ({"data.mining.filter.margin": float("nan")}, "overrides.data.mining.filter.margin", "NaN"),
    ({"data.num_negatives": "four"}, "overrides.data.num_negatives", "four"),
])
def test_ablate_dry_run_validates_overrides(overrides: dict, key: str, reason: str, tiny_bert_dir: Path,
                                            beir: Path, tmp_path: Path, capsys) -> None:
    spec = _ablation(tmp_path, tiny_bert_dir, beir, overrides)
    code, err = run_cli("ablate", "--config", str(spec), "--dry_run", capsys=capsys)
    assert_one_line_error(code, err, f"'{key}'", "variant 'bad'", reason, str(spec), command="ablate")
    assert not (tmp_path / "abl").exists()
    from nvr.cli.ablate import main as ablate_main

    assert ablate_main(["--config", str(spec), "--dry_run", "--variants", "ok"]) == 0  # the valid variant plans
    assert "[todo] ok/seed-0" in capsys.readouterr().out
