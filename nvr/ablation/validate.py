"""Check an ablation grid against the ``nvr fit`` schema before any run starts (and on ``--dry_run``).

Each variant's exact ``nvr fit`` command line is parsed by the real LightningCLI parser (unknown keys, wrong
types) and its typed configs are built (``MineConfig`` / ``EmbedderConfig`` / ``EvalSetConfig`` range checks such
as a NaN threshold), without instantiating the model, the data or the trainer. A typo in an override key then
fails in a second, naming the key and variant, instead of failing every run of the grid.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Sequence
from typing import Any

from nvr.ablation.runner import RunPlan, fit_argv, load_base_config
from nvr.ablation.spec import AblationSpec
from nvr.utils.errors import ConfigError, NvrError


class _Parsed(Exception):
    """Raised from the parse-only CLI once the config is parsed and its typed parts validated."""


def _typed_parts_problem(config: Any) -> str | None:
    """Build the dataclass configs of a parsed ``fit`` namespace; their ``__post_init__`` checks run here."""
    from jsonargparse import ArgumentParser

    from nvr.config.mining import MineConfig
    from nvr.evaluation.data import EvalSetConfig
    from nvr.modeling.config import EmbedderConfig

    data, model = config.get("data"), config.get("model")
    parts = [  # (name, type, value, how a ConfigError key of that part maps to the nvr fit key)
        ("embedder", EmbedderConfig | None, model.get("embedder") if model is not None else None,
         lambda k: f"model.{k}" if k.startswith("embedder") else f"model.embedder.{k}"),
        ("mining", MineConfig | None, data.get("mining") if data is not None else None, lambda k: f"data.mining.{k}"),
        ("eval_sets", list[EvalSetConfig] | None, data.get("eval_sets") if data is not None else None,
         lambda k: f"data.{k}"),
    ]
    for name, typ, value, rekey in parts:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument(f"--{name}", type=typ)
        try:
            parser.instantiate_classes(parser.parse_object({name: _plain(value)}))
        except ConfigError as err:
            return f"config key '{rekey(err.key)}': {err.message}"
    return None


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or list of them) as plain dicts."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def short_reason(message: str) -> str:
    """The informative line of a (multi-line) jsonargparse error."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    for line in lines:
        if "unrecognized arguments" in line or "does not accept" in line or "not accepted" in line:
            return line
    for line in reversed(lines):
        if line.startswith(("Expected", "Parser key", "- Problem")) and "Union subtypes" not in line:
            return line
    return " ".join(lines)[:300]


def fit_argv_problem(argv: Sequence[str]) -> str | None:
    """None when ``nvr fit`` would accept ``argv`` (``["fit", ...]``), else a one-line reason."""
    from nvr.cli.lightning_cli import NvrCLI
    from nvr.training.datamodule import MinedDataModule
    from nvr.training.module import BiEncoderModule

    class ParseOnly(NvrCLI):
        def before_instantiate_classes(self) -> None:
            problem = _typed_parts_problem(self.config[self.subcommand])
            raise _Parsed(problem)

    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            ParseOnly(BiEncoderModule, MinedDataModule, args=list(argv), parser_kwargs={"exit_on_error": False},
                      seed_everything_default=42, save_config_callback=None)
    except _Parsed as done:
        return done.args[0]
    except NvrError as err:
        return str(err)
    except SystemExit:
        return short_reason(sink.getvalue()) or "rejected by the nvr fit parser"
    except Exception as err:  # jsonargparse raises ArgumentError (and friends) with exit_on_error=False
        return short_reason(str(err))
    return None


def _plan_with(plan: RunPlan, overrides: dict[str, Any]) -> RunPlan:
    return RunPlan(variant=plan.variant, seed=plan.seed, run_dir=plan.run_dir, mined_dir=plan.mined_dir,
                   overrides=overrides)


def _culprit(spec: AblationSpec, plan: RunPlan, base: dict[str, Any], extra: Sequence[str]) -> str | None:
    """The first override key that fails on its own (None when only the combination fails)."""
    for key, value in plan.overrides.items():
        if fit_argv_problem(fit_argv(spec, _plan_with(plan, {key: value}), extra_args=extra, base=base)):
            return key
    return None


def _mentioned(problem: str, keys: Sequence[str]) -> str | None:
    """An override key the parser's message names (by its full dotted key or its last parts)."""
    for key in sorted(keys, key=len, reverse=True):
        parts = key.split(".")
        for i in range(len(parts)):
            tail = ".".join(parts[i:])
            if re.search(rf"(--|\"|'){re.escape(tail)}([=\s\"']|$)", problem):
                return key
    return None


def validate_plans(spec: AblationSpec, plans: Sequence[RunPlan], extra_args: Sequence[str] = (),
                   source: str = "") -> None:
    """Raise ``ConfigError`` naming the override key (and variant) that ``nvr fit`` would reject."""
    base = load_base_config(spec.base_config)
    where = f" (in {source})" if source else ""
    checked: set[str] = set()
    for plan in plans:
        if plan.variant.name in checked:
            continue
        checked.add(plan.variant.name)
        problem = fit_argv_problem(fit_argv(spec, plan, extra_args=extra_args, base=base))
        if problem is None:
            continue
        if fit_argv_problem(fit_argv(spec, _plan_with(plan, {}), extra_args=extra_args, base=base)):
            raise ConfigError("base_config", f"nvr fit rejects the base config{where}: {problem}")
        key = _mentioned(problem, list(plan.overrides)) or _culprit(spec, plan, base, extra_args)
        label = f"overrides.{key}" if key else "overrides"
        raise ConfigError(label, f"variant '{plan.variant.name}': nvr fit rejects it: {problem}{where}")
