"""``normkd reproduce``: the paper's CIFAR-100 comparison for one teacher/student pair, resumable.

Trains the pair's teacher (or takes ``--teacher-weights``), then every method's shipped recipe
(``configs/cifar100/<teacher>__<student>/<method>.yaml``) for each seed, and writes a table of
best and final top-1 next to the published figures (``normkd.published``). Each run keeps its
own run directory: running the command again skips finished runs and resumes unfinished ones.

Scales: ``paper`` runs the recipes as they are (240 epochs: a GPU job); ``short`` the same
recipes on a shorter schedule (milestones, warm-ups and DKD's ramp scaled with it, the NORM ramp
stretches itself), stated in the table; ``smoke`` 1 epoch on 2% of the data (a check, not a
result).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from normkd.config import Recipe, load_recipe
from normkd.engine import RunResult, run_recipe
from normkd.engine.checkpoint import atomic_write, atomic_write_text
from normkd.errors import UserError
from normkd.extras import available, missing_line
from normkd.log import logger
from normkd.losses import method_label
from normkd.published import CIFAR100, SOURCES, published

CONFIGS = Path(__file__).resolve().parent / "configs" / "cifar100"
SCALES = ("paper", "short", "smoke")
DEFAULT_METHODS = ("vanilla", "kd", "norm", "norm_kd", "norm_authors", "norm_kd_authors")
SHORT_EPOCHS = 30
SMOKE_FRACTION = 0.02


@dataclass
class Planned:
    """One run of the comparison: its label, seed and fully resolved recipe."""

    method: str  # "teacher" or a recipe name of the pair folder
    seed: int
    recipe: Recipe

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir()


@dataclass
class Comparison:
    """What ``reproduce`` ran and measured."""

    pair: str
    scale: str
    epochs: int
    teacher: RunResult | None
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    seconds: float = 0.0


def pairs() -> list[str]:
    """The CIFAR-100 pair folders that ship with normkd."""
    return sorted(d.name for d in CONFIGS.iterdir() if d.is_dir() and "__" in d.name)


def scale_overrides(recipe: Recipe, scale: str, epochs: int | None) -> list[str]:
    """``--set`` items that put ``recipe`` on the scale's schedule (nothing for ``paper``)."""
    if scale == "paper":
        return []
    o = recipe.optim
    n = 1 if scale == "smoke" else (epochs or SHORT_EPOCHS)
    ratio = n / o.epochs
    milestones = sorted({round(m * ratio) for m in o.milestones} - {0})
    milestones = [m for m in milestones if m < n]
    over = [
        f"optim.epochs={n}",
        f"optim.milestones={json.dumps(milestones)}",
        f"optim.warmup_epochs={round(o.warmup_epochs * ratio)}",
    ]
    for i, term in enumerate(recipe.loss):
        warmup = getattr(term, "warmup", None)  # DKD's linear ramp, in epochs
        if warmup:
            over.append(f"loss.{i}.warmup={max(1, round(warmup * ratio)) if n > 1 else 0}")
    if scale == "smoke":
        over.append(f"data.fraction={SMOKE_FRACTION}")
    return over


