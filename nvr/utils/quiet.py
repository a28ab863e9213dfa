"""A quiet CLI: drop third-party notices that say nothing about the user's run, unless ``--verbose``.

Each entry below names one known message and where it comes from; everything else (including every other
warning of the same libraries) still shows. ``--verbose`` (any position before a lone ``--``) or
``NVR_VERBOSE=1`` keeps them all; the flag is exported as ``NVR_VERBOSE=1`` so child processes (``nvr ablate``
runs) inherit the choice.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "NVR_VERBOSE"

QUIET_WARNINGS: tuple[str, ...] = (
    # Lightning: logger=True without tensorboard (nvr passes its own CSVLogger, this is only a fallback)
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
    # torch 2.13 deprecates LeafSpec, which Lightning 2.6's _pytree still instantiates
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Lightning's model summary cannot size bf16-mixed parameters (nvr's default precision on bf16 CPUs)
    r"Precision bf16-mixed is not supported by the model summary",
    # Lightning on runs shorter than log_every_n_steps: nvr's FinalStepLogger still logs the last step
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # Lightning on every fit into a used checkpoint folder, resumes included; nvr's LastCheckpoint warns instead,
    # and only for a fresh run, naming the earlier run's files
    r"Checkpoint directory .* exists and is not empty",
)
"""``warnings`` messages (regex, matched at the start of the message) silenced by default."""

QUIET_RECORDS: dict[str, tuple[str, ...]] = {
    # Lightning's "💡 Tip: ... litlogger / litmodels" advertisements (rank_zero_info)
    "lightning.pytorch.utilities.rank_zero": (r"💡 Tip:",),
    "lightning.fabric.utilities.rank_zero": (r"💡 Tip:",),
    "lightning_utilities.core.rank_zero": (r"💡 Tip:",),
    # bitsandbytes on an avx512_bf16 CPU without the optional `kernels` package (imported by peft)
    "bitsandbytes.backends.cpu.ops": (r"Failed to load CPU gemm_4bit_forward",),
}
"""Logger name -> message patterns dropped from that logger by default."""

QUIET_INFO_LOGGERS: tuple[str, ...] = ("faiss.loader",)
"""Loggers whose INFO/DEBUG records are dropped by default (faiss: "Loading faiss with AVX512 support." ...)."""


class _DropMatching(logging.Filter):
    """Drops records whose message matches one of ``patterns`` (and, with ``below``, every record under it)."""

    def __init__(self, patterns: tuple[str, ...] = (), below: int | None = None) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]
        self.below = below

    def filter(self, record: logging.LogRecord) -> bool:
        if self.below is not None and record.levelno < self.below:
            return False
        if not self.patterns:
            return True
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_installed: list[tuple[logging.Logger, logging.Filter]] = []
_warning_entries: list[tuple] = []


def split_verbose(argv: list[str]) -> tuple[bool, list[str]]:
    """``(verbose, argv without --verbose)``; arguments after a lone ``--`` (passed on to another command) are left
    alone. ``NVR_VERBOSE`` set to 1/true/yes also means verbose."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    flagged = VERBOSE_FLAG in head
    head = [a for a in head if a != VERBOSE_FLAG]
    env = os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return flagged or env, head + tail


def install(verbose: bool) -> None:
    """Silence the known notices (idempotent), or, when ``verbose``, remove nvr's filters and export
    ``NVR_VERBOSE=1`` for child processes."""
    uninstall()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
        _warning_entries.append(warnings.filters[0])
    for name, patterns in QUIET_RECORDS.items():
        _add(logging.getLogger(name), _DropMatching(patterns))
    for name in QUIET_INFO_LOGGERS:
        _add(logging.getLogger(name), _DropMatching(below=logging.WARNING))


def uninstall() -> None:
    """Remove the warning and logging filters ``install`` added."""
    while _installed:
        logger, flt = _installed.pop()
        logger.removeFilter(flt)
    while _warning_entries:
        entry = _warning_entries.pop()
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    mutated = getattr(warnings, "_filters_mutated", None)  # resets the "already warned" caches (CPython)
    if callable(mutated):
        mutated()


def _add(logger: logging.Logger, flt: logging.Filter) -> None:
    logger.addFilter(flt)
    _installed.append((logger, flt))
