"""Ablation specs: a YAML that names a ``nvr fit`` base config, the variants / sweeps to compare and the seeds.

Example::

    name: table3_methods
    base_config: configs/fit/e5_large_unsup_paper.yaml   # one path or a list (applied in order)
    output_dir: runs/ablations/table3
    seeds: [0, 1, 2]
    metric: val/ndcg@10
    overrides: {data.num_negatives: 4}                   # applied to every run
    variants:
      - {name: naive, overrides: {data.mining.filter.method: naive_topk}, paper: 0.5407}
    sweeps:
      - {name: percpos, key: data.mining.filter.perc, values: [0.9, 0.95, 1.0],
         overrides: {data.mining.filter.method: topk_percpos}, paper: {0.95: 0.5856}}
    histograms: [naive, percpos=0.95]
    fn_report: {holdout: 0.5}    # optional: false-negative report of every mining variant (fn_report/ folder)
    reference: naive             # optional: paired-by-seed comparisons against this variant (default: the first)

A variant ``{name: dense, from: {spec: other.yaml, variant: percpos-0.95}}`` borrows another spec's finished runs
(same base config, fit args, metric and seed keys, checked when planning): the row is reported and paired by seed
here, but run only by the other spec.

A sweep expands to one variant per value, named ``<sweep>=<value>``. Relative paths (``base_config``,
``output_dir``) are relative to the working directory, like the paths inside ``nvr fit`` configs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nvr.config.mining import FnReportConfig
from nvr.utils.errors import ConfigError, InputError, config_key_scope
from nvr.utils.yamlcheck import check_yaml_file

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
DEFAULT_SEED_KEYS = ("seed_everything", "data.seed")
_SPEC_KEYS = {"name", "description", "base_config", "output_dir", "seeds", "seed_keys", "metric", "select",
              "report_metrics", "overrides", "variants", "sweeps", "paper", "histograms", "fit_args", "fn_report",
              "reference"}


@dataclass
class Variant:
    """One arm of the comparison: the base config plus ``overrides`` (dotted ``nvr fit`` keys)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: float | None = None
    """The paper's number for this arm (shown beside ours; not used in any computation of ours)."""
    sweep: str | None = None
    """Sweep this variant belongs to (None for a listed variant)."""
    x: float | None = None
    """The swept value (for metric-vs-threshold plots)."""
    disabled: str | None = None
    """Reason this arm cannot run yet; listed in the results table but never planned."""
    borrowed: Borrowed | None = None
    """A row whose runs belong to another spec (``from:``): read from there, never run here."""


@dataclass(frozen=True)
class Borrowed:
    """``from: {spec, variant}``: another spec's variant, shown (and paired by seed) in this table without re-running
    it, e.g. the dense-teacher row of a teacher table that is the method table's PercPos row."""

    spec: str
    """Path of the other ablation YAML (relative to the working directory, like ``base_config``)."""
    variant: str


@dataclass
class Sweep:
    """``key`` takes each of ``values`` on top of ``overrides``."""

    name: str
    key: str
    values: list[Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)
    """Paper numbers by swept value (keys compared as formatted values, e.g. ``0.95``)."""


@dataclass
class AblationSpec:
    """A whole experiment (one paper table or figure)."""

    name: str
    base_config: list[str]
    output_dir: str
    seeds: list[int]
    variants: list[Variant]
    sweeps: list[Sweep] = field(default_factory=list)
    description: str = ""
    metric: str = "val/ndcg@10"
    select: str = "final"
    """Which logged value of ``metric`` a run contributes: ``final`` (last validation) or ``best``."""
    report_metrics: list[str] = field(default_factory=list)
    """Further logged metrics shown beside ``metric`` (mean ± std at each run's final validation), e.g. an
    out-of-domain eval set (``val/cranfield/ndcg@10``) so gains that are only memorisation show up. Never ranked."""
    seed_keys: list[str] = field(default_factory=lambda: list(DEFAULT_SEED_KEYS))
    """Config keys set to the run's seed; a ``data.mining.*`` key makes each seed mine its own set."""
    overrides: dict[str, Any] = field(default_factory=dict)
    histograms: list[str] = field(default_factory=list)
    """Variants whose mined negative-score distributions are compared (e.g. naive vs PercPos)."""
    fit_args: list[str] = field(default_factory=list)
    """Extra ``nvr fit`` arguments for every run (e.g. ``--trainer.max_steps 20`` for a smoke run)."""
    reference: str | None = None
    """The variant every other is compared with per seed (``nvr.ablation.paired``); None = the first variant."""
    fn_report: FnReportConfig | None = None
    """When set, the report step also writes ``fn_report/``: each mining variant's false-negative rate and hardness
    on held-back positives (``nvr.ablation.false_negatives``), from the cached candidate tables (no training)."""

    @property
    def reference_variant(self) -> str:
        return self.reference or self.all_variants()[0].name

    def all_variants(self) -> list[Variant]:
        """Listed variants first, then every sweep's expansion (in spec order)."""
        return [*self.variants, *[v for s in self.sweeps for v in expand_sweep(s)]]

    def variant(self, name: str) -> Variant:
        for v in self.all_variants():
            if v.name == name:
                return v
        raise ConfigError("variants", f"no variant named '{name}'")