def plan(
    pair: str,
    methods: list[str],
    seeds: int,
    scale: str,
    data_root: Path,
    out_dir: Path,
    epochs: int | None = None,
    teacher_weights: Path | None = None,
    extra: list[str] | None = None,
) -> tuple[Planned | None, list[Planned]]:
    """The teacher's run (None with ``teacher_weights``) and each method x seed run, resolved.

    ``extra`` (the user's ``--set`` items) is applied last, so it wins over the scale's schedule
    (e.g. ``optim.warmup_epochs=1`` on a short run whose scaled warm-up rounds to 0)."""
    folder = CONFIGS / pair
    if pair not in pairs():
        raise UserError(f"unknown pair {pair!r}; valid: {', '.join(pairs())}")
    missing = [m for m in methods if not (folder / f"{m}.yaml").is_file()]
    if missing:
        have = sorted(p.stem for p in folder.glob("[!_]*.yaml"))
        raise UserError(f"pair {pair} has no recipe for {missing}; it has: {', '.join(have)}")
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    base = [
        f"data.root={data_root}",
        f"engine.out_dir={out_dir / pair / scale}",
        "engine.quiet=true",
    ]
    extra = list(extra or [])
    base += extra

    def resolve(path: Path, method: str, seed: int) -> Planned:
        over = [*base, f"engine.run_name={method}_seed{seed}", f"engine.seed={seed}"]
        first = load_recipe(path, over)
        if first.teacher is not None:  # students read the teacher this comparison uses
            over.append(f"teacher.weights={teacher_weights}")
        return Planned(
            method, seed, load_recipe(path, over + scale_overrides(first, scale, epochs) + extra)
        )

    teacher = None
    if teacher_weights is None:
        teacher = resolve(CONFIGS / "teachers" / f"{pair.split('__')[0]}.yaml", "teacher", 0)
        teacher_weights = teacher.run_dir / "model.safetensors"
    runs = [resolve(folder / f"{m}.yaml", m, s) for s in range(seeds) for m in methods]
    return teacher, runs


def execute(p: Planned, index: int, total: int) -> RunResult:
    """Run (or resume, or read back) one planned run, saying which of how many it is."""
    d = p.run_dir
    what = f"[reproduce] run {index}/{total}: {p.method} seed {p.seed}"
    if (d / "summary.json").is_file():
        logger.info(f"{what}: finished earlier, read from {d}")
        return read_result(d)
    resume = (d / "last.pt").is_file()
    if resume:
        from normkd.engine.checkpoint import load_checkpoint

        done = load_checkpoint(d / "last.pt")["epoch"]
        logger.info(f"{what}: resuming at epoch {done + 1}/{p.recipe.optim.epochs}")
    else:
        logger.info(f"{what}: {p.recipe.optim.epochs} epochs ...")
    # A folder without last.pt holds nothing to keep (a run stopped in its first epoch).
    result = run_recipe(p.recipe, resume=resume, overwrite=not resume)
    logger.info(
        f"{what}: best {result.best_top1:.2f}%, final {result.final_top1:.2f}% "
        f"({result.seconds / 60:.1f} min)"
    )
    return result


