"""``nvr`` entry point: dispatches sub-commands; user errors print one line and exit 2.

``NvrError`` (bad input, config, locked or full outputs) and, as a last resort, any ``OSError`` (a path that is a
folder / a file / read-only / full) end the command with ``nvr <cmd>: error: <path>: <what>`` and exit 2.
"""

from __future__ import annotations

import importlib
import sys

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
    "quickstart": ("nvr.cli.quickstart", "mine, fine-tune and validate a real small model on the embedded data"),
}


def _usage() -> str:
    lines = ["usage: nvr <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nvr: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    try:
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
