"""Paired comparisons of ablation variants: differences per seed, not only means ± std.

A seed fixes the data order (``seed_keys``), the initialisation of any new head and the dropout draws, so two
variants run with the same seed differ only in the method. Their per-seed difference removes the share of the
spread that all variants have in common (the claim order of a one-epoch run), which the unpaired mean ± std of each
row cannot. For each pair: the per-seed deltas, their mean ± std, wins / losses, a paired t statistic with its
two-sided p-value and a 95% confidence interval (Student's t with n - 1 degrees of freedom, computed here so the
report needs no SciPy). With three seeds the test is weak (a 95% CI needs t > 4.30): read p as a guide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from nvr.ablation.results import AblationResults, VariantSummary

CI_LEVEL = 0.95


@dataclass(frozen=True)
class PairedComparison:
    """``variant`` minus ``reference`` over the seeds both finished."""

    variant: str
    reference: str
    seeds: tuple[int, ...]
    deltas: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.deltas)

    @property
    def mean(self) -> float:
        return sum(self.deltas) / self.n

    @property
    def std(self) -> float | None:
        if self.n < 2:
            return None
        return math.sqrt(sum((d - self.mean) ** 2 for d in self.deltas) / (self.n - 1))

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.deltas)

    @property
    def losses(self) -> int:
        return sum(d < 0 for d in self.deltas)

    @property
    def t(self) -> float | None:
        """Paired t statistic (None below two seeds; +-inf when every delta is the same non-zero value)."""
        std = self.std
        if std is None:
            return None
        if std == 0:
            return 0.0 if self.mean == 0 else math.copysign(math.inf, self.mean)
        return self.mean / (std / math.sqrt(self.n))

    @property
    def p(self) -> float | None:
        return None if self.t is None else t_two_sided_p(self.t, self.n - 1)

    @property
    def ci(self) -> tuple[float, float] | None:
        std = self.std
        if std is None:
            return None
        half = t_critical(CI_LEVEL, self.n - 1) * std / math.sqrt(self.n)
        return self.mean - half, self.mean + half


def paired(variant: VariantSummary, reference: VariantSummary) -> PairedComparison | None:
    """The per-seed comparison of two rows; None when they share no finished seed."""
    ref = dict(zip(reference.seeds, reference.values, strict=True))
    common = [(s, v - ref[s]) for s, v in zip(variant.seeds, variant.values, strict=True) if s in ref]
    if not common:
        return None
    return PairedComparison(variant.name, reference.name, tuple(s for s, _ in common), tuple(d for _, d in common))


# ----------------------------------------------------------------------------------------- Student's t
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction of the incomplete beta function (Numerical Recipes ``betacf``)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_critical(level: float, df: int) -> float:
    """The t with two-sided tail mass ``1 - level`` (bisection on :func:`t_two_sided_p`)."""
    low, high = 0.0, 1e7
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_two_sided_p(mid, df) > 1.0 - level:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


# ------------------------------------------------------------------------------------------------ report
def _signed(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:+.{digits}f}"


def comparisons(res: AblationResults, reference: str) -> list[PairedComparison]:
    """Every finished variant against ``reference`` (spec order)."""
    rows = {r.name: r for r in res.rows}
    out = []
    for row in res.rows:
        if row.name != reference and row.values and rows[reference].values:
            found = paired(row, rows[reference])
            if found is not None:
                out.append(found)
    return out


def paired_markdown(res: AblationResults, reference: str) -> str:
    """The per-seed comparison against ``reference`` and the matrix of all pairs (markdown)."""
    rows = [r for r in res.rows if r.values]
    lines = [f"## Paired by seed: each variant minus `{reference}`", "",
             "Same seed = same data order, so the per-seed difference removes the spread the variants share. "
             f"t: paired t statistic; p: two-sided; CI: {CI_LEVEL:.0%} (Student's t, n - 1 degrees of freedom).", "",
             "| variant | seeds | delta per seed | mean delta ± std | wins / losses | t | p | 95% CI |",
             "|---|---|---|---|---|---:|---:|---|"]
    found_any = comparisons(res, reference)
    if not found_any:
        lines.append(f"| (no variant shares a finished seed with `{reference}` yet) | | | | | | | |")
    for c in found_any:
        per_seed = ", ".join(f"{s}: {_signed(d)}" for s, d in zip(c.seeds, c.deltas, strict=True))
        spread = _signed(c.mean) + (f" ± {c.std:.4f}" if c.std is not None else "")
        ci = "" if c.ci is None else f"[{_signed(c.ci[0])}, {_signed(c.ci[1])}]"
        t = "" if c.t is None else f"{c.t:.2f}"
        p = "" if c.p is None else f"{c.p:.3f}"
        lines.append(f"| {c.variant} | {len(c.seeds)} | {per_seed} | {spread} | {c.wins} / {c.losses} | {t} | {p} "
                     f"| {ci} |")
    if len(rows) > 2:
        lines += ["", "## All pairs: mean per-seed delta of the row minus the column (row wins / seeds paired)", "",
                  "| | " + " | ".join(r.name for r in rows) + " |", "|---|" + "---|" * len(rows)]
        for a in rows:
            cells = []
            for b in rows:
                found = None if a is b else paired(a, b)
                cells.append("" if found is None else f"{_signed(found.mean)} ({found.wins}/{found.n})")
            lines.append(f"| {a.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_csv_rows(res: AblationResults, reference: str) -> tuple[list[str], list[list[object]]]:
    header = ["variant", "reference", "seeds", "deltas", "mean_delta", "std_delta", "wins", "losses", "t", "p",
              "ci_low", "ci_high"]
    rows: list[list[object]] = []
    for c in comparisons(res, reference):
        ci: Sequence[float | None] = c.ci or (None, None)
        rows.append([c.variant, c.reference, " ".join(map(str, c.seeds)), " ".join(f"{d:.6f}" for d in c.deltas),
                     f"{c.mean:.6f}", "" if c.std is None else f"{c.std:.6f}", c.wins, c.losses,
                     "" if c.t is None else f"{c.t:.4f}", "" if c.p is None else f"{c.p:.4f}",
                     "" if ci[0] is None else f"{ci[0]:.6f}", "" if ci[1] is None else f"{ci[1]:.6f}"])
    return header, rows
