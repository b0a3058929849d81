"""``normkd demo``: teacher + students (each method, several seeds) on the embedded digits set.

Runs end to end on a laptop CPU in a few minutes, with no download: trains the teacher of
``configs/demo/teacher.yaml``, distils a student with each method's recipe over several seeds,
then prints a Markdown table and writes it with a PNG plot to the output folder.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from normkd.config import Recipe
from normkd.engine import RunResult
from normkd.engine.checkpoint import atomic_write, atomic_write_text
from normkd.errors import UserError
from normkd.extras import available, missing_line
from normkd.log import logger
from normkd.losses import TERMS
from normkd.records import git_commit, machine_line
from normkd.reproduce import precision
from normkd.stats import mean_std, paired, verdict
from normkd.sweep import Sweep, run_sweep

CONFIGS = Path(__file__).resolve().parent / "configs"
# Two pairs by default: the CNN student, where NORM does not beat KD on 300 digits, and the ViT
# student, where it wins by far: the demo shows both, each with the same four methods.
PAIRS = {
    "cnn": ["vanilla", "kd", "norm", "norm_kd"],
    "vit": ["vit_vanilla", "vit_kd", "vit_norm", "vit_norm_kd"],
}
DEFAULT_METHODS = [m for methods in PAIRS.values() for m in methods]
HEADLINES = (("norm_kd", "kd"), ("norm", "vanilla"))  # by the terms a recipe adds to CE


def demo_methods() -> list[str]:
    """Methods that have a demo recipe (configs/demo/<method>.yaml)."""
    return sorted(
        p.stem
        for p in (CONFIGS / "demo").glob("*.yaml")
        if not p.stem.startswith("_") and p.stem != "teacher"
    )


def recipe_label(recipe: Recipe) -> str:
    """A method's name from the term registry: the labels of the terms it adds to CE (NORM
    first, as the paper names its combinations: NORM+KD)."""
    kinds = sorted((t.kind for t in recipe.loss if t.kind != "ce"), key=lambda k: k != "norm")
    return "+".join(TERMS[k].label for k in kinds) or "vanilla (CE only)"


def _terms(recipe: Recipe) -> str:
    """``norm_kd`` for CE + KD + NORM, in the registry's order: which role a recipe plays."""
    kinds = {t.kind for t in recipe.loss} - {"ce"}
    return "_".join(sorted(kinds, key=lambda k: (k != "norm", k))) or "vanilla"


def run_demo(
    out_dir: Path = Path("runs/demo"),
    quick: bool = False,
    methods: list[str] | None = None,
    seeds: int | None = None,
    quiet: bool = True,
    overwrite: bool = False,
) -> dict[str, list[RunResult]]:
    """Train the demo teacher and students; print and write the comparison tables and plot."""
    methods = methods or DEFAULT_METHODS
    known = demo_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"unknown demo method(s) {unknown}; valid: {', '.join(known)}")
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        raise UserError("--seeds must be >= 1")
    t0 = time.perf_counter()
    common = [f"engine.out_dir={out_dir}", f"engine.quiet={str(quiet).lower()}"]
    if quick:
        common += ["optim.epochs=8"]
    sweep = run_sweep(CONFIGS / "demo", methods, n_seeds, common, "demo", overwrite)
    n_train = sweep.teacher_recipe.data.n_train
    tables = "\n\n".join(_pair_table(sweep, group) for group in _groups(sweep).values())
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "results.md", out_dir / "results.png"
    header = (
        f"# normkd demo: digits ({n_train:,} train / {1797 - n_train:,} test images), "
        f"{n_seeds} seed(s)\n\nSized to finish in under 100 s on a 2-core CPU: 300 training "
        "digits of 8x8 pixels, 20 epochs per student (the ViT would gain a few points in 40): a "
        "check that every part runs and a first look, far too small to rank methods in general."
        "\n\n"
        f"Teacher {sweep.teacher_recipe.student.model}: top-1 {sweep.teacher.final_top1:.2f}% "
        f"({sweep.teacher.params:,} params, {sweep.teacher.seconds:.1f} s). Final-epoch top-1, "
        f"mean ± std over seeds (best epoch beside); Δ: paired by seed (same initial student "
        f"weights and data order), 95% t-interval, ~ where it covers 0. {machine_line()}, "
        f"precision {precision(sweep.teacher_recipe)}, commit {git_commit()[:12]}, "
        f"{time.strftime('%Y-%m-%d')}. Wall time {time.perf_counter() - t0:.0f} s.\n\n"
    )
    atomic_write_text(md, header + tables + "\n")
    drawn = _plot(sweep, png)
    print()
    print(tables)
    print(
        f"\n[demo] table: {md}\n[demo] plot:  {png if drawn else '(none)'}\n[demo] runs:  {out_dir}/"
    )
    print(f"[demo] wall time {time.perf_counter() - t0:.0f} s")
    return sweep.runs