def format_value(value: Any) -> str:
    """Stable text of a swept value for names and lookups (``0.95``, ``10``, ``true``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def expand_sweep(sweep: Sweep) -> list[Variant]:
    out = []
    for value in sweep.values:
        label = format_value(value)
        x = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        out.append(Variant(
            name=f"{sweep.name}={label}", overrides={**sweep.overrides, sweep.key: value},
            paper=sweep.paper.get(label), sweep=sweep.name, x=x,
        ))
    return out


# ------------------------------------------------------------------------------------------------- parsing
def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    return value


def _overrides(value: Any, key: str) -> dict[str, Any]:
    """Dotted ``nvr fit`` keys -> values; nested mappings are flattened (``{a: {b: 1}}`` -> ``a.b``)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: dict[str, Any]) -> None:
        for k, v in obj.items():
            dotted = f"{prefix}.{k}" if prefix else str(k)
            if not _KEY_RE.match(dotted):
                raise ConfigError(f"{key}.{dotted}", "override keys are dotted identifiers like data.mining.seed")
            if isinstance(v, dict) and v and "class_path" not in v:
                walk(dotted, v)
            else:
                flat[dotted] = v

    walk("", _mapping(value, key))
    return flat


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(key, f"must be a name of letters, digits and _.=+- (no spaces or '/'), got {value!r}")
    return value


def _paper_value(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"must be a number, got {value!r}")
    return float(value)


def _str_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"must be a list of strings, got {value!r}")
    return list(value)


def _parse_variant(raw: Any, i: int, paper: dict[str, Any]) -> Variant:
    key = f"variants[{i}]"
    raw = _mapping(raw, key)
    unknown = set(raw) - {"name", "overrides", "paper", "disabled", "from"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}",
                          "unknown key (expected name, overrides, paper, disabled, from)")
    name = _name(raw.get("name"), f"{key}.name")
    disabled = raw.get("disabled")
    if disabled is not None and (not isinstance(disabled, str) or not disabled.strip()):
        raise ConfigError(f"{key}.disabled", "must be a reason (text) or absent")
    value = raw["paper"] if "paper" in raw else paper.get(name)
    borrowed = _borrowed(raw, key)
    return Variant(name=name, overrides=_overrides(raw.get("overrides"), f"{key}.overrides"),
                   paper=_paper_value(value, f"{key}.paper"), disabled=disabled, borrowed=borrowed)


def _borrowed(raw: dict[str, Any], key: str) -> Borrowed | None:
    """``from: {spec: other.yaml, variant: name}``; its settings are the other spec's, so none may be given here."""
    if "from" not in raw:
        return None
    source = _mapping(raw["from"], f"{key}.from")
    unknown = sorted(set(source) - {"spec", "variant"})
    if unknown:
        raise ConfigError(f"{key}.from.{unknown[0]}", "unknown key (expected spec, variant)")
    for part in ("spec", "variant"):
        if not isinstance(source.get(part), str) or not source[part]:
            raise ConfigError(f"{key}.from.{part}", "required: the other ablation YAML and its variant's name")
    for own in ("overrides", "disabled"):
        if raw.get(own):
            raise ConfigError(f"{key}.{own}", "a borrowed row runs with the other spec's settings: give none here")
    return Borrowed(spec=source["spec"], variant=source["variant"])


