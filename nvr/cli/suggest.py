"""One-line parse errors with a "did you mean" suggestion, for jsonargparse (``nvr fit``/``mine``) and argparse
(``nvr eval``/``export``/``ablate``) parsers.

A parser normally answers a typo with its whole usage (90 lines for ``nvr fit``); here an unknown key becomes
``<file>:<line>: unknown key 'model.lrr' (did you mean 'model.lr'?)`` when it was written in a ``--config`` file,
else ``config key 'model.lrr': unknown option --model.lrr (did you mean --model.lr?)``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from nvr.utils.errors import ConfigError, InputError, NvrError
from nvr.utils.yamlcheck import config_paths

OPTIMIZER_KEYS = ("optimizer", "lr_scheduler")
OPTIMIZER_MESSAGE = (
    "not supported: nvr builds AdamW from model.lr and model.weight_decay (no decay on biases and norms) with "
    "model.warmup_steps and model.scheduler; a LightningCLI optimizer would silently replace all of them, so set "
    "those model keys instead"
)


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to ``word``: first among keys with the same dotted parent (``model.lrr`` ->
    ``model.lr``), then among all of them, then by the last dotted part alone (``trainer.max_step`` ->
    ``trainer.max_steps``)."""
    pool = list(dict.fromkeys(c for c in candidates if c))
    if not pool or not word:
        return None
    parent = word.rpartition(".")[0]
    siblings = [c for c in pool if c.rpartition(".")[0] == parent]
    for group in (siblings, pool):
        match = difflib.get_close_matches(word, group, n=1, cutoff=0.6)
        if match:
            return match[0]
    leaf = word.rpartition(".")[2]
    by_leaf: dict[str, str] = {}
    for c in pool:
        by_leaf.setdefault(c.rpartition(".")[2], c)
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[match[0]] if match else None


def option_keys(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--key`` the parser accepts, without the dashes (jsonargparse nests them as ``group.key``)."""
    return [o[2:] for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]


def _hint(key: str, candidates: Sequence[str], dashes: bool) -> str:
    match = closest(key, candidates)
    if match is None:
        return ""
    return f" (did you mean --{match}?)" if dashes else f" (did you mean '{match}'?)"


def unknown_key_error(key: str, candidates: Sequence[str], argv: Sequence[str], command: str) -> NvrError:
    """The one-line error for an unknown ``key``: where it was written (config file line or flag) plus the
    nearest accepted key."""
    if key.split(".")[0] in OPTIMIZER_KEYS and command in ("fit", "validate", "test"):
        return ConfigError(key.split(".")[0], OPTIMIZER_MESSAGE)
    flag = f"--{key}"
    on_command_line = any(a == flag or a.startswith(f"{flag}=") for a in argv)
    if not on_command_line:
        for path in config_paths(list(argv)):
            line = yaml_key_line(path, key)
            if line is not None:
                return InputError(f"unknown key '{key}'{_hint(key, candidates, dashes=False)}", path, line)
    help_hint = _hint(key, candidates, dashes=True) or f" (see nvr {command} --help)"
    return ConfigError(key, f"unknown option {flag}{help_hint}")


_PATTERNS = (
    re.compile(r"Subcommand '[^']+' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Option '(?P<key>[^']+)' is not accepted"),
)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<rest>.*)", re.S)
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')
_CLASS_PATH = re.compile(r"class_path '(?P<path>[\w.]+)'")


def parse_error(message: str, candidates: Sequence[str], argv: Sequence[str], command: str) -> NvrError:
    """Turn a jsonargparse error message into one line; unknown keys get :func:`unknown_key_error`."""
    text = str(message)
    found = _UNRECOGNIZED.search(text)
    if found:
        tokens = [t for t in found.group("rest").split() if t.startswith("-")]
        if tokens:
            return unknown_key_error(tokens[0].lstrip("-").split("=")[0], candidates, argv, command)
    for pattern in _PATTERNS:
        found = pattern.search(text)
        if not found:
            continue
        key = found.group("key")
        groups = found.groupdict()
        if groups.get("group"):
            key = f"{groups['group']}.{key}"
        parent = _PARSER_KEY.search(text)
        if parent and not groups.get("group"):  # an option of a nested class (e.g. a teachers item)
            key = f"{parent.group('key')}.{key}"
            fields = _class_fields(text)
            candidates = [*candidates, *(f"{parent.group('key')}.{f}" for f in fields)]
        return unknown_key_error(key, candidates, argv, command)
    parent = _PARSER_KEY.search(text)
    if parent:
        return value_error(text, parent.group("key"))
    return NvrError(" ".join(text.split()))


_REQUIRED = re.compile(r"the following arguments are required: (?P<names>[\w, ]+)")


def value_error(message: str, key: str) -> ConfigError:
    """The informative part of a jsonargparse value error (a Union error lists every subtype it tried; a nested
    class's own ``Parser key`` header extends the key: ``data.mining`` + ``filter.margin``)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        found = _CLASS_PATH.search(line)
        if not (found and line.lstrip("- ").startswith("Problem with given class_path")):
            continue
        cls = found.group("path").rpartition(".")[2]
        for detail in lines[i + 1:]:
            nested = _PARSER_KEY.match(detail)
            if nested:
                key = f"{key}.{nested.group('key')}"
                detail = _PARSER_KEY.sub("", detail).strip(" :")
                if not detail:
                    continue
            required = _REQUIRED.search(detail)
            if required:
                first = required.group("names").split(",")[0].strip()
                detail += f" (add --{key}.{first} VALUE)"
            return ConfigError(key, f"{cls}: {detail}")
    head = _PARSER_KEY.sub("", lines[0]).strip(" :") if lines else ""
    rest = [ln for ln in lines[1:] if "Union subtypes" not in ln and not ln.startswith(("Subtypes:", "Errors:"))]
    return ConfigError(key, " ".join(part for part in [head, *rest[:2]] if part)[:400] or "invalid value")


def _class_fields(message: str) -> list[str]:
    """Init parameters of the ``class_path`` a jsonargparse message names (suggestions for nested keys)."""
    found = _CLASS_PATH.search(message)
    if not found:
        return []
    module_name, _, name = found.group("path").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def yaml_key_line(path: str | Path, dotted: str) -> int | None:
    """1-based line of ``dotted`` (list items matched at any index) in a YAML file, None when absent/unreadable."""
    try:
        documents = list(yaml.compose_all(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    parts = dotted.split(".")
    for document in documents:
        line = _find(document, parts)
        if line is not None:
            return line
    return None


def _find(node: yaml.Node | None, parts: list[str]) -> int | None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            line = _find(item, parts)
            if line is not None:
                return line
        return None
    if not isinstance(node, yaml.MappingNode) or not parts:
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == parts[0]:
            if len(parts) == 1:
                return key_node.start_mark.line + 1
            line = _find(value_node, parts[1:])
            if line is not None:
                return line
    return None


def check_argparse_options(parser: argparse.ArgumentParser, argv: Sequence[str], command: str) -> None:
    """Raise the one-line unknown-key error for the first ``--option`` an argparse parser would not accept
    (before ``--``; unique prefixes count as known, as argparse accepts them)."""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    for arg in argv:
        if arg == "--":
            return
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if name in known or (parser.allow_abbrev and any(o.startswith(name) for o in known)):
            continue
        raise unknown_key_error(name[2:], [k[2:] for k in known], argv, command)
