"""Seed statistics for comparison tables: mean ± std, and paired differences with a 95% t-interval.

Why paired: two methods run with the same seed share the student's initial weights and the data
order, so the per-seed difference cancels most of the seed-to-seed spread; its t-interval says
whether a gap can be told from seed noise at all. Standard library only (no scipy at run time).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30 (standard tables; df 1 and 2
# have closed forms: tan(0.475 pi) and 0.95 / sqrt(0.04875)). Beyond 30 a series in 1/df is used.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975  # Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5): error < 1e-3 past df 30
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def mean_std(values: list[float]) -> str:
    """``"51.45 ± 0.21"``; one value has no spread, so it is shown alone."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


@dataclass(frozen=True)
class Paired:
    """The mean of per-seed differences ``a - b`` and its 95% t-interval (None below 2 seeds)."""

    mean: float
    n: int
    low: float | None
    high: float | None

    @property
    def noise(self) -> bool:
        """True when the interval covers 0 (or there is no interval): not told from seed noise."""
        return self.low is None or self.high is None or self.low <= 0.0 <= self.high

    def cell(self) -> str:
        """``"+2.31 [+1.02, +3.60]"``; a single pair shows its difference and ``n=1``."""
        if self.low is None or self.high is None:
            return f"{self.mean:+.2f} (n=1, no interval)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """Paired difference of ``a - b`` over the seeds both have (seed -> value); None if none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return Paired(m, 1, None, None)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(m, len(diffs), m - half, m + half)


def verdict(a: str, b: str, d: Paired) -> str:
    """One line saying what a paired difference ``a - b`` supports, in words."""
    if d.low is None:
        return f"{a} vs {b}: {d.mean:+.2f} points on one seed: no interval yet."
    if d.noise:
        what = "cannot be told from seed noise"
    else:
        what = "is ahead" if d.mean > 0 else "is behind"
    return f"{a} vs {b}: {d.cell()} points over {d.n} paired seeds: {a} {what}."
