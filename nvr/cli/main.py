"""``nvr`` entry point: dispatches sub-commands; user errors print one line and exit 2.

``NvrError`` (bad input, config, locked or full outputs) and, as a last resort, any ``OSError`` (a path that is a
folder / a file / read-only / full) end the command with ``nvr <cmd>: error: <path>: <what>`` and exit 2. An
unknown sub-command or option is one line with the nearest accepted name. Known third-party notices are silenced
(:mod:`nvr.utils.quiet`) before any sub-command is imported, unless ``--verbose`` (accepted anywhere before a lone
``--``) or ``NVR_VERBOSE=1``. ``nvr --version`` prints nvr's and its main dependencies' versions.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

from nvr.utils import quiet
from nvr.utils.errors import USER_ERRNOS, NvrError, os_error_message

# sub-command -> (module, one-line help); each module exposes ``main(argv: list[str]) -> int | None``.
COMMANDS: dict[str, tuple[str, str]] = {
    "mine": ("nvr.cli.mine", "offline hard-negative mining (positive-aware filters, samplers, ensembles)"),
    "fit": ("nvr.cli.lightning_cli", "train a bi-encoder (LightningCLI)"),
    "validate": ("nvr.cli.lightning_cli", "evaluate a checkpoint on the configured BEIR sets (LightningCLI)"),
    "test": ("nvr.cli.lightning_cli", "evaluate a checkpoint on the eval sets, metrics under test/ (LightningCLI)"),
    "eval": ("nvr.cli.eval", "evaluate any HF model / exported folder on BEIR folders -> JSON"),
    "export": ("nvr.cli.export", "export a checkpoint to a SentenceTransformer / HF folder"),
    "ablate": ("nvr.cli.ablate", "run a paper-ablation grid (variants x seeds) -> results table + plots"),
    "quickstart": ("nvr.cli.quickstart", "base eval, nvr fit on the quick-start recipe, ST export + eval"),
}


VERSION_PACKAGES = ("torch", "transformers", "lightning", "peft", "sentence-transformers")
"""Printed by ``nvr --version`` (``-`` when a package is not installed)."""
ARGPARSE_COMMANDS = ("eval", "export", "ablate")
"""Sub-commands with a plain argparse ``build_parser()``: unknown options are checked here, before parsing."""


def _usage() -> str:
    lines = ["usage: nvr [--verbose] [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "  --verbose   keep third-party notices (also: NVR_VERBOSE=1); accepted after the command too",
              "  --version   print nvr's and its main dependencies' versions"]
    return "\n".join(lines)


def version_line() -> str:
    """``nvr 0.1.0 (python 3.11.9, torch 2.13.0, ...)`` from package metadata (imports nothing heavy)."""
    parts = [f"python {sys.version.split()[0]}"]
    for package in VERSION_PACKAGES:
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} -")
    try:
        own = metadata.version("nvr")
    except metadata.PackageNotFoundError:
        from nvr import __version__ as own
    return f"nvr {own} ({', '.join(parts)})"


def unknown_command(name: str) -> str:
    """One line: the unknown name, the nearest command, and the list of commands."""
    from nvr.cli.suggest import closest

    match = closest(name, list(COMMANDS))
    hint = f" (did you mean '{match}'?)" if match else ""
    return f"nvr: error: unknown command '{name}'{hint}; commands: {', '.join(COMMANDS)} (nvr --help)"


def precheck(name: str, rest: list[str]) -> None:
    """Unknown options of the argparse sub-commands and of ``nvr mine`` end here as one line with a suggestion
    (argparse would print the whole usage; LightningCLI commands do this in ``NvrCLI.parse_arguments``)."""
    from nvr.cli import suggest

    if name in ARGPARSE_COMMANDS:
        parser = importlib.import_module(COMMANDS[name][0]).build_parser()
        suggest.check_argparse_options(parser, rest, name)
    elif name == "mine":
        from argparse import ArgumentError

        from nvr.cli.mine import build_parser, parse_config

        try:
            parse_config(list(rest))
        except ArgumentError as err:
            raise suggest.parse_error(str(err), suggest.option_keys(build_parser()), rest, name) from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose, argv = quiet.split_verbose(argv)
    quiet.install(verbose)  # before any sub-command (and so Lightning, peft, faiss) is imported
    if argv and argv[0] == "--version":
        print(version_line())
        sys.exit(0)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(unknown_command(name), file=sys.stderr)
        sys.exit(2)
    if "--version" in rest[: rest.index("--") if "--" in rest else len(rest)]:
        print(version_line())
        sys.exit(0)
    try:
        precheck(name, rest)
        module = importlib.import_module(COMMANDS[name][0])
        code = module.main([name, *rest] if COMMANDS[name][0].endswith("lightning_cli") else rest)
    except NvrError as err:
        print(f"nvr {name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.filename is None and err.errno not in USER_ERRNOS:
            raise  # a socket / pipe problem, not about a path the user gave
        # last resort: a file-system error nvr did not anticipate still names the path in one line
        print(f"nvr {name}: error: {os_error_message(err)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