def _groups(sweep: Sweep) -> dict[str, list[str]]:
    """The methods of each student model (one table per teacher -> student pair)."""
    groups: dict[str, list[str]] = {}
    for method in sweep.runs:
        groups.setdefault(sweep.recipes[method].student.model, []).append(method)
    return groups


def _by_seed(runs: list[RunResult]) -> dict[int, float]:
    return {seed: r.final_top1 for seed, r in enumerate(runs)}


def _pair_table(sweep: Sweep, methods: list[str]) -> str:
    """One pair's table: mean ± std over seeds, paired Δ vs vanilla and vs KD with 95% intervals,
    then one line per headline saying which result holds for this pair."""
    role = {_terms(sweep.recipes[m]): m for m in methods}
    bases = [role[b] for b in ("vanilla", "kd") if b in role]
    student = sweep.recipes[methods[0]].student.model
    head = ["method", "final top-1 %", "best-epoch top-1 %"]
    head += [f"Δ vs {recipe_label(sweep.recipes[b])} [95% CI]" for b in bases]
    head += ["deployed params", "s / run"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method in methods:
        runs = sweep.runs[method]
        cells = [recipe_label(sweep.recipes[method]), mean_std([r.final_top1 for r in runs])]
        cells.append(mean_std([r.best_top1 for r in runs]))
        for b in bases:
            d = None if b == method else paired(_by_seed(runs), _by_seed(sweep.runs[b]))
            cells.append("—" if d is None else d.cell() + (" ~" if d.noise else ""))
        secs = statistics.mean(r.seconds for r in runs)
        cells += [f"{runs[0].params:,}", f"{secs:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    lines = []
    for a, b in HEADLINES:
        if a in role and b in role:
            d = paired(_by_seed(sweep.runs[role[a]]), _by_seed(sweep.runs[role[b]]))
            la, lb = recipe_label(sweep.recipes[role[a]]), recipe_label(sweep.recipes[role[b]])
            lines.append(f"- {student}: {verdict(la, lb, d)}" if d else "")
    o = sweep.recipes[methods[0]].optim
    title = (
        f"## {sweep.teacher_recipe.student.model} -> {student} ({o.epochs} epochs, "
        f"{o.optimizer}, lr {o.lr})\n\n"
    )
    return title + "\n".join(rows) + ("\n\n" + "\n".join(lines) if lines else "")


def _plot(sweep: Sweep, path: Path) -> bool:
    """Per pair: final top-1 per method (mean, a dot per seed) and the mean test curves; False
    (and a warning) without matplotlib."""
    if not available("matplotlib"):
        logger.warning(f"{missing_line('matplotlib')}; {path} is not drawn")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(sweep)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.8 * len(groups)), squeeze=False)
    for (student, methods), (ax1, ax2) in zip(groups.items(), axes):
        names = [recipe_label(sweep.recipes[m]) for m in methods]
        finals = [[r.final_top1 for r in sweep.runs[m]] for m in methods]
        ax1.bar(names, [statistics.mean(f) for f in finals], color="tab:blue", alpha=0.7)
        for i, f in enumerate(finals):
            ax1.plot([i] * len(f), f, "k.", ms=5)
        ax1.set_ylim(max(min(min(f) for f in finals) - 5, 0), 100)
        ax1.set_ylabel("final test top-1 (%)")
        ax1.set_title(f"{sweep.teacher_recipe.student.model} -> {student}: final (dots: seeds)")
        for label, m in zip(names, methods):
            curves: list[list[Any]] = [[h["val_top1"] for h in r.history] for r in sweep.runs[m]]
            n = min(len(c) for c in curves)
            ax2.plot(range(1, n + 1), [statistics.mean(c[i] for c in curves) for i in range(n)],
                     label=label)  # fmt: skip
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("test top-1 (%)")
        ax2.set_title(f"{student}: test curves (mean over seeds)")
        ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True
