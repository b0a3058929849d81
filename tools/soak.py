"""Signals at random points of real runs, and two writers racing for one run directory.

`python tools/soak.py [--trials 20] [--races 10] [--out DIR] [--report FILE]`

For each data kind (the digits device loader, an image folder through DataLoaders) and each
signal (SIGKILL, SIGTERM, SIGINT), ``--trials`` times: start ``normkd train`` as a subprocess,
send the signal at a random moment of the run (after its run directory appears, within
the time an uninterrupted run takes to finish from there), then check that
every file left behind is whole (``last.pt`` loads with weights_only, ``metrics.csv`` and
``config.yaml`` parse, no temp file left, no non-finite tensor), run ``--resume`` to the end, and
compare the final ``last.pt`` tensor for tensor with an uninterrupted run. Then ``--races``
times: two ``normkd train`` into one run directory started together; one must finish, the other
exit 2 with one line, and the winner's files be whole.

Prints a line per trial and writes a Markdown report of the counts (benchmarks/results/soak.md).
Not part of ``make test`` (about half an hour on 2 cores): a release check, like ``make mutants``.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from normkd.engine.checkpoint import atomic_write_text, load_checkpoint  # noqa: E402
from support import DEMO, write_image_folder  # noqa: E402

EPOCHS = 4
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
EXIT = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 143, "SIGINT": 2}  # what each must exit with


def kinds(work: Path) -> dict[str, list[str]]:
    """``--set`` items of each data kind's small BatchNorm run (several checkpointed epochs)."""
    folder = write_image_folder(work / "images", classes=3, per_class=100, size=24)
    common = [f"optim.epochs={EPOCHS}", "engine.device=cpu"]
    return {
        "digits": ["student.model=resnet8", "data.n_train=1200", *common],
        "folder": [
            "student.model=tinycnn",
            "student.kwargs={width: 8}",
            "data.kind=folder",
            f"data.root={folder}",
            "data.image_size=24",
            "data.batch_size=12",
            "data.workers=0",
            *common,
        ],
    }


def command(out: Path, sets: list[str], *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "normkd", "train", str(DEMO / "teacher.yaml"), "--quiet"]
    argv += ["--out-dir", str(out), *[a for s in sets for a in ("--set", s)], *extra]
    return argv


