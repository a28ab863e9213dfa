"""Run an ablation grid: every (variant, seed) is one ``nvr fit`` subprocess with dotted-key overrides.

Layout under ``spec.output_dir``::

    runs/<variant>/seed-<seed>/   command.json, fit.log, logs/attempt-<n>/{metrics.csv, config.yaml, checkpoints/},
                                  result.json (written last, atomically: its presence means "finished")
    mined/<fingerprint>/          mined sets, one per distinct mining config (shared by seeds and variants)
    results.md, results.csv, runs.csv, *.png

Why subprocesses: each run gets a fresh interpreter (no leaked global state, DDP launchers work as usual) and the
exact command is stored so any run can be reproduced by hand. Candidate tables and teacher embeddings live in the
base config's ``data.mining.cache_dir``, so a filter or sampler sweep encodes and searches the corpus once.

Re-running the same spec is resumable: finished runs are skipped, an interrupted run restarts from its newest
checkpoint (``--ckpt_path``), a run without checkpoint starts over.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nvr.ablation.spec import AblationSpec, Variant
from nvr.utils.atomic import write_json_atomic
from nvr.utils.errors import ConfigError, InputError, NvrError
from nvr.utils.hashing import sha256_json
from nvr.utils.yamlcheck import check_yaml_file

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
COMMAND_FILE = "command.json"
LOG_FILE = "fit.log"
LOGS_DIR = "logs"
TRAIN_LOSS = "train/loss"


class RunFailedError(NvrError, RuntimeError):
    """A run of the grid failed (raised only with ``fail_fast``)."""


@dataclass
class RunPlan:
    """One (variant, seed) run: its folder, its mined-set folder and the overrides given to ``nvr fit``."""

    variant: Variant
    seed: int
    run_dir: Path
    mined_dir: Path | None
    overrides: dict[str, Any]
    borrowed_from: str | None = None
    """The spec that runs this one (a ``from:`` row): read here, never executed here."""

    @property
    def run_id(self) -> str:
        return f"{self.variant.name}/seed-{self.seed}"

    @property
    def done(self) -> bool:
        return (self.run_dir / RESULT_FILE).is_file()


@dataclass
class RunOutcome:
    plan: RunPlan
    status: str
    """done (finished earlier, skipped) | ok | failed | planned (dry run)"""
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ------------------------------------------------------------------------------------------- base config
def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_base_config(paths: Sequence[str]) -> dict[str, Any]:
    """The base ``nvr fit`` YAML(s) merged in order (read only to find the mining and logger sections)."""
    merged: dict[str, Any] = {}
    for i, path in enumerate(paths):
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"base_config[{i}]", f"{path}: no such file")
        check_yaml_file(file)
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise InputError(f"invalid YAML: {getattr(err, 'problem', err)}", file,
                             mark.line + 1 if mark is not None else None) from err
        if not isinstance(data, dict):
            raise InputError("an nvr fit config must be a mapping", file)
        merged = _deep_merge(merged, data)
    return merged


def config_get(config: dict[str, Any], dotted: str) -> Any:
    """Value at a dotted key, looking through ``init_args`` of ``class_path`` entries; None when absent."""
    node: Any = config
    for part in dotted.split("."):
        if isinstance(node, dict) and part not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------- planning
def run_overrides(spec: AblationSpec, variant: Variant, seed: int) -> dict[str, Any]:
    """Common overrides, then the variant's, then the seed keys (later keys win); a borrowed row's are its own
    spec's."""
    if variant.borrowed is not None:
        other, theirs = resolve_borrowed(spec, variant)
        return run_overrides(other, theirs, seed)
    return {**spec.overrides, **variant.overrides, **{key: seed for key in spec.seed_keys}}


