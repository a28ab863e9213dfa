"""``nvr mine``: offline hard-negative mining from a YAML config and/or flags.

Examples::

    nvr mine --config configs/mine/topk_percpos_cranfield.yaml
    nvr mine --config my.yaml --preset sampled_topk_10 --output_dir runs/sampled --export st

``--preset`` sets the filter and sampler *defaults*; a config file or explicit ``--filter.*`` / ``--sampler.*``
flags given after it still override them. Unknown keys and bad values end with one ``error:`` line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from nvr.mining.config import MineConfig
from nvr.mining.presets import PRESETS, get_preset
from nvr.mining.report import summary_lines
from nvr.teachers.cache import dist_rank_world
from nvr.utils.errors import InputError

_EXTRA = ("config", "preset", "export", "export_path", "print_config")
EXPORTS = {"st": "sentence_transformers.jsonl", "flag": "flagembedding.jsonl"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="nvr mine", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with MineConfig fields")
    parser.add_argument("--preset", type=str, default=None, help=f"filter+sampler preset: {', '.join(PRESETS)}")
    parser.add_argument("--export", type=str, default=None, choices=[None, *EXPORTS], help="also export: st | flag")
    parser.add_argument("--export_path", type=str, default=None, help="export file (default: inside output_dir)")
    parser.add_class_arguments(MineConfig)
    return parser


def _preset_name(argv: list[str]) -> str | None:
    """The value of ``--preset`` (needed before parsing, since it sets defaults)."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return None


def _apply_preset(parser: ArgumentParser, name: str) -> None:
    filt, sampler = get_preset(name)
    defaults = {f"filter.{k}": v for k, v in dataclasses.asdict(filt).items()}
    defaults |= {f"sampler.{k}": v for k, v in dataclasses.asdict(sampler).items()}
    parser.set_defaults(defaults)


def _config_paths(argv: list[str]) -> list[str]:
    """The files given with ``--config`` (repeatable), in order."""
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    return paths + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


def check_yaml_syntax(path: str | Path) -> None:
    """Raise ``InputError(file, line)`` for a YAML syntax error in a config file.

    jsonargparse parses the file's text, so its own message names ``<unicode string>`` instead of the file. Only
    the syntax is checked here (``yaml.compose``: no values are built); a missing file is left to jsonargparse.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        return
    try:
        with open(path, encoding="utf-8") as fh:
            yaml.compose(fh, Loader=yaml.SafeLoader)
    except UnicodeDecodeError as err:
        raise InputError(f"config is not valid UTF-8 ({err.reason} at byte {err.start})", path) from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = "; ".join(part for part in (err.context, err.problem) if part) or "syntax error"
        raise InputError(f"invalid YAML: {problem}{where}", path, mark.line + 1 if mark else None) from err


def parse_config(argv: list[str]) -> tuple[MineConfig, dict]:
    """``MineConfig`` plus the CLI-only options (``preset``, ``export``, ``export_path``)."""
    for path in _config_paths(argv):
        check_yaml_syntax(path)
    parser = build_parser()
    preset = _preset_name(argv)
    if preset is not None:
        _apply_preset(parser, preset)
    ns = parser.parse_args(argv)
    init = parser.instantiate(ns)
    fields = {f.name for f in dataclasses.fields(MineConfig)}
    kwargs = {k: v for k, v in vars(init).items() if k in fields}
    extra = {k: getattr(init, k, None) for k in _EXTRA}
    return MineConfig(**kwargs), extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, extra = parse_config(argv)
    except ArgumentError as err:
        print(f"nvr mine: error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    from nvr.mining.pipeline import mine

    out = mine(cfg)
    if dist_rank_world()[0] != 0:
        return 0  # rank 0 writes, reports and exports
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    print("\n".join(summary_lines(report)))
    print(f"mined -> {out}")
    if extra["export"]:
        from nvr.mining.export import to_flagembedding, to_sentence_transformers

        target = Path(extra["export_path"] or out / EXPORTS[extra["export"]])
        if extra["export"] == "st":
            counts = to_sentence_transformers(out, target, overwrite=cfg.overwrite)
        else:
            counts = to_flagembedding(out, target, overwrite=cfg.overwrite)
        print(f"exported {extra['export']} -> {target} {counts}")
    return 0
