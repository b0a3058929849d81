"""Seed statistics: the t quantiles, paired differences and their intervals."""

import math
import statistics

import pytest
from scipy import stats as scipy_stats

from normkd.stats import mean_std, paired, t975


def test_t_quantiles_match_the_distribution_for_every_df():
    for df in range(1, 200):
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1.5e-3), df
    assert t975(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-3)  # closed forms
    assert t975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-3)
    with pytest.raises(ValueError):
        t975(0)


def test_a_paired_difference_and_its_interval():
    a = {0: 51.0, 1: 51.7, 2: 50.8, 7: 99.0}  # seed 7 has no partner: left out
    b = {0: 50.0, 1: 50.5, 2: 50.0, 3: 1.0}
    d = paired(a, b)
    diffs = [1.0, 1.2, 0.8]
    half = scipy_stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(1.0)
    assert (d.low, d.high) == pytest.approx((1.0 - half, 1.0 + half), abs=1e-3)
    assert not d.noise and d.cell() == f"+1.00 [{1 - half:+.2f}, {1 + half:+.2f}]"


def test_an_interval_that_covers_zero_is_noise_and_one_seed_has_no_interval():
    d = paired({0: 50.0, 1: 52.0, 2: 49.0}, {0: 50.5, 1: 50.5, 2: 50.0})
    assert d.low < 0 < d.high and d.noise
    one = paired({0: 50.0}, {0: 49.0, 1: 3.0})
    assert one.n == 1 and one.low is None and one.noise and "no interval" in one.cell()
    assert paired({0: 1.0}, {1: 1.0}) is None


def test_mean_std():
    assert mean_std([]) == "—" and mean_std([51.234]) == "51.23"
    assert mean_std([50.0, 52.0]) == f"51.00 ± {statistics.stdev([50.0, 52.0]):.2f}"
