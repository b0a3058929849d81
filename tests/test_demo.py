"""The demo's table: a paired Δ vs vanilla only where several seeds support it."""

from normkd.demo import _table
from normkd.engine import RunResult
from normkd.sweep import Sweep


def _run(top1: float) -> RunResult:
    return RunResult("x", 8, top1 + 0.5, 7, top1, 99.0, 78_042, 3.0)


def _sweep(seeds: int) -> Sweep:
    teacher = RunResult("t", 8, 98.3, 7, 98.2, 100.0, 1_210_410, 30.0)
    runs = {
        "vanilla": [_run(95.0 + s) for s in range(seeds)],
        "norm_kd": [_run(96.0 + 2 * s) for s in range(seeds)],
    }
    return Sweep(teacher, None, runs)  # type: ignore[arg-type]


def test_one_seed_gets_no_delta_column():
    table = _table(_sweep(1), 1)
    assert "Δ" not in table
    assert "| NORM+KD | 96.00 | 96.50 | 78,042 | 3.0 |" in table
    assert "| teacher | 98.20 | 98.30 | 1,210,410 | 30.0 |" in table


def test_several_seeds_get_the_mean_paired_delta():
    table = _table(_sweep(3), 3)
    assert "| method | test top-1 % (final) | best-epoch top-1 % | Δ vs vanilla |" in table
    # paired differences 1, 2, 3 -> +2.00
    assert "| NORM+KD | 98.00 ± 2.00 | 98.50 ± 2.00 | +2.00 | 78,042 | 3.0 |" in table
    assert "| vanilla (CE only) | 96.00 ± 1.00 | 96.50 ± 1.00 | — |" in table