def _parse_sweep(raw: Any, i: int) -> Sweep:
    key = f"sweeps[{i}]"
    raw = _mapping(raw, key)
    unknown = set(raw) - {"name", "key", "values", "overrides", "paper"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key (expected name, key, values, overrides, paper)")
    name = _name(raw.get("name"), f"{key}.name")
    dotted = raw.get("key")
    if not isinstance(dotted, str) or not _KEY_RE.match(dotted):
        raise ConfigError(f"{key}.key", f"must be a dotted config key, got {dotted!r}")
    values = raw.get("values")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{key}.values", "must be a non-empty list")
    labels = [format_value(v) for v in values]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{key}.values", f"values must be distinct, got {values}")
    paper = {format_value(k): _paper_value(v, f"{key}.paper.{k}")
             for k, v in _mapping(raw.get("paper"), f"{key}.paper").items()}
    stray = sorted(set(paper) - set(labels))
    if stray:
        raise ConfigError(f"{key}.paper", f"values {stray} are not in the sweep's values {labels}")
    return Sweep(name=name, key=dotted, values=list(values), overrides=_overrides(raw.get("overrides"),
                 f"{key}.overrides"), paper=paper)  # type: ignore[arg-type]


def _fn_report(value: Any) -> FnReportConfig | None:
    """``fn_report: true`` (defaults) or a mapping of ``FnReportConfig`` fields; absent / false = off."""
    if value is None or value is False:
        return None
    if value is True:
        return FnReportConfig()
    raw = _mapping(value, "fn_report")
    known = {f.name for f in fields(FnReportConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"fn_report.{unknown[0]}", f"unknown key; expected one of {sorted(known)}")
    try:
        with config_key_scope("fn", "fn_report"):
            return FnReportConfig(**raw)
    except TypeError as err:
        raise ConfigError("fn_report", str(err)) from err


def _report_metrics(value: Any, metric: str) -> list[str]:
    names = _str_list(value, "report_metrics")
    for name in names:
        if not name or name == metric:
            raise ConfigError("report_metrics", f"'{name}' must be a logged metric other than metric ({metric})")
    if len(set(names)) != len(names):
        raise ConfigError("report_metrics", f"must be distinct, got {names}")
    return names


def _seeds(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError("seeds", "must be a non-empty list of integers")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ConfigError("seeds", f"must be integers, got {value}")
    if len(set(value)) != len(value):
        raise ConfigError("seeds", f"must be distinct, got {value}")
    return list(value)


def parse_spec(raw: Any) -> AblationSpec:
    """Validate a loaded YAML mapping; every problem names its key."""
    raw = _mapping(raw, "<spec>")
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; expected one of {sorted(_SPEC_KEYS)}")
    base = _str_list(raw.get("base_config"), "base_config")
    if not base:
        raise ConfigError("base_config", "required: the nvr fit YAML every run starts from")
    output_dir = raw.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError("output_dir", "required: where runs, results and plots go")
    paper = _mapping(raw.get("paper"), "paper")
    variants = [_parse_variant(v, i, paper) for i, v in enumerate(raw.get("variants") or [])]
    sweeps = [_parse_sweep(s, i) for i, s in enumerate(raw.get("sweeps") or [])]
    select = raw.get("select", "final")
    if select not in ("final", "best"):
        raise ConfigError("select", f"must be final or best, got {select!r}")
    metric = raw.get("metric", "val/ndcg@10")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("metric", "must be a logged metric name such as val/ndcg@10")
    spec = AblationSpec(
        name=_name(raw.get("name"), "name"), base_config=base, output_dir=output_dir, seeds=_seeds(raw.get("seeds")),
        variants=variants, sweeps=sweeps, description=str(raw.get("description") or ""), metric=metric,
        select=select, report_metrics=_report_metrics(raw.get("report_metrics"), metric),
        seed_keys=_str_list(raw.get("seed_keys", list(DEFAULT_SEED_KEYS)), "seed_keys"),
        overrides=_overrides(raw.get("overrides"), "overrides"),
        histograms=_str_list(raw.get("histograms"), "histograms"), fit_args=_str_list(raw.get("fit_args"), "fit_args"),
        fn_report=_fn_report(raw.get("fn_report")),
        reference=None if raw.get("reference") is None else _name(raw.get("reference"), "reference"),
    )
    _attach_sweep_paper(spec, paper)
    _check_names(spec, paper)
    return spec


def _attach_sweep_paper(spec: AblationSpec, paper: dict[str, Any]) -> None:
    """Top-level ``paper`` entries named ``<sweep>=<value>`` belong to that sweep point."""
    sweeps = {s.name: s for s in spec.sweeps}
    for key, value in paper.items():
        name, sep, label = str(key).partition("=")
        if sep and name in sweeps and label in {format_value(v) for v in sweeps[name].values}:
            sweeps[name].paper.setdefault(label, _paper_value(value, f"paper.{key}"))  # type: ignore[arg-type]


def _check_names(spec: AblationSpec, paper: dict[str, Any]) -> None:
    names = [v.name for v in spec.all_variants()]
    if not names:
        raise ConfigError("variants", "the spec has no variants and no sweeps")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError("variants", f"duplicate variant name '{name}' (sweep values expand to <sweep>=<value>)")
        seen.add(name)
    for key in [*paper, *spec.histograms]:
        if key not in seen:
            raise ConfigError("paper" if key in paper else "histograms", f"'{key}' is not a variant; known: {names}")
    if spec.reference is not None and spec.reference not in seen:
        raise ConfigError("reference", f"'{spec.reference}' is not a variant; known: {names}")
    for key in spec.seed_keys:
        if not _KEY_RE.match(key):
            raise ConfigError("seed_keys", f"'{key}' is not a dotted config key")


def load_spec(path: str | Path) -> AblationSpec:
    """Read and validate an ablation YAML."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such ablation spec", path)
    check_yaml_file(path)  # syntax errors and duplicate keys, named by file:line
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise InputError(f"invalid YAML: {getattr(err, 'problem', err)}", path,
                         mark.line + 1 if mark is not None else None) from err
    try:
        return parse_spec(raw)
    except ConfigError as err:
        raise ConfigError(err.key, f"{err.args[0].split(': ', 1)[-1]} (in {path})") from err
