"""Streaming JSONL reader whose errors point at the offending file and line."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from nvr.utils.errors import InputError


def _open_binary(path: Path) -> IO[bytes]:
    """Open ``.jsonl`` or ``.jsonl.gz`` as bytes; decoding per line lets a bad byte be reported with its line."""
    if not path.is_file():
        raise InputError("file not found", path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_no, object)`` for each non-blank line (1-based line numbers), streaming.

    Raises InputError naming the path and line for non-UTF-8 bytes, malformed JSON or a value that is not an object.
    """
    path = Path(path)
    line_no = 0
    with _open_binary(path) as fh:
        try:
            for line_no, raw in enumerate(fh, start=1):
                line = _decode(raw, path, line_no)
                if line.strip():
                    yield line_no, _parse(line, path, line_no)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(f"corrupt gzip data ({exc})", path, line_no + 1) from exc


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", path, line_no) from exc
    return line.removeprefix("\ufeff") if line_no == 1 else line


def _parse(line: str, path: Path, line_no: int) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg} at column {exc.colno})", path, line_no) from exc
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", path, line_no)
    return obj
