"""``make mutants``: does the test suite notice when the wiring breaks?

Each mutant is a named, semantic bug (one text replacement in one source file: a dropped weight, an
ignored setting, a skipped call). For each, a copy of ``src/`` is mutated and the tests run against
it (``PYTHONPATH`` puts the copy first; subprocesses inherit it), as ``make test`` runs them
(--workers pytest-xdist workers, one thread each; 0: one plain pytest process). The mutant's own
test files run first, then the rest of the suite (unless --quick), stopping at the first
failure. Outcomes:

* **killed**: a test *failed* (pytest exit 1, the failure in the test's call phase, not in its
  setup). A failing test outside the mutant's own ``tests`` is re-run by node id, once with the
  mutant (it must fail again) and once without it (it must pass); otherwise the outcome is
  **flaky**, never credited. The report names the killing test.
* **survived**: every test passed. Acceptable only for a mutant marked ``equivalent``.
* **error**: no verdict: the mutant does not apply (its ``old`` text moved), or pytest could not
  judge (a collection error or interrupt, exit 2/3/4/5, or a test erroring in setup/teardown).
* **timeout**: no result within --timeout seconds (the whole process group is killed).

The tool's own tests (``tests/test_mutants.py``) are deselected in mutant runs: they test tools/,
never src/, and their ``--check`` fails in any mutated copy, which would turn every survivor into
a kill. tests/test_mutants.py proves a survivor is reported (an equivalent mutant run against that
file and another one) and that each outcome above is told apart (a throwaway tree).

``old`` is matched ignoring whitespace (see :func:`pattern`), so reformatting the code (ruff
re-wrapping a call, a block re-indented) keeps a mutant valid. Rewording the code does not, and
that is checked where the list is used, not in the unit tests: a behaviour-preserving edit never
fails ``make test``, while ``make mutants`` (or ``--check``) refuses to start on a stale list and
says which mutant, file and nearest line, and how to update it, before an hour of runs.

    python tools/mutants.py                 # all mutants, report to benchmarks/results/mutants.md
    python tools/mutants.py --only NAME...  # some mutants, no report rewrite unless --report
    python tools/mutants.py --list          # names and files
    python tools/mutants.py --check         # every mutant applies exactly once and compiles
    python tools/mutants.py --quick         # only each mutant's own test files (no full run)
    python tools/mutants.py --only NAME --suite PATH...  # own tests, then PATH... (not all)

Killed mutants stop at the first failing test (``-x``), so a full run costs roughly
(survivors x one suite) + (killed x seconds). Results are cached in ``.mutants-cache.jsonl`` by
mutant, its tests, the workers and the source text, so an interrupted run resumes; --fresh
ignores the cache, --cache names another file.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
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
PROBE = Path(__file__).resolve().parent / "probe"  # mutant_probe.py, the pytest plugin
# The mutation tool's own tests: they test tools/, and fail in every mutated copy (see the doc).
SELF_TESTS = ("tests/test_mutants.py",)
# Bumped when what an outcome means changes, so cached results of an older runner are not reused.
RUNNER_VERSION = "2"


@dataclass
class Outcome:
    """One mutant's result."""

    name: str
    status: str  # killed | survived | flaky | timeout | error
    by: str  # the killing test, or why there is no verdict
    seconds: float


# What a run copies: the tests run in the copy, so editing the checkout meanwhile is harmless.
# Every tracked top-level entry (tests read docs/, README.md, LICENSE, ...): a file a test reads
# but the copy lacks would fail that test's collection in every mutant run and hide survivors.
SNAPSHOT = (".ci", ".gitignore", "LICENSE", "Makefile", "README.md", "benchmarks", "configs",
            "docs", "examples", "pyproject.toml", "requirements.lock", "src", "tests", "tools")  # fmt: skip


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


def _key(m: Mutant, stages: tuple[tuple[str, ...], ...], workers: int, root: Path = REPO) -> str:
    text = (root / "src" / m.file).read_text()
    parts = (RUNNER_VERSION, m.name, m.old, m.new, repr(stages), str(workers), text)
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


# ------------------------------------------------------------------ matching ``old``
_TOKEN = re.compile(r"\w+|[^\w\s]")


