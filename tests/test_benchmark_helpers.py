"""The benchmark scripts' own logic (no timing): resolved-dtype detection, negative overlap, training examples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import mine_vs_st  # noqa: E402
import train_vs_st  # noqa: E402


@pytest.mark.parametrize(("teacher", "configured", "expected"), [
    ({"config": {"dtype": "auto"}, "dtype": "autocast-bfloat16"}, "auto", "bfloat16"),
    ({"settings": {"dtype": "float32"}}, "auto", "float32"),
    ({"dtype": "bfloat16"}, "bfloat16", "bfloat16"),
    ({"dtype": "float16"}, "float16", "float16"),
])
def test_manifest_dtype_reads_the_resolved_precision(tmp_path, teacher, configured, expected):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"teachers": [teacher]}))
    assert mine_vs_st.manifest_dtype(manifest, configured) == expected


def test_manifest_dtype_without_a_record_falls_back(tmp_path, monkeypatch):
    assert mine_vs_st.manifest_dtype(tmp_path / "missing.json", "float32") == "float32"
    monkeypatch.setattr(mine_vs_st, "resolve_auto_precision", lambda: "bfloat16")
    (tmp_path / "m.json").write_text(json.dumps({"teachers": [{"dtype": "auto"}]}))
    assert mine_vs_st.manifest_dtype(tmp_path / "m.json", "auto") == "bfloat16"


def test_overlap_counts_common_queries_only():
    a = {"q1": ["d1", "d2"], "q2": ["d3", "d4"], "q3": ["d5", "d6"]}
    b = {"q1": ["d1", "d2"], "q2": ["d3", "d9"]}
    ov = mine_vs_st.overlap(a, b)
    assert (ov["a_queries"], ov["b_queries"], ov["common_queries"]) == (3, 2, 2)
    assert ov["identical"] == pytest.approx(0.5)
    assert ov["jaccard"] == pytest.approx((1.0 + 1 / 3) / 2)


def test_training_examples_use_every_text_once(tiny_beir_dir, tmp_path):
    from nvr.data.text import text_key
    from nvr.mining.mined_set import load_mined

    out = train_vs_st.write_examples(tiny_beir_dir, tmp_path / "mined", n=3, negatives=2)
    examples = load_mined(out)
    assert len(examples) == 3
    texts = [t for e in examples for t in (e.query, *e.positive_texts, *e.negative_texts)]
    assert len({text_key(t) for t in texts}) == len(texts) == 3 * 4


def test_training_examples_refuse_too_few_queries(tiny_beir_dir, tmp_path):
    with pytest.raises(SystemExit, match="distinct texts, need 1000"):
        train_vs_st.write_examples(tiny_beir_dir, tmp_path / "mined", n=1000, negatives=1)
