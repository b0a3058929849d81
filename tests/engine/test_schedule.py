"""Learning-rate schedules and the NORM weight ramp against MISSION.md's tables."""

import math

import pytest

from normkd.config import OptimCfg
from normkd.engine.schedule import lr_at
from normkd.losses import ramp_weight


def test_multistep_matches_the_crd_schedule():
    cfg = OptimCfg(epochs=240, lr=0.05, milestones=[150, 180, 210])
    assert [lr_at(cfg, e) for e in (0, 149, 150, 179, 180, 210, 239)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005]
    )


def test_step_cosine_and_warmup():
    step = OptimCfg(epochs=100, lr=0.1, schedule="step", step_size=30)
    assert [lr_at(step, e) for e in (0, 29, 30, 60, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.0001]
    )
    cos = OptimCfg(epochs=10, lr=1.0, schedule="cosine")
    assert lr_at(cos, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    warm = OptimCfg(epochs=10, lr=1.0, schedule="constant", warmup_epochs=2)
    assert lr_at(warm, 0, 0, 4) == pytest.approx(1 / 8)
    assert lr_at(warm, 1, 3, 4) == pytest.approx(1.0)
    assert lr_at(warm, 5) == 1.0


def test_norm_ramps_follow_the_authors_scripts():
    cifar = {
        0: 0.1,
        9: 0.1,
        10: 0.5,
        19: 0.5,
        20: 1.0,
        179: 1.0,
        180: 0.5,
        209: 0.5,
        210: 0.1,
        239: 0.1,
    }
    for e, w in cifar.items():
        assert ramp_weight("cifar", e, 240) == w, e
    imagenet = {
        0: 0.1,
        4: 0.1,
        5: 0.5,
        14: 0.5,
        15: 0.9,
        59: 0.9,
        60: 0.5,
        79: 0.5,
        80: 0.1,
        99: 0.1,
    }
    for e, w in imagenet.items():
        assert ramp_weight("imagenet", e, 100) == w, e
    # Stretched onto shorter schedules: the same fractions of training.
    assert ramp_weight("cifar", 1, 24) == 0.5 and ramp_weight("cifar", 2, 24) == 1.0
    assert ramp_weight("none", 7, 10) == 1.0