def env() -> dict[str, str]:
    return dict(os.environ) | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def finish(out: Path, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(out, sets, *extra), capture_output=True, text=True, env=env())
    if proc.returncode != 0:
        raise RuntimeError(f"run in {out} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def timed_reference(out: Path, sets: list[str]) -> tuple[float, float]:
    """Run uninterrupted; (s until config.yaml appears, s until summary.json does)."""
    run = out / "demo_teacher"
    proc = subprocess.Popen(command(out, sets, "--overwrite"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env())  # fmt: skip
    t0, begins, ends = time.perf_counter(), None, None
    while proc.poll() is None or ends is None:
        now = time.perf_counter() - t0
        if begins is None and (run / "config.yaml").exists():
            begins = now
        if ends is None and (run / "summary.json").exists():
            ends = now
        if proc.poll() is not None and ends is None:
            break
        time.sleep(0.005)
    if proc.returncode != 0 or begins is None or ends is None:
        raise RuntimeError(f"reference run in {out} failed: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
    return begins, ends


def whole_files(run: Path, temps_allowed: bool = False) -> list[str]:
    """What is wrong with the files a stopped run left (empty: nothing). A SIGKILL during a
    write leaves its temp file (nothing can run then); the next run must remove it."""
    bad = [] if temps_allowed else [f"temp file left: {p.name}" for p in run.glob(".*.tmp")]
    for name in ("last.pt", "best.pt"):
        if (run / name).exists():
            try:
                state = load_checkpoint(run / name)
            except Exception as err:  # a truncated or poisoned file is the failure we look for
                bad.append(f"{name}: {err}")
                continue
            nonfinite = [
                k
                for k, v in state["distiller"].items()
                if v.is_floating_point() and not torch.isfinite(v).all()
            ]
            bad += [f"{name}: non-finite {k}" for k in nonfinite]
    if (run / "metrics.csv").exists():
        try:
            rows = list(csv.DictReader((run / "metrics.csv").open()))
            [float(r["loss"]) for r in rows]
        except Exception as err:
            bad.append(f"metrics.csv: {err}")
    for name in ("config.yaml", "data.json", "summary.json"):
        if (run / name).exists():
            try:
                yaml.safe_load((run / name).read_text())
            except Exception as err:
                bad.append(f"{name}: {err}")
    return bad


def same_state(a: Path, b: Path) -> bool:
    sa, sb = load_checkpoint(a)["distiller"], load_checkpoint(b)["distiller"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@dataclass
class Tally:
    """Counts of one (kind, signal) cell."""

    trials: int = 0
    exit_ok: int = 0
    before_start: int = 0  # the signal landed before the run directory was made
    stopped_mid_run: int = 0  # it landed while the run was going (after start, before the end)
    whole: int = 0
    identical: int = 0
    problems: list[str] = field(default_factory=list)


def trial(out: Path, sets: list[str], sig: str, delay: float, reference: Path, t: Tally) -> None:
    """One run stopped by ``sig`` ``delay`` s after its run directory appeared (its start-up
    takes what the machine's load makes it take), checked, resumed and compared."""
    run = out / "demo_teacher"
    proc = subprocess.Popen(
        command(out, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    while not (run / "config.yaml").exists() and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(SIGNALS[sig])
    _, err = proc.communicate(timeout=600)
    t.trials += 1
    finished = proc.returncode == 0
    # Before the run directory exists the process is still importing Python/torch: the signal
    # gets Python's default handling there (nothing written yet, nothing to keep).
    early = not (run / "config.yaml").exists()
    t.before_start += early
    lines = err.strip().splitlines()
    if (
        early
        or finished
        or (
            proc.returncode == EXIT[sig]
            and (sig == "SIGKILL" or (len(lines) == 1 and "Traceback" not in err))
        )
    ):
        t.exit_ok += 1
    else:
        t.problems.append(f"{sig} after {delay:.2f}s: exit {proc.returncode}: {err[-300:]}")
    t.stopped_mid_run += not finished and not early
    bad = whole_files(run, temps_allowed=sig == "SIGKILL") if run.exists() else []
    t.whole += not bad
    t.problems += [f"{sig} after {delay:.2f}s: {b}" for b in bad]
    # Resume (or start again, when the signal came before the first checkpoint) to the end.
    finish(out, sets, "--resume" if (run / "last.pt").exists() else "--overwrite")
    bad = [f"after --resume: temp file left: {p.name}" for p in run.glob(".*.tmp")]
    t.problems += [f"{sig} after {delay:.2f}s: {b}" for b in bad]
    if same_state(reference, run / "last.pt"):
        t.identical += 1
    else:
        t.problems.append(f"{sig} after {delay:.2f}s: resumed state differs from uninterrupted")


def race(out: Path, sets: list[str]) -> str | None:
    """Two writers started together into one run dir; None when it went as it must."""
    procs = [
        subprocess.Popen(
            command(out, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env(),
        )
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    if codes != [0, 2]:
        return f"exit codes {codes}: {[e[-200:] for _, e in results]}"
    loser = next(e for c, e in results if c == 2).strip()
    if len(loser.splitlines()) != 1 or not (
        "is being written by" in loser or "already holds a run" in loser
    ):
        return f"loser said: {loser[-300:]}"
    bad = whole_files(out / "demo_teacher")
    if load_checkpoint(out / "demo_teacher" / "last.pt")["epoch"] != EPOCHS:
        bad.append("winner's last.pt is not the finished run")
    return "; ".join(bad) or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="per data kind and signal")
    parser.add_argument("--races", type=int, default=10, help="two-writer races")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/results/soak.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Started in the background (nohup, `&`), this process ignores SIGINT, and an ignored signal
    # stays ignored in every child it starts: the SIGINT trials would test nothing. A handler of
    # our own is reset to the default on exec, so each normkd child takes Ctrl-C as a user's does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells: dict[tuple[str, str], Tally] = {}
    for kind, sets in kinds(args.out).items():
        ref_out = args.out / kind / "reference"
        begins, ends = timed_reference(ref_out, sets)
        print(f"[soak] {kind}: uninterrupted run, its directory from {begins:.1f} s to the "
              f"summary at {ends:.1f} s", flush=True)  # fmt: skip
        reference = ref_out / "demo_teacher" / "last.pt"
        for sig in SIGNALS:
            t = cells[(kind, sig)] = Tally()
            for i in range(args.trials):
                delay = rng.uniform(0.0, ends - begins)  # within the run: epochs, final writes
                trial(args.out / kind / f"{sig}_{i}", sets, sig, delay, reference, t)
                print(f"[soak] {kind} {sig} {i + 1}/{args.trials}: {t}", flush=True)
    races = [
        race(args.out / "race" / f"r{i}", kinds(args.out)["digits"]) for i in range(args.races)
    ]
    report(args.report, cells, races, time.perf_counter() - t0, args)
    failed = [p for t in cells.values() for p in t.problems] + [r for r in races if r]
    print(f"[soak] {'FAILED: ' + str(len(failed)) if failed else 'all held'}", flush=True)
    return 1 if failed else 0


def report(path: Path, cells: dict, races: list, seconds: float, args: argparse.Namespace) -> None:
    rows = [
        "| data | signal | trials | before start-up ended | stopped mid-run | right exit code, "
        "one line | files whole | resume bit-identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (kind, sig), t in cells.items():
        rows.append(
            f"| {kind} | {sig} | {t.trials} | {t.before_start} | {t.stopped_mid_run} | {t.exit_ok} "
            f"| {t.whole} "
            f"| {t.identical} |"
        )
    won = sum(r is None for r in races)
    problems = [p for t in cells.values() for p in t.problems] + [r for r in races if r]
    text = (
        "# Soak: signals at random points, and racing writers\n\n"
        f"`python tools/soak.py --trials {args.trials} --races {args.races} --seed {args.seed}`"
        f"; CPU, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f", {seconds / 60:.1f} min, load average {os.getloadavg()[0]:.2f}.\n\n"
        f"Each trial: `normkd train` ({EPOCHS} epochs, a BatchNorm student) gets the signal "
        "a random delay after its config.yaml appears, drawn up to the time an uninterrupted "
        "run took from its config.yaml to its summary.json (machine load moves some trials "
        "past the end of the run: the columns count them); the files it "
        "leaves are checked (checkpoints load with weights_only and hold finite tensors, "
        "metrics.csv/config.yaml/data.json parse, no temp file: a SIGKILL mid-write may leave "
        "one, which the resume must remove), then `--resume` runs to the "
        "end and its last.pt is compared tensor for tensor with an uninterrupted run's.\n\n"
        + "\n".join(rows)
        + f"\n\nTwo writers started together into one run directory, {len(races)} times: "
        f"{won} went as they must (one finished, the other exit 2 with one line naming the "
        "holder or the finished run; the winner's files whole).\n\n"
        + ("Problems:\n" + "\n".join(f"- {p}" for p in problems) if problems else "No problems.")
        + "\n"
    )
    atomic_write_text(path, text)


if __name__ == "__main__":
    sys.exit(main())
