"""``make mutants``: does the test suite notice when the wiring breaks?

Each mutant is a named, semantic bug (one exact text replacement in one source file: a dropped
weight, an ignored setting, a skipped call). For each, a copy of ``src/`` is mutated and the tests
run against it (``PYTHONPATH`` puts the copy first; subprocesses inherit it). A mutant is *killed*
when some test fails, *survived* when all pass. The report lists every mutant, what killed it and,
for survivors, why the mutant is equivalent (the suite cannot and need not tell it apart).

A mutant whose ``old`` text is no longer in its file is an error, not a survivor: the list is kept
true to the code (update the snippet when the code moves).

    python tools/mutants.py                 # all mutants, report to benchmarks/results/mutants.md
    python tools/mutants.py --only NAME...  # some mutants, no report rewrite unless --report
    python tools/mutants.py --list          # names and files
    python tools/mutants.py --quick         # only each mutant's own test files (no full run)

Killed mutants stop at the first failing test (``-x``) and run their own test files first, so a
full run costs roughly (survivors x one suite) + (killed x seconds). Results are cached in
``.mutants-cache.jsonl`` by mutant and source text, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mutant_list import MUTANTS, Mutant

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
CACHE = REPO / ".mutants-cache.jsonl"
REPORT = REPO / "benchmarks" / "results" / "mutants.md"


@dataclass
class Outcome:
    """One mutant's result."""

    name: str
    status: str  # killed | survived | timeout | error
    by: str  # the first failing test, or why it errored
    seconds: float


# What a run copies: the tests run in the copy, so editing the checkout meanwhile is harmless.
SNAPSHOT = ("src", "tests", "benchmarks", "examples", "tools", "configs", "pyproject.toml")


def snapshot(dest: Path) -> Path:
    """Copy what the suite needs into ``dest``; returns the copy's root."""
    for name in SNAPSHOT:
        src = REPO / name
        if src.is_symlink():
            (dest / name).symlink_to(os.readlink(src))
        elif src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _key(m: Mutant, root: Path = REPO) -> str:
    text = (root / "src" / m.file).read_text()
    return hashlib.sha1(f"{m.name}\0{m.old}\0{m.new}\0{text}".encode()).hexdigest()


def _apply(m: Mutant, copy_src: Path, original_src: Path = SRC) -> str | None:
    """Write the mutated file into the copy; returns an error text when the mutant is stale."""
    original = (original_src / m.file).read_text()
    count = original.count(m.old)
    if count != 1:
        return f"its text occurs {count} times in {m.file} (expected exactly once)"
    mutated = original.replace(m.old, m.new)
    try:
        compile(mutated, m.file, "exec")
    except SyntaxError as err:
        return f"mutated {m.file} does not compile: {err}"
    (copy_src / m.file).write_text(mutated)
    return None


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        match = re.match(r"(FAILED|ERROR) (\S+)", line)
        if match:
            return match.group(2)
    return "(a test failed; see the pytest output)"


def run_one(m: Mutant, root: Path, pristine: Path, quick: bool, timeout: float) -> Outcome:
    """Mutate the copy at ``root``, run its tests (the mutant's own files first), restore it."""
    t0 = time.perf_counter()
    copy_src = root / "src"
    err = _apply(m, copy_src, pristine)
    if err is not None:
        return Outcome(m.name, "error", err, 0.0)
    env = dict(os.environ, PYTHONPATH=str(copy_src), OMP_WAIT_POLICY="PASSIVE")
    # Own files first (pytest would fold them into "tests" in directory order), then the rest.
    stages = [list(m.tests)] + ([] if quick else [["tests"]])
    status, by = "survived", ""
    try:
        for tests in stages:
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
            proc = subprocess.run(
                cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
            )
            if proc.returncode in (1, 2):  # failing tests, or a module that no longer imports
                status, by = "killed", _first_failure(proc.stdout)
                break
            if proc.returncode != 0:
                status, by = "error", f"pytest exit {proc.returncode}: {proc.stdout[-300:]}"
                break
    except subprocess.TimeoutExpired:
        status, by = "timeout", f"no result within {timeout:.0f} s (counted as killed: a hang)"
    finally:
        shutil.copy2(pristine / m.file, copy_src / m.file)
    return Outcome(m.name, status, by, time.perf_counter() - t0)


