"""The quick start's pipeline (before -> mine -> fit -> after) on tiny data, and on the real model when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvr.cli.quickstart import main


def test_quickstart_tiny_writes_before_after(tmp_path, tiny_beir_dir, tiny_bert_dir, capsys):
    out = tmp_path / "qs"
    args = ["--data", str(tiny_beir_dir), "--model", str(tiny_bert_dir), "--output", str(out), "--max_steps", "3",
            "--batch_size", "4", "--num_negatives", "2"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    name = tiny_beir_dir.name
    for phase in ("before", "after"):
        assert 0.0 <= results[phase][f"val/{name}/ndcg@10"] <= 1.0
    assert results["before"] != results["after"], "fine-tuning should change the metrics"
    assert (Path(results["mined_dir"]) / "mined.jsonl").exists()
    printed = capsys.readouterr().out
    assert "before" in printed and f"val/{name}/ndcg@10" in printed
    # a second run reuses the caches and overwrites the previous results cleanly
    assert main(args) == 0


def test_quickstart_cli_help_runs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--max_steps" in capsys.readouterr().out
