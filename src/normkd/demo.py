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

from normkd.engine import RunResult
from normkd.engine.checkpoint import atomic_write, atomic_write_text
from normkd.errors import UserError
from normkd.extras import available, missing_line
from normkd.log import logger
from normkd.losses import method_label
from normkd.sweep import Sweep, run_sweep

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_METHODS = ["vanilla", "kd", "norm", "norm_kd"]


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
    t0 = time.perf_counter()
    common = [f"engine.out_dir={out_dir}", f"engine.quiet={str(quiet).lower()}"]
    if quick:
        common += ["optim.epochs=8"]
    sweep = run_sweep(CONFIGS / "demo", methods, n_seeds, common, "demo")
    n_train = sweep.teacher_recipe.data.n_train
    table = _table(sweep, n_seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    png = out_dir / "results.png"
    header = (
        f"# normkd demo: digits ({n_train:,} train / {1797 - n_train:,} test images), "
        f"{n_seeds} seed(s)\n\n"
        f"Teacher {sweep.teacher_recipe.student.model}: top-1 {sweep.teacher.final_top1:.2f}%. "
        f"Device: CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}. Wall time {time.perf_counter() - t0:.0f} s.\n\n"
    )
    atomic_write_text(md, header + table + "\n")
    drawn = _plot(sweep.runs, png)
    print()
    print(table)
    print(
        f"\n[demo] table: {md}\n[demo] plot:  {png if drawn else '(none)'}\n[demo] runs:  {out_dir}/"
    )
    print(f"[demo] wall time {time.perf_counter() - t0:.0f} s")
    return sweep.runs


def _table(sweep: Sweep, n_seeds: int) -> str:
    """Mean ± std over seeds; a paired Δ vs vanilla only when there are several seeds (one
    undertrained seed supports no difference)."""
    results, teacher = sweep.runs, sweep.teacher
    base = results.get("vanilla") if n_seeds > 1 else None
    head = ["method", "test top-1 % (final)", "best-epoch top-1 %"]
    head += ["Δ vs vanilla"] if base else []
    head += ["deployed params", "s / run"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, runs in results.items():
        cells = [method_label(method), _fmt([r.final_top1 for r in runs])]
        cells.append(_fmt([r.best_top1 for r in runs]))
        if base:
            paired = [r.final_top1 - b.final_top1 for r, b in zip(runs, base)]
            cells.append("—" if method == "vanilla" else f"{statistics.mean(paired):+.2f}")
        secs = statistics.mean(r.seconds for r in runs)
        cells += [f"{runs[0].params:,}", f"{secs:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    cells = ["teacher", f"{teacher.final_top1:.2f}", f"{teacher.best_top1:.2f}"]
    cells += [""] if base else []
    cells += [f"{teacher.params:,}", f"{teacher.seconds:.1f}"]
    rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot(results: dict[str, list[RunResult]], path: Path) -> bool:
    """Final top-1 per method and mean test curves; False (and a warning) without matplotlib."""
    if not available("matplotlib"):
        logger.warning(f"{missing_line('matplotlib')}; {path} is not drawn")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [method_label(m) for m in results]
    means = [statistics.mean(r.final_top1 for r in runs) for runs in results.values()]
    errs = [
        statistics.stdev([r.final_top1 for r in runs]) if len(runs) > 1 else 0.0
        for runs in results.values()
    ]
    several = any(len(runs) > 1 for runs in results.values())  # no zero-width error bars
    ax1.bar(names, means, yerr=errs if several else None, capsize=4, color="tab:blue")
    lo = min(means) - max([*errs, 0.0]) - 2
    ax1.set_ylim(max(lo, 0), 100)
    ax1.set_ylabel("test top-1 (%)")
    ax1.set_title("final accuracy (mean ± std over seeds)" if several else "final accuracy")
    ax1.tick_params(axis="x", rotation=20)
    for label, runs in zip(names, results.values()):
        curves: list[list[Any]] = [[h["val_top1"] for h in r.history] for r in runs]
        n = min(len(c) for c in curves)
        mean_curve = [statistics.mean(c[i] for c in curves) for i in range(n)]
        ax2.plot(range(1, n + 1), mean_curve, label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test top-1 (%)")
    ax2.set_title("training curves (mean over seeds)")
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
