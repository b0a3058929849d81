"""``normkd reproduce``: the paper's CIFAR-100 comparison for one teacher/student pair, resumable.

Trains the pair's teacher (or takes ``--teacher-weights``), then every method's shipped recipe
(``configs/cifar100/<teacher>__<student>/<method>.yaml``) for each seed, and writes a table of
best and final top-1 next to the published figures (``normkd.published``). Each run keeps its
own run directory: running the command again skips finished runs and resumes unfinished ones.

Scales: ``paper`` runs the recipes as they are (240 epochs: a GPU job); ``short`` the same
recipes on a shorter schedule (milestones, warm-ups and DKD's ramp scaled with it, the NORM ramp
stretches itself), stated in the table; ``smoke`` 1 epoch on 2% of the data (a check, not a
result).

With ``records=DIR`` each finished run also leaves a small record there (``normkd.records``), the
teacher is kept beside them, and runs already recorded are skipped: the table is rebuilt from the
records alone (``build_table``), so it can be grown over several sessions and machines.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from normkd.config import Recipe, load_recipe, recipe_to_dict
from normkd.data import check_cifar100_root
from normkd.engine import RunResult, run_recipe
from normkd.engine.checkpoint import atomic_write, atomic_write_text
from normkd.engine.rundir import same_recipe
from normkd.engine.runtime import resolve_amp, resolve_device
from normkd.errors import UserError
from normkd.extras import available, missing_line
from normkd.log import logger
from normkd.losses import method_label
from normkd.published import CIFAR100, SOURCES, published
from normkd.records import (
    TEACHER,
    Record,
    git_commit,
    keep_teacher,
    kept_teacher,
    machine_line,
    now,
    read_record,
    read_records,
    record_path,
    sha256,
    write_record,
)
from normkd.stats import mean_std, paired, verdict

CONFIGS = Path(__file__).resolve().parent / "configs" / "cifar100"
SCALES = ("paper", "short", "smoke")
DEFAULT_METHODS = (
    "vanilla", "kd", "kd_matched", "norm", "norm_kd", "norm_authors", "norm_kd_authors",
)  # fmt: skip
# The comparisons a table leads with: each changes one thing (NORM added, all weights equal).
HEADLINES = (("norm_kd", "kd_matched"), ("norm", "vanilla"))
BASELINES = ("vanilla", "kd_matched", "kd")  # every row's paired difference is shown against these
# Recipe-name suffixes: a variant of the method the rest of the name registers.
VARIANTS = {"_authors": "authors' code", "_matched": "matched"}
# The CIFAR pair folders' kd.yaml is the CRD benchmark's KD (0.1 CE + 0.9 KD): not weight-matched.
SETTINGS = {"kd": "CRD setting"}
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
    """What ``reproduce`` ran and measured (or what its records hold), one record per run."""

    pair: str
    scale: str
    epochs: int
    teacher: Record | None
    runs: dict[str, list[Record]] = field(default_factory=dict)
    seconds: float = 0.0
    teacher_sha256: str | None = None


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
        f"engine.out_dir={out_dir / pair / schedule_folder(scale, epochs)}",
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


def schedule_folder(scale: str, epochs: int | None) -> str:
    """The run folders' parent under ``OUT/PAIR``: the scale, and the epochs where they are not
    the scale's own, so runs of two schedules never share (or read back) one folder."""
    if scale != "short" or epochs in (None, SHORT_EPOCHS):
        return scale
    return f"{scale}_e{epochs}"


def precision(recipe: Recipe) -> str:
    """The precision a recipe trains in on this machine: bf16, fp16 or fp32."""
    amp = resolve_amp(recipe.engine.amp, resolve_device(recipe.engine.device))
    return "fp32" if amp == "off" else amp


def _provenance(p: Planned) -> Path:
    """Beside the run folder (not in it: the run owns its folder): where and at which commit the
    run started, so a record names them even when the run finished in another process."""
    return p.run_dir.parent / f"{p.run_dir.name}.provenance.json"