def resolve_borrowed(spec: AblationSpec, variant: Variant) -> tuple[AblationSpec, Variant]:
    """The other spec and variant behind a ``from:`` row, refused unless its runs are ones this spec would make:
    the same base config, fit args, metric and selection, seed keys that fix at least this spec's (so a seed is the
    same data order and pairing by seed holds) and this spec's common overrides."""
    from nvr.ablation.spec import load_spec

    assert variant.borrowed is not None
    key = f"variants.{variant.name}.from"
    try:
        other = load_spec(variant.borrowed.spec)
    except (ConfigError, InputError) as err:
        raise ConfigError(f"{key}.spec", str(err)) from err
    try:
        theirs = other.variant(variant.borrowed.variant)
    except ConfigError as err:
        raise ConfigError(f"{key}.variant", f"{variant.borrowed.spec} has no variant '{variant.borrowed.variant}'; "
                          f"known: {[v.name for v in other.all_variants()]}") from err
    where = f"{variant.borrowed.spec}'s '{theirs.name}'"
    if theirs.borrowed is not None or theirs.disabled:
        raise ConfigError(key, f"{where} is itself {'borrowed' if theirs.borrowed else 'disabled'}: borrow from the "
                          "spec that runs it")
    mismatch = [name for name, ours, them in (
        ("base_config", load_base_config(spec.base_config), load_base_config(other.base_config)),
        ("fit_args", spec.fit_args, other.fit_args), ("metric", spec.metric, other.metric),
        ("select", spec.select, other.select)) if ours != them]
    missing = [k for k in spec.seed_keys if k not in other.seed_keys]
    if missing:
        mismatch.append(f"seed_keys ({', '.join(missing)} not set by its seeds)")
    theirs_first = run_overrides(other, theirs, other.seeds[0])
    mismatch += [f"overrides.{k}" for k, v in spec.overrides.items() if k not in theirs_first or theirs_first[k] != v]
    if mismatch:
        raise ConfigError(key, f"{where} runs differently from this spec ({'; '.join(mismatch)} differ): its "
                          "numbers would not compare")
    return other, theirs


def mined_dir_for(spec: AblationSpec, base: dict[str, Any], overrides: dict[str, Any]) -> Path | None:
    """Where this run's mined set lives: an explicit ``data.mined_dir``, else (when the run mines) a folder
    named by the mining config's content so identical mining configs share one mined set."""
    if overrides.get("data.mined_dir"):
        return Path(str(overrides["data.mined_dir"]))
    mining = config_get(base, "data.mining")
    mining_overrides = {k: v for k, v in overrides.items() if k.startswith("data.mining.") or k == "data.mining"}
    if mining is None and not mining_overrides:
        existing = config_get(base, "data.mined_dir")
        return Path(str(existing)) if existing else None
    key = sha256_json({"mining": mining, "overrides": sorted(mining_overrides.items(), key=lambda kv: kv[0])})
    content = content_address(effective_mining(mining, mining_overrides))
    return Path(spec.output_dir) / "mined" / (content or key[:16])


