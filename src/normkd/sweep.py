"""Teacher once, then every method x seed on the same data: the comparison behind ``normkd demo``
and the accuracy benchmark (one helper, so both measure the same thing the same way)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from normkd.config import Recipe, load_recipe
from normkd.engine import RunResult, run_recipe
from normkd.errors import UserError
from normkd.log import logger


@dataclass
class Sweep:
    """The teacher's run and each method's runs (one per seed, in seed order)."""

    teacher: RunResult
    teacher_recipe: Recipe
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    recipes: dict[str, Recipe] = field(default_factory=dict)  # each method's (last seed's)


def run_sweep(
    folder: Path,
    methods: list[str],
    seeds: int,
    overrides: list[str],
    tag: str,
    overwrite: bool = False,
) -> Sweep:
    """Train ``folder/teacher.yaml``, then ``folder/<method>.yaml`` for seeds 0..seeds-1.

    Every run gets ``overrides``; students read the teacher just trained. A run folder that
    exists is replaced only if it holds this very run (same resolved recipe: re-running gives
    the same result) or with ``overwrite``: checked for every run before any trains. Progress
    goes to stdout as ``[tag] ...`` lines.
    """
    t_recipe = load_recipe(folder / "teacher.yaml", overrides)
    t_file = t_recipe.run_dir() / "model.safetensors"
    planned = []
    for seed in range(seeds):
        for method in methods:
            run = [*overrides, f"engine.seed={seed}", f"engine.run_name={method}_seed{seed}"]
            recipe = load_recipe(folder / f"{method}.yaml", run)
            if recipe.teacher is not None:
                recipe.teacher.weights = t_file
            planned.append((method, seed, recipe))
    if not overwrite:
        for recipe in (t_recipe, *(r for _, _, r in planned)):
            _check_replaceable(recipe)
    logger.info(f"[{tag}] training the teacher ({t_recipe.student.model}) ...")
    teacher = run_recipe(t_recipe, overwrite=True)
    logger.info(f"[{tag}] teacher: top-1 {teacher.final_top1:.2f}% ({teacher.seconds:.1f} s)")
    sweep = Sweep(teacher, t_recipe, {m: [] for m in methods})
    for i, (method, seed, recipe) in enumerate(planned, start=1):
        res = run_recipe(recipe, overwrite=True)
        sweep.runs[method].append(res)
        sweep.recipes[method] = recipe
        logger.info(
            f"[{tag}] {i}/{len(planned)} {method} seed {seed}: top-1 "
            f"{res.final_top1:.2f}% (best {res.best_top1:.2f}%, {res.seconds:.1f} s)"
        )
    return sweep


def _check_replaceable(recipe: Recipe) -> None:
    """Refuse to replace a run folder that holds another run than ``recipe`` (a longer-trained
    teacher, a user's own run): what the comparison did not make, it does not delete."""
    d = recipe.run_dir()
    if not d.exists():
        return
    try:
        same = load_recipe(d / "config.yaml") == recipe
    except UserError:
        same = False
    if not same:
        raise UserError(
            f"{d} holds a run made with other settings than this one ({recipe.name}); "
            "pass --overwrite to replace it, or choose another --out-dir"
        )