def execute(p: Planned, index: int, total: int) -> RunResult:
    """Run (or resume, or read back) one planned run, saying which of how many it is."""
    d = p.run_dir
    what = f"[reproduce] run {index}/{total}: {p.method} seed {p.seed}"
    if (d / "summary.json").is_file():
        check_same_recipe(d, p.recipe)
        logger.info(f"{what}: finished earlier, read from {d}")
        return read_result(d)
    if p.recipe.data.kind == "cifar100" and not p.recipe.data.fake:
        check_cifar100_root(p.recipe.data.root)  # before a line says a run starts, or a file
    resume = (d / "last.pt").is_file()
    if resume:
        from normkd.engine.checkpoint import load_checkpoint

        done = load_checkpoint(d / "last.pt")["epoch"]
        logger.info(f"{what}: resuming at epoch {done + 1}/{p.recipe.optim.epochs}")
    else:
        logger.info(f"{what}: {p.recipe.optim.epochs} epochs ...")
    if not _provenance(p).is_file():
        start = {"commit": git_commit(), "machine": machine_line(), "started": now()}
        atomic_write_text(_provenance(p), json.dumps(start) + "\n")
    # A folder without last.pt holds nothing to keep (a run stopped in its first epoch).
    result = run_recipe(p.recipe, resume=resume, overwrite=not resume)
    logger.info(
        f"{what}: best {result.best_top1:.2f}%, final {result.final_top1:.2f}% "
        f"({result.seconds / 60:.1f} min)"
    )
    return result


def check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Refuse to read back a finished run of another recipe (another schedule, say) as this one:
    its config.yaml must be the planned recipe, as a resume's checkpoint must."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    if not same_recipe(saved, recipe_to_dict(recipe)):
        raise UserError(
            f"{run_dir} holds a finished run of another recipe (see its config.yaml), not this "
            "plan's: use another --out-dir, or remove that folder to train this one"
        )


def read_result(run_dir: Path) -> RunResult:
    """The RunResult a finished run wrote to summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    names = {f.name for f in fields(RunResult)} - {"history", "model", "model_meta"}
    return RunResult(**{k: v for k, v in summary.items() if k in names})


@dataclass
class Table:
    """Where a comparison's runs are recorded, and the setting every record must share."""

    pair: str
    scale: str
    records: Path | None = None
    teacher_sha256: str | None = None


def record_of(p: Planned, result: RunResult, table: Table) -> Record:
    """The committed record of one finished run: its summary, recipe, commit, machine, precision."""
    start = {}
    if _provenance(p).is_file():
        start = json.loads(_provenance(p).read_text())
    machine = start.get("machine") or machine_line()
    summary = {f.name: getattr(result, f.name) for f in fields(RunResult)}
    for name in ("history", "model", "model_meta", "run_dir"):
        summary.pop(name)
    return Record(
        pair=table.pair,
        method=p.method,
        seed=p.seed,
        scale=table.scale,
        epochs=p.recipe.optim.epochs,
        precision=precision(p.recipe),
        best_top1=result.best_top1,
        best_epoch=result.best_epoch,
        final_top1=result.final_top1,
        seconds=result.seconds,
        commit=start.get("commit") or git_commit(),
        machine=machine,
        finished=now(),
        teacher_sha256=None if p.method == TEACHER else table.teacher_sha256,
        summary=summary,
        recipe=json.loads(p.recipe.model_dump_json()),
    )


def recorded(p: Planned, table: Table) -> Record | None:
    """The record of ``p`` already in the table's folder, checked to be the same setting."""
    path = None if table.records is None else record_path(table.records, p.method, p.seed)
    if path is None or not path.is_file():
        return None
    rec = read_record(path)
    want = (table.scale, p.recipe.optim.epochs, precision(p.recipe), table.teacher_sha256)
    have = (rec.scale, rec.epochs, rec.precision, rec.teacher_sha256)
    if p.method != TEACHER and want != have:
        raise UserError(
            f"{path} records (scale, epochs, precision, teacher sha256) = {have}, this run "
            f"would be {want}: one table holds one setting; use another --records folder"
        )
    return rec


