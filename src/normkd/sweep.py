"""Teacher once, then every method x seed on the same data: the comparison behind ``normkd demo``
and the accuracy benchmark (one helper, so both measure the same thing the same way)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from normkd.config import Recipe, load_recipe
from normkd.engine import RunResult, run_recipe
from normkd.log import logger
from normkd.losses import method_label


@dataclass
class Sweep:
    """The teacher's run and each method's runs (one per seed, in seed order)."""

    teacher: RunResult
    teacher_recipe: Recipe
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    recipes: dict[str, Recipe] = field(default_factory=dict)  # each method's (last seed's)


def run_sweep(
    folder: Path, methods: list[str], seeds: int, overrides: list[str], tag: str
) -> Sweep:
    """Train ``folder/teacher.yaml``, then ``folder/<method>.yaml`` for seeds 0..seeds-1.

    Every run gets ``overrides`` and is replaced if its run directory exists; students read the
    teacher just trained. Progress goes to stdout as ``[tag] ...`` lines.
    """
    t_recipe = load_recipe(folder / "teacher.yaml", overrides)
    logger.info(f"[{tag}] training the teacher ({t_recipe.student.model}) ...")
    teacher = run_recipe(t_recipe, overwrite=True)
    t_file = Path(teacher.run_dir) / "model.safetensors"
    logger.info(f"[{tag}] teacher: top-1 {teacher.final_top1:.2f}% ({teacher.seconds:.1f} s)")
    sweep = Sweep(teacher, t_recipe, {m: [] for m in methods})
    total = len(methods) * seeds
    for seed in range(seeds):
        for method in methods:
            run = [*overrides, f"engine.seed={seed}", f"engine.run_name={method}_seed{seed}"]
            recipe = load_recipe(folder / f"{method}.yaml", run)
            if recipe.teacher is not None:
                recipe.teacher.weights = t_file
            res = run_recipe(recipe, overwrite=True)
            sweep.runs[method].append(res)
            sweep.recipes[method] = recipe
            done = sum(len(r) for r in sweep.runs.values())
            logger.info(
                f"[{tag}] {done}/{total} {method_label(method)} seed {seed}: top-1 "
                f"{res.final_top1:.2f}% (best {res.best_top1:.2f}%, {res.seconds:.1f} s)"
            )
    return sweep