def effective_mining(mining: Any, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The run's ``data.mining`` section as a plain dict: the base section with the dotted overrides applied."""
    out: Any = copy.deepcopy(mining) if isinstance(mining, dict) else None  # parsing must not touch the base
    for key, value in sorted(overrides.items()):
        if key == "data.mining":
            out = copy.deepcopy(value) if isinstance(value, dict) else None
            continue
        if out is None:
            out = {}
        node = out
        parts = key[len("data.mining."):].split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = copy.deepcopy(value)
    return out


def content_address(mining: dict[str, Any] | None) -> str | None:
    """The mined-set content address ``nvr fit`` itself uses (config + input file contents + teacher and
    cross-encoder identities), so editing the corpus or retraining a teacher in place gives the grid a new mined
    set. None when it cannot be computed without loading a model (a hub id not on this machine yet) or before the
    data exists: the folder is then named by the config alone (``--dry_run`` of a paper-scale spec stays offline)."""
    if not mining:
        return None
    from jsonargparse import ArgumentParser

    from nvr.config.mining import MineConfig
    from nvr.mining.pipeline import mining_fingerprint
    from nvr.utils.fingerprint import model_folder

    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--mining", type=MineConfig)
        cfg = parser.instantiate_classes(parser.parse_object({"mining": mining})).mining
    except Exception:  # an invalid section is reported by the grid's config validation, not here
        return None
    models = [t.model_name_or_path for t in cfg.teachers if t.kind == "dense"]
    models += [cfg.cross_encoder.model_name_or_path] if cfg.cross_encoder is not None else []
    if any(model_folder(str(m)) is None for m in models):
        return None
    try:
        Path(cfg.cache_dir).expanduser().mkdir(parents=True, exist_ok=True)  # holds the file-hash memo
        return mining_fingerprint(cfg)
    except (NvrError, OSError):
        return None


def plan_runs(spec: AblationSpec, variants: Iterable[str] | None = None,
              seeds: Iterable[int] | None = None) -> list[RunPlan]:
    """Every (variant, seed) of the spec, optionally restricted; disabled variants are never planned."""
    wanted = set(variants) if variants is not None else None
    chosen_seeds = list(seeds) if seeds is not None else spec.seeds
    known = {v.name for v in spec.all_variants()}
    for name in sorted(wanted or ()):
        if name not in known:
            raise ConfigError("variants", f"no variant named '{name}'; known: {sorted(known)}")
    for seed in chosen_seeds:
        if seed not in spec.seeds:
            raise ConfigError("seeds", f"seed {seed} is not in the spec's seeds {spec.seeds}")
    base = load_base_config(spec.base_config)
    plans = []
    for variant in spec.all_variants():
        if variant.disabled or (wanted is not None and variant.name not in wanted):
            continue
        if variant.borrowed is not None:
            plans += _borrowed_plans(spec, variant, chosen_seeds)
            continue
        for seed in chosen_seeds:
            overrides = run_overrides(spec, variant, seed)
            plans.append(RunPlan(
                variant=variant, seed=seed, run_dir=Path(spec.output_dir) / "runs" / variant.name / f"seed-{seed}",
                mined_dir=mined_dir_for(spec, base, overrides), overrides=overrides,
            ))
    return plans


def _borrowed_plans(spec: AblationSpec, variant: Variant, seeds: Sequence[int]) -> list[RunPlan]:
    """A ``from:`` row's runs, in the other spec's folders, for the seeds both specs have."""
    other, theirs = resolve_borrowed(spec, variant)
    assert variant.borrowed is not None
    return [dataclasses.replace(plan, variant=variant, borrowed_from=variant.borrowed.spec)
            for plan in plan_runs(other, [theirs.name], [s for s in seeds if s in other.seeds])]


def runnable(plans: Sequence[RunPlan]) -> list[RunPlan]:
    """The plans this spec executes (a borrowed row is run by its own spec)."""
    return [p for p in plans if p.borrowed_from is None]


def shard_plans(plans: Sequence[RunPlan], index: int, count: int) -> list[RunPlan]:
    """Runs of shard ``index`` of ``count``: whole mined-set groups go to one shard, so no two machines mine
    the same folder at once."""
    if count <= 0 or not 0 <= index < count:
        raise ConfigError("shard", f"need 0 <= index < count, got {index}/{count}")
    groups: dict[str, int] = {}
    for plan in plans:
        groups.setdefault(str(plan.mined_dir or plan.run_dir), len(groups))
    return [p for p in plans if groups[str(p.mined_dir or p.run_dir)] % count == index]


# ---------------------------------------------------------------------------------------------- commands
def cli_value(value: Any) -> str:
    """A value as jsonargparse reads it from the command line (YAML/JSON for non-strings)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _logger_value(base: dict[str, Any], overrides: dict[str, Any], run_dir: Path, attempt: int) -> list[Any]:
    """A CSVLogger first (metrics and loss curves are read from it; the first logger also decides where
    checkpoints go), then the loggers the base config already had."""
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": str(run_dir), "name": LOGS_DIR, "version": f"attempt-{attempt}"}}
    existing = overrides.get("trainer.logger", config_get(base, "trainer.logger"))
    if isinstance(existing, dict):
        return [csv_logger, existing]
    if isinstance(existing, list):
        return [csv_logger, *[e for e in existing if isinstance(e, dict)]]
    return [csv_logger]


def fit_argv(spec: AblationSpec, plan: RunPlan, attempt: int = 0, ckpt_path: Path | None = None,
             extra_args: Sequence[str] = (), base: dict[str, Any] | None = None) -> list[str]:
    """The ``nvr fit`` arguments of one run (``fit --config ... --dotted.key value ...``)."""
    base = load_base_config(spec.base_config) if base is None else base
    argv = ["fit"]
    for path in spec.base_config:
        argv += ["--config", str(path)]
    managed: dict[str, Any] = {"trainer.default_root_dir": str(plan.run_dir),
                               "trainer.logger": _logger_value(base, plan.overrides, plan.run_dir, attempt)}
    mines = config_get(base, "data.mining") is not None or any(k.startswith("data.mining") for k in plan.overrides)
    if plan.mined_dir is not None and mines:
        managed["data.mined_dir"] = str(plan.mined_dir)
    for key, value in {**plan.overrides, **managed}.items():
        argv += [f"--{key}", cli_value(value)]
    if ckpt_path is not None:
        argv += ["--ckpt_path", str(ckpt_path)]
    return [*argv, *spec.fit_args, *extra_args]


def shell_command(argv: Sequence[str], python: str | None = None) -> list[str]:
    """The subprocess command line for ``fit_argv`` output."""
    return [python or sys.executable, "-m", "nvr", *argv]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newest ``last.ckpt``, else the newest ``*.ckpt`` of the run."""
    if not run_dir.is_dir():
        return None
    found = sorted(run_dir.rglob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))
    return found[-1] if found else None