def run_or_read(p: Planned, index: int, total: int, table: Table) -> Record:
    """One planned run's record: read from the table's records, or run (resuming) and recorded."""
    rec = recorded(p, table)
    if rec is not None:
        logger.info(f"[reproduce] run {index}/{total}: {p.method} seed {p.seed}: recorded")
        return rec
    rec = record_of(p, execute(p, index, total), table)
    if table.records is not None and p.method != TEACHER:
        write_record(table.records, rec)
    return rec


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
    records: Path | None = None,
) -> Comparison:
    """Run the comparison (resuming what exists), print the table, write results.md/.png."""
    if seeds < 1:
        raise UserError("--seeds must be >= 1")
    t0 = time.perf_counter()
    methods = list(methods or DEFAULT_METHODS)
    if records is not None and teacher_weights is None:
        teacher_weights = kept_teacher(records)
    if teacher_weights is not None and not teacher_weights.is_file():
        raise UserError(f"--teacher-weights: no file at {teacher_weights}")
    teacher, runs = plan(
        pair, methods, seeds, scale, data_root, out_dir, epochs, teacher_weights, extra
    )
    total = len(runs) + (teacher is not None)
    n_epochs = runs[0].recipe.optim.epochs if runs else 0
    comp = Comparison(pair, scale, n_epochs, None, {m: [] for m in methods})
    table = Table(pair, scale, records)
    if teacher is not None:
        comp.teacher = run_or_read(teacher, 1, total, table)
        weights = teacher.run_dir / "model.safetensors"
        teacher_weights = keep_teacher(records, weights, comp.teacher) if records else weights
    table.teacher_sha256 = comp.teacher_sha256 = sha256(teacher_weights)
    for i, p in enumerate(runs, start=total - len(runs) + 1):
        comp.runs[p.method].append(run_or_read(p, i, total, table))
    comp.seconds = time.perf_counter() - t0
    if records is not None:
        comp = build_table(records, methods)  # the table of everything recorded there
        comp.seconds = time.perf_counter() - t0
    write_table(comp, out_dir / pair / schedule_folder(scale, epochs) / "results.md", report)
    return comp


def write_table(comp: Comparison, path: Path, report: Path | None = None) -> str:
    """Print the table and write it (Markdown + PNG) to ``path`` and, if given, ``report``."""
    text = markdown(comp)
    for target in (path, report):
        if target is not None:
            atomic_write_text(target, text)
            plot(comp, target.with_suffix(".png"))
    print("\n" + text)
    return text


def build_table(records: Path, methods: list[str] | None = None) -> Comparison:
    """The comparison a records folder holds (no data, no training): checked to be one setting.

    ``methods`` orders (and selects) the rows; by default every recorded method, in
    ``DEFAULT_METHODS`` order and then by name."""
    recs = read_records(records)
    teacher = next((r for r in recs if r.method == TEACHER), None)
    students = [r for r in recs if r.method != TEACHER]
    if not students:
        raise UserError(f"{records} holds no student records yet")
    settings = {(r.pair, r.scale, r.epochs, r.precision, r.teacher_sha256) for r in students}
    if len(settings) > 1:
        raise UserError(
            f"{records} mixes settings (pair, scale, epochs, precision, teacher sha256): "
            f"{sorted(settings, key=str)}; one table holds one setting"
        )
    pair, scale, epochs, _, teacher_sha = settings.pop()
    if teacher is None:  # a teacher kept by another table of the same folder of tables
        kin = (read_record(p) for p in sorted(records.parent.glob("*/teacher.json")))
        teacher = next((r for r in kin if r.weights_sha256 == teacher_sha), None)
    order = {m: i for i, m in enumerate(methods or DEFAULT_METHODS)}
    found = sorted({r.method for r in students}, key=lambda m: (order.get(m, len(order)), m))
    comp = Comparison(pair, scale, epochs, teacher, {}, teacher_sha256=teacher_sha)
    for m in found if methods is None else [m for m in methods if m in found]:
        comp.runs[m] = sorted((r for r in students if r.method == m), key=lambda r: r.seed)
    return comp


def label(method: str) -> str:
    """``norm_kd_authors`` -> ``NORM+KD (authors' code)``; ``kd`` -> ``KD (CRD setting)``."""
    for suffix, variant in VARIANTS.items():
        if method.endswith(suffix):
            return f"{method_label(method.removesuffix(suffix))} ({variant})"
    setting = SETTINGS.get(method)
    return method_label(method) + (f" ({setting})" if setting else "")


def _by_seed(recs: list[Record], best: bool = False) -> dict[int, float]:
    return {r.seed: r.best_top1 if best else r.final_top1 for r in recs}


