"""Run every benchmark (what ``make bench`` calls) and index the results in one README.

Each script runs in its own process, so one benchmark's allocator state, threads or DataLoader
workers never colour another's timings, and one failure does not hide the others' results.

    python benchmarks/run_all.py            # everything, under 20 minutes on 2 CPU cores
    python benchmarks/run_all.py --quick    # every script's smoke run
    python benchmarks/run_all.py --only deploy scale

The peer benchmark (torchdistill beside normkd) runs in .venv-bench, torchdistill's own
environment (``make bench-env``), and adds a few minutes; without it, it is skipped with one
line saying so.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common import BENCH_DIR, REPO, env_line, md_table, parse_args, resolve_device

from normkd.engine.checkpoint import atomic_write_text

BENCHES = {
    "accuracy": "top-1 of vanilla/KD/NORM/NORM+KD/DKD/NORM+DKD on digits, 5 seeds, paired Δ",
    "throughput": "images/s of a NORM+KD step: device-resident pipeline vs classic PIL loop",
    "deploy": "params, FLOPs, CPU latency of plain vs FT vs merged CIFAR students",
    "scale": "NORM+KD step time vs batch size and vs N",
    "peer": "images/s of a KD training loop: torchdistill's own vs normkd's, same pair and data",
    "precision": "top-1 under engine.amp auto vs off on digits, 4 methods x 5 seeds, paired",
    "methods": "per-step time, FLOPs and extra parameters of every recipe of a pair, vs KD",
}
# Benchmarks that need another interpreter than this one (a peer installed apart from normkd).
BENCH_VENV = REPO / ".venv-bench"
INTERPRETERS = {"peer": BENCH_VENV / "bin" / "python"}


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", choices=list(BENCHES), default=None, help="run only these")
    p.add_argument(
        "--index-only",
        action="store_true",
        help="run nothing: rewrite README.md from the reports already in --out",
    )


def report_date(md: Path) -> str:
    """When a report was measured: the date on its first environment line ('?' if none)."""
    found = re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", md.read_text())
    return found.group(0) if found else "?"


def verdict_lines(md: Path) -> list[str]:
    """The table under a report's '## Targets' or '## Summary' heading, for the index page."""
    if not md.is_file():
        return []
    lines = md.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() in ("## Targets", "## Summary"):
            table = []
            for follow in lines[i + 1 :]:
                if follow.startswith("|"):
                    table.append(follow)
                elif table:
                    break
            return table
    return []


def write_index(
    out: Path,
    runs: dict[str, tuple[int, float]],
    env: str,
    quick: bool,
    skipped: dict[str, str] | None = None,
) -> Path:
    """README.md linking every report and figure, with wall times and target verdicts.

    ``skipped``: benchmarks not run here and why (a peer's environment is missing); a report of
    theirs left by an earlier run stays linked, its verdicts are not copied as if measured now.
    A benchmark neither run nor skipped whose report is in ``out`` (``--only`` ran others) stays
    listed, with its verdicts, dated as an earlier run: a partial run never drops a report.
    """
    skipped = skipped or {}
    rows = []
    for name, why in skipped.items():
        md = out / f"{name}.md"
        kept = f" ({md.name} is from an earlier run)" if md.is_file() else ""
        link = f"[{name}]({md.name})" if md.is_file() else name
        rows.append([link, BENCHES[name], "—", "—", f"skipped: {why}{kept}"])
    earlier = [n for n in BENCHES if n not in runs and n not in skipped]
    earlier = [n for n in earlier if (out / f"{n}.md").is_file()]
    for name in earlier:
        png = out / f"{name}.png"
        figure = f"[{png.name}]({png.name})" if png.is_file() else "—"
        when = f"earlier run ({report_date(out / f'{name}.md')})"
        rows.append([f"[{name}]({name}.md)", BENCHES[name], figure, "—", when])
    for name, (rc, secs) in runs.items():
        md, png = out / f"{name}.md", out / f"{name}.png"
        rows.append(
            [
                f"[{name}]({md.name})" if md.is_file() else name,
                BENCHES[name],
                f"[{png.name}]({png.name})" if png.is_file() else "—",
                f"{secs:.0f} s",
                "ok" if rc == 0 else f"**failed (exit {rc})**",
            ]
        )
    parts = [
        "# normkd benchmarks" + (" (QUICK smoke run: not results)" if quick else ""),
        "",
        env,
        "",
        "Every figure below was measured by `make bench` (`benchmarks/run_all.py`); nothing is "
        "typed in by hand. Each report states the device, torch version, threads, date and load "
        "average it was measured under; timings taken with load above about half the core count "
        "are not quiet-machine figures.",
        "",
        md_table(["benchmark", "what", "figure", "wall time", "status"], rows),
    ]
    if runs:
        parts += ["", f"Total wall time of this run: {sum(s for _, s in runs.values()):.0f} s."]
    for name in [*earlier, *runs]:
        table = verdict_lines(out / f"{name}.md")
        when = f" (earlier run, {report_date(out / f'{name}.md')})" if name in earlier else ""
        if table:
            parts += ["", f"## {name}: targets{when}", "", *table]
        if (out / f"{name}.png").is_file():
            parts += ["", f"![{name}]({name}.png)"]
    parts += other_reports(out)
    path = out / "README.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