def _cached() -> dict[str, dict]:
    if not CACHE.is_file():
        return {}
    out = {}
    for line in CACHE.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        out[row["key"]] = row
    return out


def _check_copy(copy_src: Path) -> None:
    """The copy, not the checkout, must be what the tests import."""
    env = dict(os.environ, PYTHONPATH=str(copy_src))
    where = subprocess.run(
        [sys.executable, "-c", "import normkd; print(normkd.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(str(copy_src)):
        sys.exit(f"mutants: the tests would import {where}, not the mutated copy; aborting")


def write_report(path: Path, outcomes: list[Outcome], quick: bool, seconds: float) -> None:
    """Markdown: the score, then every mutant with its fate."""
    by_name = {m.name: m for m in MUTANTS}
    killed = sum(o.status in ("killed", "timeout") for o in outcomes)
    equivalent = [o for o in outcomes if o.status == "survived" and by_name[o.name].equivalent]
    scored = len(outcomes) - len(equivalent)
    lines = [
        "# Mutation check (`make mutants`)",
        "",
        f"{len(outcomes)} named semantic mutants over src/normkd (engine/, distiller.py, "
        "losses/, config.py, data/, api.py, norm.py); each one's own test files run first, "
        + (
            "then nothing else (--quick)."
            if quick
            else "then the whole suite, stopping at the first failure."
        )
        + f" {time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} min on this machine (CPU).",
        "",
        f"**Killed: {killed} / {len(outcomes)} ({100 * killed / max(len(outcomes), 1):.1f}%)**; "
        f"equivalent survivors (explained below): {len(equivalent)}; "
        f"killed among non-equivalent: {killed} / {scored} "
        f"({100 * killed / max(scored, 1):.1f}%).",
        "",
        "| mutant | file | what it breaks | result | first failing test / note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        m = by_name[o.name]
        note = o.by if o.status != "survived" else (m.equivalent or "**NOT KILLED**")
        lines.append(f"| {o.name} | {m.file} | {m.what} | {o.status} | {note} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--check", action="store_true", help="check every mutant applies; no tests")
    p.add_argument("--quick", action="store_true", help="only each mutant's own test files")
    p.add_argument("--fresh", action="store_true", help="ignore cached results")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    p.add_argument(
        "--report", type=Path, help=f"Markdown report (default for a full run: {REPORT})"
    )
    args = p.parse_args(argv)
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        sys.exit("mutants: two mutants share a name")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.file:28s} {m.what}")
        return 0
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "src").mkdir()
            bad = []
            for m in MUTANTS:
                (Path(tmp) / "src" / m.file).parent.mkdir(parents=True, exist_ok=True)
                err = _apply(m, Path(tmp) / "src")
                if err:
                    bad.append(f"{m.name}: {err}")
        print("\n".join(bad) or f"all {len(MUTANTS)} mutants apply")
        return 1 if bad else 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - set(names)
    if unknown:
        sys.exit(f"mutants: unknown names {sorted(unknown)}")
    cache = {} if args.fresh else _cached()
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normkd-mutants-") as tmp:
        (Path(tmp) / "tree").mkdir()
        root = snapshot(Path(tmp) / "tree")
        pristine = Path(tmp) / "pristine"
        shutil.copytree(root / "src", pristine)
        _check_copy(root / "src")
        for i, m in enumerate(chosen, 1):
            key = _key(m, root) + ("q" if args.quick else "")
            row = cache.get(key)
            if row is None:
                o = run_one(m, root, pristine, args.quick, args.timeout)
                with open(CACHE, "a") as fh:
                    fh.write(json.dumps({"key": key, **o.__dict__}) + "\n")
            else:
                o = Outcome(row["name"], row["status"], row["by"], row["seconds"])
            outcomes.append(o)
            print(
                f"[{i}/{len(chosen)}] {o.status:8s} {m.name} ({o.seconds:.0f} s) {o.by}", flush=True
            )
    errors = [o for o in outcomes if o.status == "error"]
    report = args.report or (None if args.only else REPORT)
    if report is not None:
        write_report(report, outcomes, args.quick, time.perf_counter() - t0)
        print(f"report: {report}")
    survivors = [o.name for o in outcomes if o.status == "survived"]
    killed = sum(o.status in ("killed", "timeout") for o in outcomes)
    print(f"killed {killed}/{len(outcomes)}; survived: {', '.join(survivors) or 'none'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
