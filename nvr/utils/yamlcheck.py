"""YAML config checks done before a parser sees the file: syntax errors and duplicate keys, named by file:line.

PyYAML (and so jsonargparse and LightningCLI) silently keeps the *last* of two equal keys in a mapping, so a
config with ``num_negatives`` twice runs with a value the user may not have meant. ``check_yaml_file`` composes
the node tree (no values are built, no tags run) and rejects any mapping that repeats a key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from nvr.utils.errors import InputError


def _key_text(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _walk(node: yaml.Node | None, path: Path, trail: str) -> None:
    """Depth-first over the node tree; ``trail`` is the dotted key of ``node`` (for the message)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = _key_text(key_node)
            if key is None or key == "<<":  # complex keys / merge keys are left to the parser
                _walk(value_node, path, trail)
                continue
            line = key_node.start_mark.line + 1
            dotted = f"{trail}.{key}" if trail else key
            if key in seen:
                raise InputError(f"duplicate key '{dotted}' (first on line {seen[key]}); YAML would silently keep "
                                 "the last one: delete one of them", path, line)
            seen[key] = line
            _walk(value_node, path, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path, f"{trail}[{i}]")


def check_yaml_text(text: str, path: str | Path) -> None:
    """Syntax and duplicate-key check of YAML ``text`` read from ``path`` (named in errors)."""
    path = Path(path)
    try:
        for document in yaml.compose_all(text, Loader=yaml.SafeLoader):
            _walk(document, path, "")
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = "; ".join(part for part in (err.context, err.problem) if part) or "syntax error"
        raise InputError(f"invalid YAML: {problem}{where}", path, mark.line + 1 if mark else None) from err
    except yaml.YAMLError as err:
        raise InputError(f"invalid YAML: {err}", path) from err


def check_yaml_file(path: str | Path) -> None:
    """Raise ``InputError(file, line)`` for a YAML syntax error or a duplicate key; a missing file is left to the
    caller's parser (which reports it in its own words)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"config is not valid UTF-8 ({err.reason} at byte {err.start})", path) from err
    check_yaml_text(text, path)


def config_paths(argv: list[str]) -> list[str]:
    """The files given with ``--config FILE`` / ``--config=FILE`` (repeatable), in command-line order."""
    paths: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_args(argv: list[str]) -> None:
    """Check every ``--config`` file of a command line (the one-line call for LightningCLI-based commands)."""
    for path in config_paths(argv):
        check_yaml_file(path)