def _attempts(run_dir: Path) -> list[Path]:
    logs = run_dir / LOGS_DIR
    if not logs.is_dir():
        return []
    found = [p for p in logs.iterdir() if p.is_dir() and p.name.startswith("attempt-") and p.name[8:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[8:]))


# ----------------------------------------------------------------------------------------------- metrics
def read_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged column as (step, value) pairs over all attempts; a resumed attempt replaces the points of
    earlier attempts from its first step on."""
    series: dict[str, list[tuple[int, float]]] = {}
    for attempt in _attempts(run_dir):
        file = attempt / "metrics.csv"
        if not file.is_file():
            continue
        points: dict[str, list[tuple[int, float]]] = {}
        with open(file, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                step = row.get("step")
                if step in (None, ""):
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in (None, ""):
                        continue
                    points.setdefault(key, []).append((int(float(step)), float(value)))
        first = min((pts[0][0] for pts in points.values() if pts), default=None)
        if first is not None:
            series = {k: [(s, v) for s, v in pts if s < first] for k, pts in series.items()}
        for key, pts in points.items():
            series.setdefault(key, []).extend(pts)
    return series


def summarize_run(spec: AblationSpec, plan: RunPlan, series: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """The result record of a finished run; raises if the metric was never logged."""
    points = series.get(spec.metric, [])
    if not points:
        logged = sorted(k for k in series if k.startswith("val"))
        raise RunFailedError(
            f"{plan.run_id}: '{spec.metric}' was never logged (logged: {logged or 'no validation metric'}); "
            "check data.eval_sets and that validation runs (trainer.val_check_interval / check_val_every_n_epoch)")
    best_step, best = max(points, key=lambda p: (p[1], -p[0]))
    final_step, final = points[-1]
    loss = series.get(TRAIN_LOSS, [])
    return {
        "variant": plan.variant.name, "seed": plan.seed, "metric": spec.metric,
        "value": final if spec.select == "final" else best, "select": spec.select,
        "final": final, "final_step": final_step, "best": best, "best_step": best_step,
        "last_train_step": max((s for pts in series.values() for s, _ in pts), default=None),
        "final_train_loss": loss[-1][1] if loss else None,
        "metrics_at_final": {k: v[-1][1] for k, v in series.items() if k.startswith("val") and v},
        "mined_dir": str(plan.mined_dir) if plan.mined_dir else None,
    }


# ---------------------------------------------------------------------------------------------- execution
def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


Launcher = Callable[[list[str], Path, float | None], int | str]


def subprocess_launcher(argv: list[str], log_path: Path, timeout_s: float | None) -> int | str:
    """``python -m nvr <argv>`` in a fresh interpreter, output appended to ``log_path``."""
    cmd = shell_command(argv)
    with open(log_path, "a", encoding="utf-8") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, check=False,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            return f"timeout after {timeout_s} s"
    return proc.returncode


def inprocess_launcher(argv: list[str], log_path: Path, timeout_s: float | None) -> int | str:
    """Run ``nvr fit`` inside this interpreter (no start-up cost; for debugging and tests). Not isolated:
    global state such as torch's thread count survives between runs. ``timeout_s`` is not enforced."""
    from nvr.cli.lightning_cli import main as fit_main

    with open(log_path, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args= is intended here
        try:
            return fit_main(list(argv)) or 0
        except SystemExit as err:
            return err.code if isinstance(err.code, int) else 1
        except Exception as err:  # a failed run is recorded, not fatal to the grid
            fh.write(f"{type(err).__name__}: {err}\n")
            return f"{type(err).__name__}: {err}"


LAUNCHERS: dict[str, Launcher] = {"subprocess": subprocess_launcher, "inprocess": inprocess_launcher}


def execute_run(spec: AblationSpec, plan: RunPlan, extra_args: Sequence[str] = (), timeout_s: float | None = None,
                base: dict[str, Any] | None = None, launcher: Launcher = subprocess_launcher) -> RunOutcome:
    """Run (or resume) one run and record ``result.json`` or ``failed.json``."""
    if plan.done:
        return RunOutcome(plan, "done", json.loads((plan.run_dir / RESULT_FILE).read_text(encoding="utf-8")))
    ckpt = latest_checkpoint(plan.run_dir)
    if ckpt is None and plan.run_dir.exists():
        shutil.rmtree(plan.run_dir)  # an interrupted run with nothing to resume from: start clean
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / FAILED_FILE).unlink(missing_ok=True)
    attempt = len(_attempts(plan.run_dir))
    argv = fit_argv(spec, plan, attempt, ckpt, extra_args, base=base)
    cmd = shell_command(argv)
    write_json_atomic(plan.run_dir / COMMAND_FILE, {"argv": cmd, "shell": shlex.join(cmd), "cwd": os.getcwd()})
    log_path = plan.run_dir / LOG_FILE
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"### attempt {attempt}{f' (resume from {ckpt})' if ckpt else ''}: {shlex.join(cmd)}\n")
    started = time.monotonic()
    code = launcher(argv, log_path, timeout_s)
    wall = round(time.monotonic() - started, 2)
    try:
        if code != 0:
            raise RunFailedError(f"{plan.run_id}: nvr fit exited with {code}; last lines of {log_path}:\n"
                                 f"{_tail(log_path)}")
        result = summarize_run(spec, plan, read_series(plan.run_dir))
    except RunFailedError as err:
        write_json_atomic(plan.run_dir / FAILED_FILE, {"error": str(err), "returncode": str(code), "wall_s": wall})
        return RunOutcome(plan, "failed", error=str(err))
    result.update({"wall_s": wall, "attempts": attempt + 1, "command": cmd})
    write_json_atomic(plan.run_dir / RESULT_FILE, result)
    return RunOutcome(plan, "ok", result)


