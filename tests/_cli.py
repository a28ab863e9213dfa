"""Helpers shared by the CLI tests: run ``nvr`` in-process and check its one-line errors; read a checkpoint's step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvr.cli.main import main as nvr_main


def run_cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit code and stderr of ``nvr <args>``."""
    with pytest.raises(SystemExit) as exc:
        nvr_main(list(args))
    return int(exc.value.code or 0), capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str, command: str = "mine") -> str:
    """Exit 2, no traceback, the last line is ``nvr <command>: error: ...`` holding every fragment; returns it."""
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"nvr {command}: error:"), err
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The single ``nvr <argv[0]>: error:`` line of a run that must exit 2 without a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        nvr_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"nvr {argv[0]}: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