def pattern(old: str) -> re.Pattern[str]:
    """``old`` as a regex that ignores how the code is laid out.

    Between two words (``return x``) any run of whitespace, line breaks included, matches; next
    to punctuation any whitespace or none (``f(a, b)`` matches ``f(\\n    a,\\n    b,\\n)``, and an
    optional trailing comma before a closing bracket, ruff's magic comma, is allowed). ``old``
    that starts with indentation matches at a line start with any indentation (group
    ``indent``); ``old`` that ends with a line break matches one. Whitespace inside a string
    literal is not significant either (no mutant depends on it).
    """
    body = old.strip()
    if not body:
        raise ValueError("a mutant's old text is empty")
    tokens = _TOKEN.findall(body)
    parts = [re.escape(tokens[0])]
    for prev, tok in itertools.pairwise(tokens):
        if tok in ")]}":
            parts.append(r"(?:\s*,)?\s*")
        elif (prev[-1].isalnum() or prev[-1] == "_") and (tok[0].isalnum() or tok[0] == "_"):
            parts.append(r"\s+")
        else:
            parts.append(r"\s*")
        parts.append(re.escape(tok))
    head = r"^(?P<indent>[ \t]*)" if old[:1] in (" ", "\t") else ""
    tail = r"[ \t]*\n" if old.rstrip(" \t").endswith("\n") else ""
    return re.compile(head + "".join(parts) + tail, re.MULTILINE)


def _reindent(new: str, lead: str, indent: str) -> str:
    """``new``'s lines that start with ``old``'s indentation ``lead`` moved to ``indent``."""
    lines = new.split("\n")
    return "\n".join(indent + ln[len(lead) :] if ln.startswith(lead) else ln for ln in lines)


def mutate(text: str, m: Mutant) -> tuple[str | None, list[int]]:
    """``text`` with ``m`` applied, or None; and the line numbers where ``old`` matched."""
    found = list(pattern(m.old).finditer(text))
    lines = [text.count("\n", 0, f.start()) + 1 for f in found]
    if len(found) != 1:
        return None, lines
    match = found[0]
    new = m.new
    if "indent" in match.re.groupindex:
        lead = m.old[: len(m.old) - len(m.old.lstrip(" \t"))]
        new = _reindent(new, lead, match.group("indent"))
    return text[: match.start()] + new + text[match.end() :], lines


def stale_message(m: Mutant, text: str, lines: list[int]) -> str:
    """What ``--check`` says about a mutant that no longer names exactly one place: which
    mutant, which file, where, and how to update it."""
    where = f"src/{m.file}"
    if lines:
        what = f"its `old` text matches {len(lines)} places ({where} lines {lines}): make it "
        what += "longer, so that it names one place"
    else:
        what = f"its `old` text is no longer in {where} (whitespace and line breaks ignored)"
        first = next(ln.strip() for ln in m.old.splitlines() if ln.strip())
        have = [ln.strip() for ln in text.splitlines()]
        near = difflib.get_close_matches(first, have, n=1, cutoff=0.6)
        if near:
            what += f"; the nearest line now ({where}:{have.index(near[0]) + 1}) reads\n"
            what += f"        {near[0]}"
    old = "\n".join("        " + ln for ln in m.old.strip("\n").splitlines())
    return (
        f"mutant {m.name!r} ({m.what}) no longer applies: {what}\n"
        f"    old text:\n{old}\n"
        f"    If you changed that code on purpose, update the mutant named {m.name!r} in "
        "tools/mutant_list.py: `old` = the code as it reads now, `new` = the same bug in the new "
        "wording (or drop the mutant if the behaviour is gone); then check that its tests still "
        f"kill it: python tools/mutants.py --only {m.name} --quick"
    )


def _apply(m: Mutant, copy_src: Path, original_src: Path = SRC) -> str | None:
    """Write the mutated file into the copy; returns an error text when the mutant is stale."""
    original = (original_src / m.file).read_text()
    mutated, lines = mutate(original, m)
    if mutated is None:
        return stale_message(m, original, lines)
    try:
        compile(mutated, m.file, "exec")
    except SyntaxError as err:
        return f"mutant {m.name!r}: mutated src/{m.file} does not compile: {err}"
    (copy_src / m.file).write_text(mutated)
    return None


# ------------------------------------------------------------------ running the tests
def _pytest(
    tests: list[str],
    root: Path,
    env: dict[str, str],
    timeout: float,
    deselect: tuple[str, ...],
    workers: int,
) -> tuple[int, list[dict], str] | None:
    """Run pytest on ``tests`` in ``root`` (``workers`` > 0: that many pytest-xdist workers, as
    ``make test`` runs them, one thread each; 0: one process): (exit code, failing reports in
    order, output tail), or None on a timeout (its whole process group is killed)."""
    fd, probe = tempfile.mkstemp(prefix="mutant-probe-", suffix=".jsonl")
    os.close(fd)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    cmd += ["-p", "mutant_probe", *(f"--deselect={d}" for d in deselect), *tests]
    if workers:
        cmd += ["-n", str(workers), "--dist", "worksteal"]
    env = dict(env, NORMKD_MUTANT_PROBE=probe)
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None
        reports = [json.loads(ln) for ln in Path(probe).read_text().splitlines() if ln]
        return proc.returncode, reports, out[-400:]
    finally:
        os.unlink(probe)