# Reports in the same folder that other commands write (longer runs than make bench).
OTHER_REPORTS = {
    "cifar100": "`python benchmarks/tables.py build`: real CIFAR-100 resnet20 -> resnet8, seeded, "
    "matched, from records",
    "cifar100_mixed": "`python benchmarks/tables.py build`: real CIFAR-100 resnet20 -> vit_mini_p4 "
    "(CNN -> ViT), seeded, matched, from records",
    "cifar100_trend": "`python benchmarks/tables.py build`: NORM+KD - KD (matched) at 15 / 30 / 60 "
    "epochs",
    "precision_cifar100": "`python benchmarks/bench_precision.py --cifar DIR`: amp auto vs off "
    "on real CIFAR-100, NORM+KD resnet20 -> resnet8",
    "parity": "`python tools/parity.py --ref DIR`: new terms against their authors' code",
    "soak": "`python tools/soak.py`: signals at random points of runs, racing writers",
    "mutants": "`make mutants`: named semantic mutants against the test suite",
}


def other_reports(out: Path) -> list[str]:
    """Index lines for the reports of OTHER_REPORTS present in ``out``."""
    rows = [
        [f"[{n}]({n}.md)", what] for n, what in OTHER_REPORTS.items() if (out / f"{n}.md").is_file()
    ]
    if not rows:
        return []
    return ["", "## Reports of other commands (not run by make bench)", "",
            md_table(["report", "made by"], rows)]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks one after another, then write the index."""
    args = parse_args(__doc__.split("\n\n")[0], argv, _extra)
    device = resolve_device(args.device)
    env = env_line(device)
    if args.index_only:
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        env = f"Index rewritten {now} from the reports in this folder; no benchmark ran for it."
    names = [] if args.index_only else args.only or list(BENCHES)
    passthrough = ["--out", str(args.out), "--device", args.device]
    if args.quick:
        passthrough.append("--quick")
    runs: dict[str, tuple[int, float]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        print(f"\n[run_all] ===== {name} =====", flush=True)
        python = INTERPRETERS.get(name, Path(sys.executable))
        if not python.exists():
            skipped[name] = f"{python} is missing (`make bench-env` creates it)"
            print(f"[run_all] {name}: skipped: {skipped[name]}", flush=True)
            continue
        t0 = time.perf_counter()
        rc = subprocess.call([str(python), str(BENCH_DIR / f"bench_{name}.py"), *passthrough])
        runs[name] = (rc, time.perf_counter() - t0)
        print(f"[run_all] {name}: exit {rc}, {runs[name][1]:.0f} s", flush=True)
    index = write_index(args.out, runs, env, args.quick, skipped)
    print(f"\n[run_all] index: {index}")
    for name, why in skipped.items():
        print(f"[run_all] {name:<11} skipped: {why}")
    for name, (rc, secs) in runs.items():
        print(f"[run_all] {name:<11} {'ok' if rc == 0 else f'FAILED ({rc})':<12} {secs:6.0f} s")
    return 0 if all(rc == 0 for rc, _ in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