def read_result(run_dir: Path) -> RunResult:
    """The RunResult a finished run wrote to summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    names = {f.name for f in fields(RunResult)} - {"history", "model", "model_meta"}
    return RunResult(**{k: v for k, v in summary.items() if k in names})


def reproduce(
    pair: str,
    data_root: Path,
    methods: list[str] | None = None,
    seeds: int = 1,
    scale: str = "short",
    out_dir: Path = Path("runs/reproduce"),
    epochs: int | None = None,
    teacher_weights: Path | None = None,
    extra: list[str] | None = None,
    report: Path | None = None,
) -> Comparison:
    """Run the comparison (resuming what exists), print the table, write results.md/.png."""
    if seeds < 1:
        raise UserError("--seeds must be >= 1")
    t0 = time.perf_counter()
    methods = list(methods or DEFAULT_METHODS)
    teacher, runs = plan(
        pair, methods, seeds, scale, data_root, out_dir, epochs, teacher_weights, extra
    )
    total = len(runs) + (teacher is not None)
    n_epochs = runs[0].recipe.optim.epochs if runs else 0
    comp = Comparison(pair, scale, n_epochs, None, {m: [] for m in methods})
    if teacher is not None:
        comp.teacher = execute(teacher, 1, total)
    for i, p in enumerate(runs, start=total - len(runs) + 1):
        comp.runs[p.method].append(execute(p, i, total))
    comp.seconds = time.perf_counter() - t0
    text = markdown(comp, runs[0].recipe if runs else None)
    folder = out_dir / pair / scale
    atomic_write_text(folder / "results.md", text)
    plot(comp, folder / "results.png")
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report, text)
        plot(comp, report.with_suffix(".png"))
    print("\n" + text)
    return comp


def label(method: str) -> str:
    """``norm_kd_authors`` -> ``NORM+KD (authors' code)``."""
    base = method.removesuffix("_authors")
    return method_label(base) + (" (authors' code)" if base != method else "")


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(comp: Comparison, recipe: Recipe | None) -> str:
    """The comparison table with its setting: pair, schedule, data, machine, wall time."""
    seeds = max((len(r) for r in comp.runs.values()), default=0)
    paired = seeds > 1 and "vanilla" in comp.runs  # one seed supports no difference
    head = ["method", "best top-1 %", "final top-1 %"]
    head += ["Δ final vs vanilla (paired)"] if paired else []
    head += ["published (240 epochs)", "min / run"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    if comp.teacher is not None:
        t = comp.teacher
        cells = ["teacher", f"{t.best_top1:.2f}", f"{t.final_top1:.2f}"]
        cells += [""] if paired else []
        rows.append("| " + " | ".join([*cells, "", f"{t.seconds / 60:.1f}"]) + " |")
    base = comp.runs.get("vanilla", [])
    for method, results in comp.runs.items():
        final = [r.final_top1 for r in results]
        cells = [label(method)]
        cells += [_mean_std([r.best_top1 for r in results]), _mean_std(final)]
        if paired:
            diff = [a - b for a, b in zip(final, (r.final_top1 for r in base))]
            cells.append("—" if method == "vanilla" else f"{statistics.mean(diff):+.2f}")
        pub = published(comp.pair, method)
        cells.append(f"{pub:.2f}" if pub is not None else "—")
        cells.append(f"{statistics.mean(r.seconds for r in results) / 60:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return _header(comp, recipe, seeds) + "\n".join(rows) + "\n\n" + _footer(comp)


def _header(comp: Comparison, recipe: Recipe | None, seeds: int) -> str:
    teacher, student = comp.pair.split("__")
    sched = ""
    if recipe is not None:
        o = recipe.optim
        sched = (
            f"{o.epochs} epochs ({o.schedule}, lr {o.lr}, milestones {o.milestones}, batch "
            f"{recipe.data.batch_size}, amp {recipe.engine.amp})"
        )
    kind = {"paper": "the recipes as shipped", "short": "a shortened schedule"}.get(comp.scale)
    title = f"# CIFAR-100 {teacher} -> {student}: {comp.scale} scale"
    note = kind or f"a smoke check: 1 epoch on {SMOKE_FRACTION:.0%} of the data, not a result"
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (
        f"{title}\n\n{seeds} seed(s); {note}: {sched}. {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}; wall time of this "
        f"command {comp.seconds / 60:.1f} min (runs read back from earlier are not re-timed).\n\n"
    )


def _footer(comp: Comparison) -> str:
    known = CIFAR100.get(comp.pair)
    if not known:
        return (
            "This pair is not in the NORM paper: there is no published figure to set beside it.\n"
        )
    cited = sorted({SOURCES[m] for m in known})
    return (
        "Published: best test top-1 over the full 240-epoch schedule (" + "; ".join(cited) + "). "
        "`*_authors` recipes follow the authors' code and compare with the same NORM figure.\n"
    )


def plot(comp: Comparison, path: Path) -> None:
    """Final top-1 per method (mean, dots per seed) beside the published figure."""
    if not available("matplotlib"):
        logger.warning(f"{missing_line('matplotlib')}; {path} is not drawn")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, r in comp.runs.items() if r]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(methods)), 4))
    for i, m in enumerate(methods):
        finals = [r.final_top1 for r in comp.runs[m]]
        ax.bar(i, statistics.mean(finals), color="tab:blue", alpha=0.7)
        ax.plot([i] * len(finals), finals, "k.", ms=5)
        pub = published(comp.pair, m)
        if pub is not None:
            ax.plot([i - 0.4, i + 0.4], [pub, pub], color="tab:red", lw=2)
    ax.set_xticks(range(len(methods)), [label(m) for m in methods], rotation=20)
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title(f"{comp.pair}, {comp.scale} ({comp.epochs} epochs); red: published (240 ep)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
