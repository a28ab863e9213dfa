"""Paired-by-seed comparisons of ablation variants: Student's t against closed forms, pairing by seed (not by
position), the markdown / CSV report and the spec's ``reference``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from test_ablation import _spec

from nvr.ablation.paired import PairedComparison, paired, paired_csv_rows, paired_markdown, t_critical, t_two_sided_p
from nvr.ablation.results import summarize
from nvr.ablation.spec import parse_spec
from nvr.utils.errors import ConfigError


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.0, 4.5, 12.0, -2.0])
def test_t_p_values_match_the_closed_forms(t: float) -> None:
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-12)  # Cauchy
    assert t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), abs=1e-12)
    assert t_two_sided_p(t, 400) == pytest.approx(math.erfc(abs(t) / math.sqrt(2)), abs=2e-3)  # ~ normal


def test_t_critical_values_and_scipy_agreement() -> None:
    assert t_critical(0.95, 2) == pytest.approx(4.302653, abs=1e-5)  # the textbook table
    assert t_critical(0.95, 1) == pytest.approx(12.706205, abs=1e-5)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 9, 30):
        assert t_critical(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-7)
        for t in (0.5, 1.7, 3.2, 8.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-14)


def _results(tmp_path: Path, records: list[dict], **extra):
    spec = parse_spec(_spec(tmp_path / "b.yaml", tmp_path / "o", seeds=[0, 1, 2], **extra))
    return summarize(spec, records)


def _records(values: dict[str, dict[int, float]]) -> list[dict]:
    return [{"variant": v, "seed": s, "value": x} for v, by_seed in values.items() for s, x in by_seed.items()]


def test_pairs_are_matched_by_seed_not_by_position(tmp_path) -> None:
    res = _results(tmp_path, _records({"naive": {0: 0.50, 1: 0.60, 2: 0.40},
                                       "percpos=0.95": {2: 0.43, 0: 0.52}}))  # seed 1 not finished
    rows = {r.name: r for r in res.rows}
    found = paired(rows["percpos=0.95"], rows["naive"])
    assert found is not None and found.seeds == (0, 2)
    assert found.deltas == pytest.approx((0.02, 0.03)) and (found.wins, found.losses) == (2, 0)
    assert found.mean == pytest.approx(0.025) and found.std == pytest.approx(math.sqrt(0.00005))
    t = 0.025 / (math.sqrt(0.00005) / math.sqrt(2))
    assert found.t == pytest.approx(t) and found.p == pytest.approx(1 - 2 / math.pi * math.atan(t))
    low, high = found.ci
    assert (low + high) / 2 == pytest.approx(0.025) and high - low == pytest.approx(
        2 * 12.706205 * math.sqrt(0.00005) / math.sqrt(2), rel=1e-6)
    assert paired(rows["naive-lr"], rows["naive"]) is None  # no finished seed in common


def test_edge_cases_one_seed_and_identical_deltas() -> None:
    one = PairedComparison("a", "b", (0,), (0.01,))
    assert (one.std, one.t, one.p, one.ci) == (None, None, None, None)
    same = PairedComparison("a", "b", (0, 1, 2), (0.01, 0.01, 0.01))
    assert same.t == math.inf and same.p == 0.0
    tie = PairedComparison("a", "b", (0, 1), (0.0, 0.0))
    assert tie.t == 0.0 and tie.p == pytest.approx(1.0) and (tie.wins, tie.losses) == (0, 0)


def test_markdown_and_csv_report_every_variant_against_the_reference(tmp_path) -> None:
    values = {"naive": {0: 0.50, 1: 0.60, 2: 0.40}, "percpos=0.95": {0: 0.52, 1: 0.63, 2: 0.41},
              "percpos=0.9": {0: 0.49, 1: 0.61, 2: 0.38}}
    res = _results(tmp_path, _records(values))
    text = paired_markdown(res, "naive")
    row = next(line for line in text.splitlines() if line.startswith("| percpos=0.95 |")).split(" | ")
    assert row[2] == "0: +0.0200, 1: +0.0300, 2: +0.0100" and row[3] == "+0.0200 ± 0.0100" and row[4] == "3 / 0"
    assert not any(line.startswith("| naive |") for line in text.split("## All pairs")[0].splitlines())
    matrix = [line for line in text.split("## All pairs")[1].splitlines() if line.startswith("| percpos=0.9 |")]
    cells = matrix[0].split(" | ")
    assert cells[1] == "-0.0067 (1/3)" and cells[2] == "" and cells[3].strip(" |") == "-0.0267 (0/3)"  # spec order
    header, rows = paired_csv_rows(res, "naive")
    table = list(csv.DictReader([",".join(header), *(",".join(map(str, r)) for r in rows)]))
    assert [r["variant"] for r in table] == ["percpos=0.9", "percpos=0.95"]
    assert table[1]["deltas"] == "0.020000 0.030000 0.010000" and table[1]["wins"] == "3"


def test_an_empty_grid_says_so(tmp_path) -> None:
    text = paired_markdown(_results(tmp_path, []), "naive")
    assert "no variant shares a finished seed with `naive` yet" in text and "## All pairs" not in text


def test_spec_reference_defaults_to_the_first_variant_and_is_checked(tmp_path) -> None:
    assert parse_spec(_spec(tmp_path / "b.yaml", tmp_path / "o")).reference_variant == "naive"
    spec = parse_spec(_spec(tmp_path / "b.yaml", tmp_path / "o", reference="percpos=0.95"))
    assert spec.reference_variant == "percpos=0.95"
    with pytest.raises(ConfigError, match="reference.*'nope' is not a variant"):
        parse_spec(_spec(tmp_path / "b.yaml", tmp_path / "o", reference="nope"))


def test_ranks_of_a_partial_grid_use_the_seeds_every_variant_finished(tmp_path) -> None:
    """naive's seed 2 is a bad draw for every method; percpos has not run it yet. Over all of each row's own seeds
    naive would look better than it is relative to percpos; over the common seeds 0-1 the order is the paired one."""
    from nvr.ablation.results import markdown_table

    res = _results(tmp_path, _records({"naive": {0: 0.50, 1: 0.52, 2: 0.30}, "percpos=0.95": {0: 0.49, 1: 0.51}}))
    rows = {r.name: r for r in res.rows}
    assert res.rank_seeds == [0, 1] and rows["naive"].rank == 1 and rows["percpos=0.95"].rank == 2
    assert rows["naive"].mean == pytest.approx(0.44)  # the table still shows every finished seed
    assert "seeds every variant has finished: [0, 1]" in markdown_table(res)
    full = _results(tmp_path, _records({"naive": {0: 0.5, 1: 0.6}, "percpos=0.95": {0: 0.6, 1: 0.7}}))
    assert full.rank_seeds == [0, 1] and "seeds every variant" not in markdown_table(full)