def _verdict(run: tuple[int, list[dict], str] | None, timeout: float) -> tuple[str, str]:
    """``("pass", "")``, ``("fail", node id)`` (a test failed in its call phase), or
    ``("timeout" | "error", why)``: an import/collection error, an interrupt or a setup error
    is no verdict on the mutant."""
    if run is None:
        return "timeout", f"no result within {timeout:.0f} s"
    rc, reports, tail = run
    if rc == 0:
        return "pass", ""
    first = reports[0] if reports else None
    # A failed test exits 1; under pytest-xdist, -x ends the session as interrupted (2).
    if rc in (1, 2) and first is not None and first["when"] == "call":
        return "fail", first["nodeid"]
    what = f"{first['nodeid'] or '(collection)'} errored in {first['when']}" if first else ""
    tail = " ".join(tail.split())[-300:]
    return "error", f"no verdict (pytest exit {rc}): {what or 'no test failed'}; {tail}".replace(
        "|", "/"
    )


def _listed(node: str, tests: tuple[str, ...]) -> bool:
    """Whether test ``node`` is one of the mutant's own tests: in a listed folder or file, or a
    listed node id (a parametrised one's every case)."""
    heads = [t.rstrip("/") for t in tests]
    return any(node == h or node.startswith((h + "/", h + "::", h + "[")) for h in heads)


def _stages(m: Mutant, suite: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The mutant's own tests, then (unless empty: --quick) the suite."""
    return (m.tests, suite) if suite else (m.tests,)


def run_one(
    m: Mutant,
    root: Path,
    pristine: Path,
    suite: tuple[str, ...],
    timeout: float,
    workers: int = 0,
) -> Outcome:
    """Mutate the copy at ``root``, run its tests (the mutant's own files first, then ``suite``
    without them), restore it; a kill outside the mutant's own tests is confirmed by re-runs
    of that one test (one xdist worker when ``workers``: the same one thread per process)."""
    t0 = time.perf_counter()
    copy_src = root / "src"
    err = _apply(m, copy_src, pristine)
    if err is not None:
        return Outcome(m.name, "error", err, 0.0)
    path = os.pathsep.join([str(copy_src), str(PROBE)])
    # A fresh session's environment, even when this runs inside a test under pytest-xdist.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT", "NORMKD_MUTANT"))
    }
    env.update(PYTHONPATH=path, OMP_WAIT_POLICY="PASSIVE")
    status, by, again = "survived", "", ("", "")
    try:
        for i, tests in enumerate(_stages(m, suite)):
            skip = SELF_TESTS + (m.tests if i else ())  # own tests: already passed in stage 0
            run = _pytest(list(tests), root, env, timeout, skip, workers)
            kind, detail = _verdict(run, timeout)
            if kind != "pass":
                status, by = ("killed" if kind == "fail" else kind), detail
                break
        if status == "killed" and not _listed(by, m.tests):
            again = _verdict(_pytest([by], root, env, timeout, (), min(workers, 1)), timeout)
    finally:
        shutil.copy2(pristine / m.file, copy_src / m.file)
    if status == "killed" and not _listed(by, m.tests):
        clean = _verdict(_pytest([by], root, env, timeout, (), min(workers, 1)), timeout)
        if again[0] == "fail" and clean[0] == "pass":
            by += " (outside its tests: fails again with the mutant, passes without it)"
        else:
            status = "flaky"
            by += (
                f" (outside its tests; re-run with the mutant: {again[0]}, without it: {clean[0]})"
            )
    return Outcome(m.name, status, by, time.perf_counter() - t0)


