"""The demo: one table per pair with paired intervals and labels from the term registry, the
plot's path when it drew one, and no run folder replaced that the demo did not make."""

import pytest

from normkd.config import load_recipe
from normkd.demo import CONFIGS, DEFAULT_METHODS, PAIRS, _pair_table, recipe_label, run_demo
from normkd.engine import RunResult
from normkd.errors import UserError
from normkd.sweep import Sweep

DEMO = CONFIGS / "demo"


def _run(top1: float) -> RunResult:
    return RunResult("x", 8, top1 + 0.5, 7, top1, 99.0, 78_042, 3.0)


def _sweep(methods, finals) -> Sweep:
    teacher = RunResult("t", 8, 98.3, 7, 98.2, 100.0, 1_210_410, 30.0)
    sweep = Sweep(teacher, load_recipe(DEMO / "teacher.yaml"))
    for m, values in zip(methods, finals):
        sweep.runs[m] = [_run(v) for v in values]
        sweep.recipes[m] = load_recipe(DEMO / f"{m}.yaml")
    return sweep


def test_labels_come_from_the_term_registry_not_recipe_names():
    got = [recipe_label(load_recipe(DEMO / f"{m}.yaml")) for m in PAIRS["vit"]]
    assert got == ["vanilla (CE only)", "KD", "NORM", "NORM+KD"]
    assert PAIRS["cnn"] + PAIRS["vit"] == DEFAULT_METHODS


def test_each_pair_gets_paired_intervals_to_vanilla_and_kd_and_a_line_per_headline():
    finals = [[90, 91, 92], [95, 95.5, 96.5], [90.5, 91.4, 92.6], [95.2, 95.4, 96.7]]
    table = _pair_table(_sweep(PAIRS["vit"], finals), PAIRS["vit"])
    assert table.startswith("## resnet8x4 -> vit_nano_p2")
    head = "| method | final top-1 % | best-epoch top-1 % | Δ vs vanilla (CE only) [95% CI] |"
    assert head in table and "Δ vs KD [95% CI]" in table
    assert "| NORM | 91.50 ± 1.05 | 92.00 ± 1.05 | +0.50 [" in table
    assert "| KD | 95.67 ± 0.76 |" in table
    assert "- vit_nano_p2: NORM+KD vs KD: +0.10 [" in table and "seed noise" in table
    assert "- vit_nano_p2: NORM vs vanilla (CE only): +0.50 [" in table


def test_the_demo_prints_the_plot_it_drew_and_refuses_to_replace_another_run(tmp_path, capsys):
    out = tmp_path / "demo"
    run_demo(out, quick=True, methods=["vanilla"], seeds=1)
    printed = capsys.readouterr().out
    assert f"[demo] plot:  {out / 'results.png'}" in printed
    assert (out / "results.png").stat().st_size > 1000
    assert "## resnet8x4 -> resnet8" in (out / "results.md").read_text()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="demo_teacher holds a run made with other settings"):
        run_demo(out, quick=False, methods=["vanilla"], seeds=1)  # 40 epochs, not 8
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    run_demo(out, quick=True, methods=["vanilla"], seeds=1)  # its own run: replaced


def test_the_chance_warning_needs_the_training_batches_at_chance_too(caplog):
    """Early on a healthy run's evaluation can sit near chance while its BatchNorm statistics lag
    (the demo's students: 10-14% at epoch 3, 45-68% on their training batches): no warning; nor
    after a handful of steps (the demo's ViT is at 13-15% on both after 15). A stuck run is at
    chance on both after 100 steps: one warning."""
    from normkd.engine.loop import _check_chance
    from support import build_job

    job = build_job(load_recipe(DEMO / "vanilla.yaml", ["engine.device=cpu"]))
    _check_chance(job, 20, 14.4, 55.0)  # 20 epochs of 5 steps: the check's 100 steps
    assert not caplog.records
    _check_chance(job, 3, 11.0, 12.0)  # 15 steps: too early to call any run stuck
    assert not caplog.records
    _check_chance(job, 20, 11.0, 12.0)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "within 1.5x chance" in caplog.records[0].getMessage()
