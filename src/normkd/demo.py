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

import torch

from normkd.config import load_recipe
from normkd.engine import RunResult, fit
from normkd.errors import UserError

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_METHODS = ["vanilla", "kd", "norm", "norm_kd"]
LABELS = {
    "vanilla": "vanilla (CE only)",
    "kd": "KD",
    "norm": "NORM",
    "norm_kd": "NORM+KD",
    "fitnet": "FitNet",
    "at": "AT",
    "crd": "CRD",
    "dkd": "DKD",
    "norm_crd": "NORM+CRD",
    "norm_dkd": "NORM+DKD",
}


def demo_methods() -> list[str]:
    """Methods that have a demo recipe (configs/demo/<method>.yaml)."""
    return sorted(
        p.stem
        for p in (CONFIGS / "demo").glob("*.yaml")
        if not p.stem.startswith("_") and p.stem != "teacher"
    )


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def run_demo(
    out_dir: Path = Path("runs/demo"),
    quick: bool = False,
    methods: list[str] | None = None,
    seeds: int | None = None,
    quiet: bool = True,
) -> dict[str, list[RunResult]]:
    """Train the demo teacher and students; print and write the comparison table and plot."""
    methods = methods or DEFAULT_METHODS
    known = demo_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"unknown demo method(s) {unknown}; valid: {', '.join(known)}")
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        raise UserError("--seeds must be >= 1")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    t0 = time.perf_counter()
    common = [f"engine.out_dir={out_dir}", f"engine.quiet={str(quiet).lower()}"]
    if quick:
        common += ["optim.epochs=8"]

    teacher_recipe = load_recipe(CONFIGS / "demo" / "teacher.yaml", common)
    print(f"[demo] training the teacher ({teacher_recipe.student.model}) on digits ...", flush=True)
    teacher = fit(teacher_recipe, overwrite=True)
    teacher_file = Path(teacher.run_dir) / "model.safetensors"
    print(f"[demo] teacher: top-1 {teacher.final_top1:.2f}% ({teacher.seconds:.1f} s)", flush=True)

    results: dict[str, list[RunResult]] = {m: [] for m in methods}
    total = len(methods) * n_seeds
    done = 0
    for seed in range(n_seeds):
        for method in methods:
            overrides = [*common, f"engine.seed={seed}", f"engine.run_name={method}_seed{seed}"]
            recipe = load_recipe(CONFIGS / "demo" / f"{method}.yaml", overrides)
            if recipe.teacher is not None:
                recipe.teacher.weights = teacher_file
            res = fit(recipe, overwrite=True)
            results[method].append(res)
            done += 1
            print(
                f"[demo] {done}/{total} {LABELS.get(method, method)} seed {seed}: "
                f"top-1 {res.final_top1:.2f}% ({res.seconds:.1f} s)",
                flush=True,
            )

    n_train = teacher_recipe.data.n_train
    table = _table(results, teacher, n_seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    png = out_dir / "results.png"
    header = (
        f"# normkd demo: digits ({n_train:,} train / {1797 - n_train:,} test images), "
        f"{n_seeds} seed(s)\n\n"
        f"Teacher {teacher_recipe.student.model}: top-1 {teacher.final_top1:.2f}%. "
        f"Device: CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}. Wall time {time.perf_counter() - t0:.0f} s.\n\n"
    )
    md.write_text(header + table + "\n")
    _plot(results, png)
    print()
    print(table)
    print(f"\n[demo] table: {md}\n[demo] plot:  {png}\n[demo] runs:  {out_dir}/")
    print(f"[demo] wall time {time.perf_counter() - t0:.0f} s")
    return results


def _table(results: dict[str, list[RunResult]], teacher: RunResult, n_seeds: int) -> str:
    base = results.get("vanilla")
    rows = [
        "| method | test top-1 % (final) | best-epoch top-1 % | Δ vs vanilla | deployed params "
        "| s / run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, runs in results.items():
        final = [r.final_top1 for r in runs]
        best = [r.best_top1 for r in runs]
        if base and method != "vanilla":
            paired = [r.final_top1 - b.final_top1 for r, b in zip(runs, base)]
            delta = f"{statistics.mean(paired):+.2f}"
        else:
            delta = "—"
        secs = statistics.mean(r.seconds for r in runs)
        rows.append(
            f"| {LABELS.get(method, method)} | {_fmt(final)} | {_fmt(best)} | {delta} "
            f"| {runs[0].params:,} | {secs:.1f} |"
        )
    rows.append(
        f"| teacher | {teacher.final_top1:.2f} | {teacher.best_top1:.2f} | | {teacher.params:,} "
        f"| {teacher.seconds:.1f} |"
    )
    return "\n".join(rows)


def _plot(results: dict[str, list[RunResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [LABELS.get(m, m) for m in results]
    means = [statistics.mean(r.final_top1 for r in runs) for runs in results.values()]
    errs = [
        statistics.stdev([r.final_top1 for r in runs]) if len(runs) > 1 else 0.0
        for runs in results.values()
    ]
    ax1.bar(names, means, yerr=errs, capsize=4, color="tab:blue")
    lo = min(means) - max([*errs, 0.0]) - 2
    ax1.set_ylim(max(lo, 0), 100)
    ax1.set_ylabel("test top-1 (%)")
    ax1.set_title("final accuracy (mean ± std over seeds)")
    ax1.tick_params(axis="x", rotation=20)
    for label, runs in zip(names, results.values()):
        curves: list[list[Any]] = [[h["test_top1"] for h in r.history] for r in runs]
        n = min(len(c) for c in curves)
        mean_curve = [statistics.mean(c[i] for c in curves) for i in range(n)]
        ax2.plot(range(1, n + 1), mean_curve, label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test top-1 (%)")
    ax2.set_title("training curves (mean over seeds)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