def _cached(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("status") != "error":  # no verdict (a broken copy, a crash): ask again
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


def write_report(path: Path, outcomes: list[Outcome], quick: bool, cached: int) -> None:
    """Markdown: the score, then every mutant with its fate. The time is the verdicts' own (the
    cache keeps each one's seconds), so a re-run that read them back still says what they took."""
    by_name = {m.name: m for m in MUTANTS}
    killed = sum(o.status == "killed" for o in outcomes)
    equivalent = [o for o in outcomes if o.status == "survived" and by_name[o.name].equivalent]
    others = {s: sum(o.status == s for o in outcomes) for s in ("flaky", "timeout", "error")}
    scored = len(outcomes) - len(equivalent)
    files = len({by_name[o.name].file for o in outcomes})
    lines = [
        "# Mutation check (`make mutants`)",
        "",
        f"{len(outcomes)} named semantic mutants over {files} files of src/normkd; each one's own "
        "test files run first, "
        + ("then nothing else (--quick)." if quick else "then the rest, to the first failure.")
        + " A kill is a test failing in its call phase; one outside the mutant's own tests "
        "counts only when it fails again with the mutant and passes without (else: flaky). "
        f"{time.strftime('%Y-%m-%d')}, {sum(o.seconds for o in outcomes) / 60:.0f} min of pytest "
        f"runs on this machine (CPU); {cached} of the {len(outcomes)} verdicts read back from an "
        "earlier invocation's cache (same runner, mutant, test stages and mutated file).",
        "",
        f"**Killed: {killed} / {len(outcomes)} ({100 * killed / max(len(outcomes), 1):.1f}%)**; "
        f"equivalent survivors (explained below): {len(equivalent)}; "
        f"killed among non-equivalent: {killed} / {scored} "
        f"({100 * killed / max(scored, 1):.1f}%); "
        + "; ".join(f"{s}: {n}" for s, n in others.items())
        + ".",
        "",
        "| mutant | file | what it breaks | result | killing test / note |",
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


def check(mutants: list[Mutant]) -> list[str]:
    """Every mutant applies exactly once, compiles, and lists test paths that exist (none of
    them the tool's own tests); the problems, one text each."""
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in mutants:
            (Path(tmp) / m.file).parent.mkdir(parents=True, exist_ok=True)
            err = _apply(m, Path(tmp))
            missing = [
                t for t in m.tests if not (REPO / t.split("::")[0]).exists() or t in SELF_TESTS
            ]
            if not m.tests or missing:
                err = (err + "\n" if err else "") + (
                    f"mutant {m.name!r}: its tests {list(m.tests)} must name existing test files "
                    f"or folders other than {SELF_TESTS[0]} (bad: {missing})"
                )
            if err:
                bad.append(err)
    return bad


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--check", action="store_true", help="check every mutant applies; no tests")
    p.add_argument("--quick", action="store_true", help="only each mutant's own test files")
    p.add_argument(
        "--suite",
        nargs="+",
        default=["tests"],
        metavar="PATH",
        help="what runs after the mutant's own tests (default: tests, the whole suite)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="pytest-xdist workers per run, as make test (default 2; 0: one plain pytest process)",
    )
    p.add_argument("--fresh", action="store_true", help="ignore cached results")
    p.add_argument("--cache", type=Path, default=CACHE, help=f"result cache (default: {CACHE})")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    p.add_argument(
        "--report", type=Path, help=f"Markdown report (default for a full run: {REPORT})"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        sys.exit("mutants: two mutants share a name")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.file:28s} {m.what}")
        return 0
    if args.check:
        bad = check(MUTANTS)
        print("\n\n".join(bad) or f"all {len(MUTANTS)} mutants apply")
        return 1 if bad else 0
    unknown = set(args.only or []) - set(names)
    if unknown:
        sys.exit(f"mutants: unknown names {sorted(unknown)}")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    stale = check(chosen)
    if stale:  # the list is kept true to the code here, where it is used
        print("\n\n".join(stale), file=sys.stderr)
        return 1
    suite = () if args.quick else tuple(args.suite)
    cache = {} if args.fresh else _cached(args.cache)
    outcomes: list[Outcome] = []
    cached = 0
    with tempfile.TemporaryDirectory(prefix="normkd-mutants-") as tmp:
        (Path(tmp) / "tree").mkdir()
        root = snapshot(Path(tmp) / "tree")
        pristine = Path(tmp) / "pristine"
        shutil.copytree(root / "src", pristine)
        _check_copy(root / "src")
        for i, m in enumerate(chosen, 1):
            key = _key(m, _stages(m, suite), args.workers, root)
            row = cache.get(key)
            if row is None:
                o = run_one(m, root, pristine, suite, args.timeout, args.workers)
                with open(args.cache, "a") as fh:
                    fh.write(json.dumps({"key": key, **o.__dict__}) + "\n")
            else:
                o = Outcome(row["name"], row["status"], row["by"], row["seconds"])
                cached += 1
            outcomes.append(o)
            print(
                f"[{i}/{len(chosen)}] {o.status:8s} {m.name} ({o.seconds:.0f} s) {o.by}", flush=True
            )
    report = args.report or (None if args.only else REPORT)
    if report is not None:
        write_report(report, outcomes, args.quick, cached)
        print(f"report: {report}")
    killed = sum(o.status == "killed" for o in outcomes)
    summary = [f"killed {killed}/{len(outcomes)}"]
    for status in ("survived", "flaky", "timeout", "error"):
        names_ = [o.name for o in outcomes if o.status == status]
        summary.append(f"{status}: {', '.join(names_) or 'none'}")
    print("; ".join(summary))
    return 1 if any(o.status == "error" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
