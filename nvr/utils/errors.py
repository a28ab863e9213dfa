"""Errors that tell the user what to fix: every input error names its file and line, or its config key."""

from __future__ import annotations

from pathlib import Path


class NvrError(Exception):
    """Base class for errors caused by user input or configuration (not by bugs)."""


class InputError(NvrError, ValueError):
    """A bad input file: carries the file and 1-based line number so the message points at the row."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class ConfigError(NvrError, ValueError):
    """A bad configuration value: carries the dotted key (e.g. ``filter.perc``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class OutputExistsError(NvrError, FileExistsError):
    """Refuse to clobber a previous result unless the user asked for ``overwrite``."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"{path}: output already exists; pass --overwrite true (or choose another path)")
