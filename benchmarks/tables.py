"""The seeded real-CIFAR-100 tables: run them (resumable, over sessions) or rebuild them from records.

    python benchmarks/tables.py run cifar100_resnet20__resnet8_e15 --data-root ../shared/data
    python benchmarks/tables.py build          # every table and the schedule trend, records only

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
        R8, 15, ("vanilla", "kd", "kd_matched", "norm", "norm_kd", "norm_kd_authors"), 3, "cifar100"
    ),
    "cifar100_resnet20__vit_mini_p4_e15": Spec(
        VIT, 15, ("vanilla", "kd", "kd_matched", "norm", "norm_kd"), 3, "cifar100_mixed"
    ),
    "cifar100_resnet20__resnet8_e30": Spec(R8, 30, ("kd_matched", "norm_kd"), 1, None),
    "cifar100_resnet20__resnet8_e60": Spec(R8, 60, ("kd_matched", "norm_kd"), 1, None),
}
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
    reproduce(
        spec.pair,
        data_root,
        methods=list(methods or spec.methods),
        seeds=seeds or spec.seeds,
        scale="short",
        out_dir=out_dir,
        epochs=spec.epochs,
        teacher_weights=teacher,
        extra=list(spec.sets),
        records=RUNS / name,
    )
    build([name])


def build(names: Sequence[str] | None = None) -> None:
    """Rebuild each table (and the trend) from its records alone."""
    for name in names or TABLES:
        spec, folder = TABLES[name], RUNS / name
        if spec.report is None or not any(folder.glob("*_seed*.json")):
            continue
        comp = build_table(folder, list(spec.methods))
        write_table(comp, RESULTS / f"{spec.report}.md")
    trend()


def trend() -> None:
    """Does the NORM+KD - KD (matched) gap move with the schedule? 15 / 30 / 60 epochs."""
    points: dict[str, list[tuple[int, list[float]]]] = {m: [] for m in TREND_METHODS}
    for name in TREND:
        if not any((RUNS / name).glob("*_seed*.json")):
            continue
        comp = build_table(RUNS / name, list(TREND_METHODS))
        for m in TREND_METHODS:
            if comp.runs.get(m):
                points[m].append((comp.epochs, [r.final_top1 for r in comp.runs[m]]))
    if not any(points.values()):
        return
    rows = ["| method | epochs | seeds | final top-1 % |", "| --- | --- | --- | --- |"]
    for m, pts in points.items():
        rows += [f"| {label(m)} | {e} | {len(v)} | {mean_std(v)} |" for e, v in pts]
    gaps = []
    for (e, a), (_, b) in zip(points[TREND_METHODS[1]], points[TREND_METHODS[0]]):
        gaps.append(f"{e} epochs: {statistics.mean(a) - statistics.mean(b):+.2f}")
    text = (
        "# CIFAR-100 resnet20 -> resnet8: does the NORM+KD - KD (matched) gap move with the "
        "schedule?\n\nThe same teacher, recipes and engine defaults as cifar100.md, at 15, 30 and "
        "60 epochs (milestones scaled with the schedule). 30 and 60 epochs: seed 0 only, so a "
        "difference there carries one seed's noise (about the spread in cifar100.md).\n\n"
        + "\n".join(rows)
        + "\n\nNORM+KD minus KD (matched), mean final top-1: "
        + ("; ".join(gaps) or "not yet measured")
        + ".\n"
    )
    atomic_write_text(RESULTS / "cifar100_trend.md", text)
    _plot_trend(points, RESULTS / "cifar100_trend.png")
    print("\n" + text)


def _plot_trend(points: dict[str, list[tuple[int, list[float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, pts in points.items():
        if pts:
            ax.plot([e for e, _ in pts], [statistics.mean(v) for _, v in pts], "o-", label=label(m))
    ax.set_xlabel("epochs")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title("resnet20 -> resnet8, real CIFAR-100")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train what a table has not recorded yet")
    r.add_argument("table", choices=sorted(TABLES))
    r.add_argument("--data-root", type=Path, required=True, help="folder holding cifar-100-python/")
    r.add_argument("--out-dir", type=Path, default=Path("runs/tables"), help="run folders")
    r.add_argument("--methods", nargs="+", help="a share of the table's methods (for workers)")
    r.add_argument("--seeds", type=int, help="seeds (default: the table's)")
    b = sub.add_parser("build", help="rebuild every table and the trend from the records")
    b.add_argument("tables", nargs="*", metavar="TABLE", help=f"default: all ({', '.join(TABLES)})")
    args = p.parse_args(argv)
    try:
        unknown = sorted(set(getattr(args, "tables", None) or ()) - set(TABLES))
        if unknown:
            raise UserError(f"unknown table {unknown}; valid: {', '.join(TABLES)}")
        if args.command == "run":
            run(args.table, args.data_root, args.out_dir, args.methods, args.seeds)
        else:
            build(args.tables or None)
    except UserError as err:
        print(f"normkd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