def describe_plan(spec: AblationSpec, plans: Sequence[RunPlan], extra_args: Sequence[str] = ()) -> str:
    """Human-readable list of planned runs with their status and exact command (``--dry_run``)."""
    base = load_base_config(spec.base_config)
    borrowed = len(plans) - len(runnable(plans))
    lines = [f"ablation '{spec.name}': {len(plans) - borrowed} runs -> {spec.output_dir}"
             + (f" (and {borrowed} borrowed, run by their own specs)" if borrowed else "")]
    for plan in plans:
        if plan.borrowed_from is not None:
            state = "done" if plan.done else "not run yet: run it there"
            lines.append(f"[borrowed] {plan.run_id}  from {plan.borrowed_from} ({state}): {plan.run_dir}")
            continue
        ckpt = latest_checkpoint(plan.run_dir)
        status = "done" if plan.done else ("resume" if ckpt else "todo")
        lines.append(f"[{status}] {plan.run_id}  mined: {plan.mined_dir}")
        argv = fit_argv(spec, plan, len(_attempts(plan.run_dir)), ckpt, extra_args, base=base)
        lines.append("    " + shlex.join(shell_command(argv)))
    for variant in spec.all_variants():
        if variant.disabled:
            lines.append(f"[disabled] {variant.name}: {variant.disabled}")
    return "\n".join(lines)


def run_grid(spec: AblationSpec, plans: Sequence[RunPlan], extra_args: Sequence[str] = (), fail_fast: bool = False,
             timeout_s: float | None = None, launcher: Launcher = subprocess_launcher,
             echo: Callable[[str], None] = print) -> list[RunOutcome]:
    """Execute runs in order (skipping finished ones); failures are recorded and, with ``fail_fast``, raised."""
    base = load_base_config(spec.base_config)
    outcomes = []
    plans = runnable(plans)
    for i, plan in enumerate(plans, 1):
        if not plan.done:
            echo(f"[{i}/{len(plans)}] {plan.run_id}: running (log: {plan.run_dir / LOG_FILE})")
        outcome = execute_run(spec, plan, extra_args, timeout_s, base=base, launcher=launcher)
        outcomes.append(outcome)
        if outcome.status == "failed":
            echo(f"[{i}/{len(plans)}] {plan.run_id}: FAILED\n{outcome.error}")
            if fail_fast:
                raise RunFailedError(outcome.error or plan.run_id)
        else:
            value = outcome.result.get("value")
            echo(f"[{i}/{len(plans)}] {plan.run_id}: {outcome.status} {spec.metric}={value:.4f}")
    return outcomes
