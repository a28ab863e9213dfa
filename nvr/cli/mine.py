"""``nvr mine``: offline hard-negative mining from a YAML config and/or flags.

Examples::

    nvr mine --config configs/mine/topk_percpos_cranfield.yaml
    nvr mine --config my.yaml --preset sampled_topk_10 --output_dir runs/sampled --export st
    nvr mine --config my.yaml --fn_report --fn.holdout 0.5       # + false-negative report in <output_dir>/fn_report

Options apply in command-line order and the later one wins (as in LightningCLI): ``--preset`` stands for all its
``--filter.*`` / ``--sampler.*`` values, so a preset after ``--config`` replaces the config's filter and sampler,
and a config or flag after the preset overrides it. Unknown keys, duplicate YAML keys and bad values end with one
``error:`` line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Literal

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from nvr.config.mining import FnReportConfig, MineConfig
from nvr.mining.presets import PRESETS, get_preset
from nvr.mining.report import print_mining_summary
from nvr.utils.distributed import dist_rank_world
from nvr.utils.errors import ConfigError, nvr_error_in
from nvr.utils.preflight import check_output_file
from nvr.utils.yamlcheck import check_yaml_file, config_paths

_EXTRA = ("config", "preset", "export", "export_path", "print_config", "fn_report", "fn")
EXPORTS = {"st": "sentence_transformers.jsonl", "st_triplet": "sentence_transformers_triplet.jsonl",
           "flag": "flagembedding.jsonl"}
"""``--export`` choices and their default file inside the output folder (st = n-tuple: rows with fewer than
num_negatives negatives are dropped; st_triplet = one row per negative, short rows kept)."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="nvr mine", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with MineConfig fields")
    parser.add_argument("--preset", type=str, default=None,
                        help=f"filter+sampler preset (later options win): {', '.join(PRESETS)}")
    # a Literal, not choices=[None, ...]: jsonargparse turned that into a lambda type shown as
    # "<function <locals>.<lambda>>" in --help
    parser.add_argument("--export", type=Literal[tuple(EXPORTS)] | None, default=None,
                        help="also export: st (n-tuple) | st_triplet | flag")
    parser.add_argument("--export_path", type=str, default=None, help="export file (default: inside output_dir)")
    parser.add_argument("--fn_report", action=ActionYesNo, default=False,
                        help="after mining, write the false-negative report (nvr.mining.fn_report) to "
                             "<output_dir>/fn_report; options under --fn.*")
    parser.add_class_arguments(FnReportConfig, "fn")
    parser.add_class_arguments(MineConfig)
    return parser


def _preset_flags(name: str) -> list[str]:
    """The ``--filter.*`` / ``--sampler.*`` flags a preset stands for (every field, so it fully sets both)."""
    filt, sampler = get_preset(name)
    flags: list[str] = []
    for group, obj in (("filter", filt), ("sampler", sampler)):
        for key, value in dataclasses.asdict(obj).items():
            flags += [f"--{group}.{key}", json.dumps(value) if not isinstance(value, str) else value]
    return flags


def expand_presets(argv: list[str]) -> tuple[list[str], str | None]:
    """Replace each ``--preset NAME`` by the flags it stands for, in place: options are applied in command-line
    order, so whatever comes later (``--config``, ``--filter.*``, another preset) wins, as in LightningCLI."""
    out: list[str] = []
    name: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--preset" or arg.startswith("--preset="):
            if arg == "--preset":
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError("preset", f"expected a preset name: {', '.join(PRESETS)}")
                name, i = argv[i + 1], i + 2
            else:
                name, i = arg.split("=", 1)[1], i + 1
            out += _preset_flags(name)
            continue
        out.append(arg)
        i += 1
    return out, name


def check_yaml_syntax(path: str | Path) -> None:
    """Raise ``InputError(file, line)`` for a YAML syntax error or a duplicate key in a config file.

    jsonargparse parses the file's text, so its own message names ``<unicode string>`` instead of the file, and
    PyYAML keeps the last of two equal keys without a word. A missing file is left to jsonargparse.
    """
    check_yaml_file(path)


def parse_config(argv: list[str]) -> tuple[MineConfig, dict]:
    """``MineConfig`` plus the CLI-only options (``preset``, ``export``, ``export_path``)."""
    for path in config_paths(argv):
        check_yaml_syntax(path)
    argv, preset = expand_presets(argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        init = parser.instantiate(ns)
    except ValueError as err:  # a nullable dataclass's ConfigError arrives wrapped in jsonargparse's Union error
        cause = nvr_error_in(err)
        if cause is None:
            raise
        raise cause from None
    fields = {f.name for f in dataclasses.fields(MineConfig)}
    kwargs = {k: v for k, v in vars(init).items() if k in fields}
    extra = {k: getattr(init, k, None) for k in _EXTRA}
    extra["preset"] = preset
    return MineConfig(**kwargs), extra


def check_export_target(cfg: MineConfig, extra: dict) -> None:
    """Fail before mining when the export file cannot be written (it is written after the whole run)."""
    if extra.get("export") and extra.get("export_path"):  # the default lies inside output_dir (checked by mine)
        check_output_file(extra["export_path"], "export_path", overwrite=cfg.overwrite)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, extra = parse_config(argv)
    except ArgumentError as err:
        print(f"nvr mine: error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    check_export_target(cfg, extra)
    if not extra["fn_report"] and extra["fn"] != FnReportConfig():
        raise ConfigError("fn", "--fn.* options are set but --fn_report is not")
    if extra["fn_report"] and cfg.stream_chunk_queries is not None:  # the report re-filters whole tables
        raise ConfigError("stream_chunk_queries", "not supported together with --fn_report (it needs every query's "
                                                  "candidates at once); unset one of them")
    from nvr.mining.pipeline import mine

    out = mine(cfg)
    if dist_rank_world()[0] != 0:
        return 0  # rank 0 writes, reports and exports
    print_mining_summary(out)
    if extra["export"]:
        from nvr.mining.export import to_flagembedding, to_sentence_transformers

        target = Path(extra["export_path"] or out / EXPORTS[extra["export"]])
        if extra["export"] in ("st", "st_triplet"):
            fmt = "triplet" if extra["export"] == "st_triplet" else "n-tuple"
            counts = to_sentence_transformers(out, target, overwrite=cfg.overwrite, output_format=fmt)
        else:
            counts = to_flagembedding(out, target, overwrite=cfg.overwrite)
        print(f"exported {extra['export']} -> {target} {counts}")
    if extra["fn_report"]:
        from nvr.mining.fn_report import build_fn_report, write_fn_report
        from nvr.mining.fn_report import summary_lines as fn_summary

        fn_report = build_fn_report(cfg, extra["fn"])  # the mined folder was just written: replace its report
        folder = write_fn_report(fn_report, out / "fn_report", overwrite=True, title=out.name)
        print("\n".join(fn_summary(fn_report)))
        print(f"false-negative report -> {folder}")
    return 0
