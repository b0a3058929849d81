"""The seeded real-CIFAR-100 tables: run them (resumable, over sessions) or rebuild them from records.

    python benchmarks/tables.py run cifar100_resnet20__resnet8_e15 --data-root ../shared/data
    python benchmarks/tables.py build          # every table and the schedule trend, records only
    python benchmarks/tables.py wkd-cost --data-root ../shared/data   # WKD-L's class costs

Run workers with ``OMP_WAIT_POLICY=PASSIVE`` (two busy-waiting torch threads stall each other on
a 2-core machine) and ``OMP_NUM_THREADS=1`` when two share the cores (``--methods`` splits a
table between them; each records its own runs).

Each table is a folder of committed run records under ``results/runs/<table>/`` (one JSON per
finished run, the teacher's weights and sha256 beside them): ``run`` trains only what is not
recorded yet and records each run as it finishes; ``build`` needs neither data nor training. All
tables share one teacher (resnet20, the first table's), one schedule length per table, the
engine's defaults and, within a table, one precision (``engine.amp: auto`` for every row, the
authors'-code row included, so the rows differ in their method only).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from normkd.engine.checkpoint import atomic_write, atomic_write_text
from normkd.errors import UserError
from normkd.reproduce import build_table, label, reproduce, write_table
from normkd.stats import mean_std

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "runs"
TEACHER_TABLE = "cifar100_resnet20__resnet8_e15"  # trains the teacher every table shares


@dataclass(frozen=True)
class Spec:
    """One table: the pair, its methods and seeds, the schedule length and the report it writes."""

    pair: str
    epochs: int
    methods: tuple[str, ...]
    seeds: int
    report: str | None  # results/<report>.md (+ .png); None: only part of the trend
    sets: tuple[str, ...] = field(default=("engine.amp=auto",))


R8, VIT = "resnet20__resnet8", "resnet20__vit_mini_p4"
TABLES = {
    TEACHER_TABLE: Spec(
        R8,
        15,
        ("vanilla", "kd", "kd_matched", "norm", "norm_kd", "norm_kd_authors", "dist", "wkd_l"),
        3,
        "cifar100",
    ),
    "cifar100_resnet20__vit_mini_p4_e15": Spec(
        VIT, 15, ("vanilla", "kd", "kd_matched", "norm", "norm_kd"), 3, "cifar100_mixed"
    ),
    "cifar100_resnet20__resnet8_e30": Spec(R8, 30, ("kd_matched", "norm_kd"), 1, None),
    "cifar100_resnet20__resnet8_e60": Spec(R8, 60, ("kd_matched", "norm_kd"), 1, None),
}
# WKD-L as published: its class costs are the shared teacher's 1 - linear CKA (made once, from the
# teacher and the un-augmented training set, and kept beside the teacher with its provenance).
WKD_COST = RUNS / TEACHER_TABLE / "wkd_cost.safetensors"
METHOD_SETS = {"wkd_l": (f"loss.1.cost_matrix={WKD_COST}",)}
TREND = (TEACHER_TABLE, "cifar100_resnet20__resnet8_e30", "cifar100_resnet20__resnet8_e60")
TREND_METHODS = ("kd_matched", "norm_kd")


def run(
    name: str, data_root: Path, out_dir: Path, methods: Sequence[str] | None, seeds: int | None
) -> None:
    """Train what table ``name`` has not recorded yet (``methods``/``seeds``: a share of it)."""
    spec = TABLES[name]
    teacher = None
    if name != TEACHER_TABLE:
        teacher = RUNS / TEACHER_TABLE / "teacher.safetensors"
        if not teacher.is_file():
            raise UserError(f"table {name} uses {TEACHER_TABLE}'s teacher: run that table first")
    bad = sorted(set(methods or ()) - set(spec.methods))
    if bad:
        raise UserError(f"table {name} has no method {bad}; it has {', '.join(spec.methods)}")
    chosen = list(methods or spec.methods)
    if "wkd_l" in chosen and not WKD_COST.is_file():
        wkd_cost(data_root)
    groups: dict[tuple[str, ...], list[str]] = {}  # methods that share their extra settings
    for m in chosen:
        groups.setdefault(METHOD_SETS.get(m, ()), []).append(m)
    for sets, group in groups.items():
        reproduce(
            spec.pair,
            data_root,
            methods=group,
            seeds=seeds or spec.seeds,
            scale="short",
            out_dir=out_dir,
            epochs=spec.epochs,
            teacher_weights=teacher,
            extra=[*spec.sets, *sets],
            records=RUNS / name,
        )
    build([name])


def wkd_cost(data_root: Path, out: Path = WKD_COST, force: bool = False) -> None:
    """WKD-L's published class costs for the shared teacher, made by ``normkd wkd-cost`` on the
    table pair's wkd_l recipe: 1 - linear CKA of its last-stage rows per class over the
    un-augmented training set in dataset order (the authors' CIFAR recipe), on the CPU in
    batches of 500; its provenance in the file's metadata. The committed file was made before
    this, from ``(x / 255 - mean) / std`` (torchvision's arithmetic) where the loader fuses one
    multiply-add: a remake differs from it in 2,520 of its 10,000 costs, by one float32 ulp (two
    in 104), at most 1.2e-7, bit for bit the same before and after the CKA lost its pair loop."""
    from normkd.config import load_recipe
    from normkd.reproduce import CONFIGS
    from normkd.wkd_cost import make_cost_file

    weights = RUNS / TEACHER_TABLE / "teacher.safetensors"
    if not weights.is_file():
        raise UserError(f"WKD-L's costs come from {TEACHER_TABLE}'s teacher: run that table first")
    sets = [f"data.root={data_root}", f"teacher.weights={weights}"]
    sets += ["data.eval_batch_size=500", "engine.device=cpu"]
    recipe = load_recipe(CONFIGS / TABLES[TEACHER_TABLE].pair / "wkd_l.yaml", sets)
    made = make_cost_file(recipe, out, "last_stage", force=force)
    print(f"[tables] wrote {made.path} ({made.seconds:.1f} s)")


def build(names: Sequence[str] | None = None) -> None:
    """Rebuild each table (and the trend) from its records alone."""
    for name in names or TABLES:
        spec, folder = TABLES[name], RUNS / name
        if spec.report is None or not any(folder.glob("*_seed*.json")):
            continue
        comp = build_table(folder, list(spec.methods))
        path = RESULTS / f"{spec.report}.md"
        write_table(comp, path)
        notes = _TIME_NOTE
        if comp.runs.get("dist") or comp.runs.get("wkd_l"):
            notes += _BASELINE_NOTE
        notes += _wkd_note() if comp.runs.get("wkd_l") else ""
        notes += _AUTHORS_NOTE.format(pair=spec.pair) if comp.runs.get("norm_kd_authors") else ""
        if left := _left(_missing(name)):  # a partial table says what it still lacks
            notes += f"\nNot recorded yet (`tables.py run {name}` trains them): {left}.\n"
        atomic_write_text(path, path.read_text() + notes)
    trend()


# The newer baselines are each at their authors' weights: their columns compare methods, not one
# changed setting (the matched pairs are KD (matched) / NORM+KD and vanilla / NORM).
_BASELINE_NOTE = (
    f"\nDIST and WKD-L run at their authors' CIFAR-100 settings (configs/cifar100/{R8}/dist.yaml "
    "and wkd_l.yaml, with the teacher's 1 - CKA costs), so their Δ columns compare each method as published with KD (matched) and vanilla, not one "
    "changed setting; the matched pairs are NORM+KD / KD (matched) and NORM / vanilla.\n"
)


# The authors'-code row keeps their loss settings but not their fp32: a table has one precision.
_AUTHORS_NOTE = (
    "\nNORM+KD (authors' code) is configs/cifar100/{pair}/norm_kd_authors.yaml: the authors' CE "
    "weight 0.25 and their logit standardisation (x 2.5), run at this table's precision (the "
    "recipe alone runs fp32), so it differs from NORM+KD in those two settings, not in NORM.\n"
)


# Why "min / run" is no speed figure, and which records undercount it (resumed before de8d3f7,
# when a resume started the run's clock again; the workers' logs name them).
_TIME_NOTE = (
    "\nmin / run: the wall-clock minutes each record holds, on 2 cores shared by two 1-thread "
    "table workers (and at times by tests), so they vary by 2-3x with the load; what a step costs "
    "is measured in [methods.md](methods.md). A record made at a commit before de8d3f7 counts a "
    "resumed run's time from its last resume only, so where a worker restart resumed a run its "
    "minutes are a lower bound.\n"
)


def _wkd_note() -> str:
    from safetensors import safe_open

    from normkd.records import sha256

    with safe_open(str(WKD_COST), "pt") as f:
        meta = f.metadata() or {}
    return (
        f"\nWKD-L's class costs (as published: 1 - linear CKA of the teacher's last-stage rows, "
        f"{meta.get('rows_per_class', '?')} per class, un-augmented training set): "
        f"`runs/{TEACHER_TABLE}/{WKD_COST.name}`, sha256 {sha256(WKD_COST)[:16]}..., made from "
        f"teacher {meta.get('teacher_sha256', '?')[:16]}... at commit "
        f"{meta.get('commit', '?')[:12]}.\n"
    )


def trend() -> None:
    """Does the NORM+KD - KD (matched) gap move with the schedule? 15 / 30 / 60 epochs."""
    points: dict[str, dict[int, dict[int, float]]] = {m: {} for m in TREND_METHODS}
    for name in TREND:
        if not any((RUNS / name).glob("*_seed*.json")):
            continue
        comp = build_table(RUNS / name, list(TREND_METHODS))
        for m in TREND_METHODS:
            if comp.runs.get(m):
                points[m][comp.epochs] = {r.seed: r.final_top1 for r in comp.runs[m]}
    if not any(points.values()):
        return
    rows = ["| method | epochs | seeds | final top-1 % |", "| --- | --- | --- | --- |"]
    for m, pts in points.items():
        rows += [
            f"| {label(m)} | {e} | {len(v)} | {mean_std(list(v.values()))} |"
            for e, v in sorted(pts.items())
        ]
    paired = _paired_gaps(points)
    seeds = "; ".join(f"{e} epochs: {len(g)}" for e, g in paired.items()) or "none yet"
    text = (
        "# CIFAR-100 resnet20 -> resnet8: does the NORM+KD - KD (matched) gap move with the "
        "schedule?\n\nThe same teacher, recipes and engine defaults as cifar100.md, at 15, 30 and "
        "60 epochs (milestones scaled with the schedule). Seeds with both methods recorded, per "
        f"schedule: {seeds}. A point of one seed carries that seed's noise.\n\n"
        + "\n".join(rows)
        + "\n\nNORM+KD minus KD (matched), mean final top-1: "
        + _gaps(points, None)
        + ".\n\nThe same on seed 0 alone, like for like with the one-seed schedules: "
        + _gaps(points, 0)
        + ".\n"
        + _noise(paired)
    )
    atomic_write_text(RESULTS / "cifar100_trend.md", text)
    _plot_trend(points, RESULTS / "cifar100_trend.png")
    print("\n" + text)


def _gaps(points: dict[str, dict[int, dict[int, float]]], seed: int | None) -> str:
    """The gap per schedule where both methods have it (the workers finish in either order):
    of the means over seeds, or of one ``seed``'s runs."""
    base, other = (points[m] for m in TREND_METHODS)
    gaps = []
    for e in sorted(base.keys() & other.keys()):
        if seed is None:
            gap = statistics.mean(other[e].values()) - statistics.mean(base[e].values())
        elif seed in base[e] and seed in other[e]:
            gap = other[e][seed] - base[e][seed]
        else:
            continue
        gaps.append(f"{e} epochs: {gap:+.2f}")
    return "; ".join(gaps) or "not yet measured"


def _paired_gaps(points: dict[str, dict[int, dict[int, float]]]) -> dict[int, list[float]]:
    """Per schedule, NORM+KD - KD (matched) of each seed both methods have, in seed order."""
    base, other = (points[m] for m in TREND_METHODS)
    out = {}
    for e in sorted(base.keys() & other.keys()):
        seeds = sorted(base[e].keys() & other[e].keys())
        if seeds:
            out[e] = [other[e][s] - base[e][s] for s in seeds]
    return out


def _noise(paired: dict[int, list[float]]) -> str:
    """How far one seed's gap moves by chance, from the schedule with the most paired seeds:
    the yardstick for a one-seed point (two one-seed gaps differ with sd sqrt(2) x that)."""
    e, gaps = max(paired.items(), key=lambda kv: (len(kv[1]), -kv[0]), default=(0, []))
    if len(gaps) < 2:
        return ""
    sd = statistics.stdev(gaps)
    move = 1.96 * math.sqrt(2) * sd
    per_seed = ", ".join(f"{g:+.2f}" for g in gaps)
    return (
        f"\nSeed noise: at {e} epochs the paired gap varies with sd {sd:.2f} points over "
        f"{len(gaps)} seeds ({per_seed}). If the other schedules are as noisy, two one-seed gaps "
        f"differ by chance with sd {math.sqrt(2) * sd:.2f}: a move of less than about "
        f"{move:.2f} points (1.96 x that) between schedules cannot be told from seed noise (a "
        f"rough yardstick: the sd itself comes from {len(gaps)} seeds).\n"
    )


def _plot_trend(points: dict[str, dict[int, dict[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (m, pts) in enumerate(points.items()):
        if pts:
            e, color = sorted(pts), f"C{i}"
            means = [statistics.mean(pts[k].values()) for k in e]
            ax.plot(e, means, "o-", color=color, label=f"{label(m)} (mean; dots: seeds)")
            for k in e:
                ax.plot([k] * len(pts[k]), list(pts[k].values()), ".", color=color, alpha=0.5)
    schedules = sorted(TABLES[name].epochs for name in TREND)  # the planned ones, run or not
    ax.set_xscale("log", base=2)  # 15, 30, 60: each schedule twice the last, evenly spaced
    ax.set_xlim(schedules[0] / 1.3, schedules[-1] * 1.3)
    ax.set_xticks(schedules, [str(e) for e in schedules])
    ax.minorticks_off()
    ax.set_xlabel("epochs")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title("resnet20 -> resnet8, real CIFAR-100")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def _missing(name: str) -> dict[str, list[int]]:
    """The seeds of each method a `run` of this table would still train (none: recorded)."""
    from normkd.records import record_path

    spec, folder = TABLES[name], RUNS / name
    return {
        m: [s for s in range(spec.seeds) if not record_path(folder, m, s).is_file()]
        for m in spec.methods
    }


def _left(missing: dict[str, list[int]]) -> str:
    return "; ".join(f"{label(m)} seeds {v}" for m, v in missing.items() if v)


def status(names: Sequence[str] | None = None) -> str:
    """What each table has recorded and what a `run` would still train, from the records alone:
    a line per table, the missing seeds named per method."""
    lines = []
    for name in names or TABLES:
        spec, missing = TABLES[name], _missing(name)
        todo = sum(len(v) for v in missing.values())
        runs = len(spec.methods) * spec.seeds
        left, extra = _left(missing), _extra_seeds(name)
        lines.append(
            f"{name}: {runs - todo}/{runs} runs recorded"
            + (f" (+{extra} of seeds past the table's {spec.seeds})" if extra else "")
            + (f"; to run: {left}" if left else "")
        )
    return "\n".join(lines)


def _extra_seeds(name: str) -> int:
    """Records of the table's methods at seeds past its own (a `run --seeds N` with more)."""
    spec = TABLES[name]
    return sum(
        1
        for m in spec.methods
        for f in (RUNS / name).glob(f"{m}_seed*.json")
        if f.stem.removeprefix(f"{m}_seed").isdigit()
        and int(f.stem.removeprefix(f"{m}_seed")) >= spec.seeds
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train what a table has not recorded yet")
    r.add_argument("table", choices=sorted(TABLES))
    r.add_argument("--data-root", type=Path, required=True, help="folder holding cifar-100-python/")
    r.add_argument("--out-dir", type=Path, default=Path("runs/tables"), help="run folders")
    r.add_argument("--methods", nargs="+", help="a share of the table's methods (for workers)")
    r.add_argument("--seeds", type=int, help="seeds (default: the table's)")
    w = sub.add_parser("wkd-cost", help="make WKD-L's class costs from the shared teacher")
    w.add_argument("--data-root", type=Path, required=True, help="folder holding cifar-100-python/")
    w.add_argument("--out", type=Path, default=WKD_COST, help=f"default: {WKD_COST.name}")
    w.add_argument("--force", action="store_true", help="replace an existing --out file")
    b = sub.add_parser("build", help="rebuild every table and the trend from the records")
    b.add_argument("tables", nargs="*", metavar="TABLE", help=f"default: all ({', '.join(TABLES)})")
    st = sub.add_parser("status", help="what each table has recorded and what is left to run")
    st.add_argument("tables", nargs="*", metavar="TABLE", help="default: all")
    args = p.parse_args(argv)
    try:
        unknown = sorted(set(getattr(args, "tables", None) or ()) - set(TABLES))
        if unknown:
            raise UserError(f"unknown table {unknown}; valid: {', '.join(TABLES)}")
        if args.command == "run":
            run(args.table, args.data_root, args.out_dir, args.methods, args.seeds)
        elif args.command == "wkd-cost":
            wkd_cost(args.data_root, args.out, args.force)
        elif args.command == "status":
            print(status(args.tables or None))
        else:
            build(args.tables or None)
    except UserError as err:
        print(f"normkd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the engine's note says what is saved
        print(f"normkd: {err or 'interrupted'}", file=sys.stderr)
        print("The same command continues: recorded runs are skipped.", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))  # 143 after SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
