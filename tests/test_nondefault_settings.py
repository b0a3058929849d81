"""Settings the suite had only run at their default value, now at another one, through a run.

A setting exercised only at its default passes every test however it is wired: a recipe value
that never reaches its target reads the same as the default it falls back to. Each test here sets
one such setting away from its default and checks it where the run uses it.
"""

from __future__ import annotations

from normkd.config import load_recipe
from normkd.data import load_digits_split
from normkd.engine import run_recipe
from normkd.engine.checkpoint import load_checkpoint
from support import DEMO, FAST, recipe_data


def test_nesterov_on_reaches_the_optimizer_the_run_steps(tmp_path):
    """optim.nesterov (default false): the SGD that trained the run has the flag on."""
    over = [*FAST, f"engine.out_dir={tmp_path}", "optim.epochs=1", "optim.nesterov=true"]
    recipe = load_recipe(DEMO / "vanilla.yaml", over)
    run_recipe(recipe)
    groups = load_checkpoint(tmp_path / "demo_vanilla" / "last.pt")["optimizer"]["param_groups"]
    assert [g["nesterov"] for g in groups] == [True] * len(groups)
    assert all(g["momentum"] == recipe.optim.momentum > 0 for g in groups)


def test_digits_split_seed_chooses_the_split_a_run_trains_on():
    """data.split_seed (default 0) on digits: the run's training images are that seed's split,
    and another seed's are other images (also for a data.fraction subset of them)."""
    chosen = {}
    for seed in (0, 3):
        recipe = load_recipe(DEMO / "vanilla.yaml", [*FAST, f"data.split_seed={seed}"])
        data = recipe_data(recipe)
        own = load_digits_split(seed=seed, n_train=recipe.data.n_train)
        assert data.info["train_indices"] == own.info["train_indices"]
        chosen[seed] = data.info["train_indices"]
    assert chosen[0] != chosen[3]
    subset = [*FAST, "data.fraction=0.1"]
    parts = [
        recipe_data(load_recipe(DEMO / "vanilla.yaml", [*subset, f"data.split_seed={s}"]))
        for s in (0, 3)
    ]
    assert parts[0].info["n_train"] == parts[1].info["n_train"] == 30
    assert not (parts[0].train.x == parts[1].train.x).all()