def markdown(comp: Comparison) -> str:
    """The table: final top-1 (mean ± std over seeds) as the headline, best beside it, each
    row's paired difference to every baseline with its 95% interval, then the headlines."""
    bases = [b for b in BASELINES if comp.runs.get(b)]
    head = ["method", "seeds", "final top-1 %", "best top-1 %"]
    head += [f"Δ final vs {label(b)} [95% CI]" for b in bases]
    head += ["published (240 ep, best)", "min / run"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    if comp.teacher is not None:
        t = comp.teacher
        cells = ["teacher", "1", f"{t.final_top1:.2f}", f"{t.best_top1:.2f}", *[""] * len(bases)]
        rows.append("| " + " | ".join([*cells, "", f"{t.seconds / 60:.1f}"]) + " |")
    for method, recs in comp.runs.items():
        if not recs:
            continue
        cells = [label(method), str(len(recs))]
        cells += [mean_std(list(_by_seed(recs).values()))]
        cells += [mean_std(list(_by_seed(recs, best=True).values()))]
        for b in bases:
            d = None if b == method else paired(_by_seed(recs), _by_seed(comp.runs[b]))
            cells.append("—" if d is None else d.cell() + (" ~" if d.noise else ""))
        pub = published(comp.pair, method)
        cells.append(f"{pub:.2f}" if pub is not None else "—")
        cells.append(f"{statistics.mean(r.seconds for r in recs) / 60:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    return _header(comp) + table + "\n\n" + _headlines(comp) + _footer(comp)


def _headlines(comp: Comparison) -> str:
    """One line per headline comparison present (each changes one thing)."""
    lines = []
    for a, b in HEADLINES:
        if comp.runs.get(a) and comp.runs.get(b):
            d = paired(_by_seed(comp.runs[a]), _by_seed(comp.runs[b]))
            if d is not None:
                lines.append(f"- {verdict(label(a), label(b), d)}")
    if not lines:
        return ""
    return (
        "Headline comparisons (final top-1, paired by seed; ~ in the table: not told from seed "
        "noise, the interval covers 0 or one seed gives none):\n" + "\n".join(lines) + "\n\n"
    )


def _header(comp: Comparison) -> str:
    teacher, student = comp.pair.split("__") if "__" in comp.pair else (comp.pair, "")
    recs = [r for rs in comp.runs.values() for r in rs]
    sched = ""
    if recs and recs[0].recipe:
        o, d = recs[0].recipe["optim"], recs[0].recipe["data"]
        sched = (
            f"{o['epochs']} epochs ({o['schedule']}, lr {o['lr']}, milestones {o['milestones']}, "
            f"warm-up {o['warmup_epochs']}, batch {d['batch_size']})"
        )
    kind = {"paper": "the recipes as shipped", "short": "a shortened schedule"}.get(comp.scale)
    note = kind or f"a smoke check: 1 epoch on {SMOKE_FRACTION:.0%} of the data, not a result"
    seeds = sorted({r.seed for r in recs})
    commits = sorted({r.commit[:12] for r in recs})
    machines = sorted({r.machine for r in recs})
    precisions = sorted({r.precision for r in recs})
    t = comp.teacher
    who = f"{t.final_top1:.2f}% final top-1" if t is not None else "given"
    sha = (comp.teacher_sha256 or "?")[:16]
    return (
        f"# CIFAR-100 {teacher} -> {student}: {comp.scale} scale\n\n"
        f"{note}: {sched}. Seeds {seeds} (a seed fixes the student's initial weights and the "
        f"data order, so rows pair by seed); precision {', '.join(precisions)} (evaluation "
        f"fp32); teacher {teacher} ({who}, weights sha256 {sha}...). Headline: final-epoch "
        f"top-1, mean ± std over seeds; best-epoch beside it. Runs: {len(recs)}; commits "
        f"{', '.join(commits)}; machine: {'; '.join(machines)}. Table written "
        f"{now()}{'' if not comp.seconds else f' ({comp.seconds / 60:.1f} min this command)'}."
        "\n\n"
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
    pubs = {m: published(comp.pair, m) for m in methods}
    for i, m in enumerate(methods):
        finals = [r.final_top1 for r in comp.runs[m]]
        ax.bar(i, statistics.mean(finals), color="tab:blue", alpha=0.7)
        ax.plot([i] * len(finals), finals, "k.", ms=5)
        pub = pubs[m]
        if pub is not None:
            ax.plot([i - 0.4, i + 0.4], [pub, pub], color="tab:red", lw=2)
    ax.set_xticks(range(len(methods)), [label(m) for m in methods], rotation=20)
    ax.set_ylabel("final test top-1 (%)")
    legend = "; red: published (240 ep)" if any(p is not None for p in pubs.values()) else ""
    ax.set_title(f"{comp.pair}, {comp.scale} ({comp.epochs} epochs; dots: seeds){legend}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
