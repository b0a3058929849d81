"""The mutation check (tools/mutants.py) itself: its list stays true to the code, it can report a
survivor, and it tells a real kill from a flaky test, a broken run and a hang.

A stale mutant (its code reworded) is refused where the list is used, by `make mutants` before it
runs anything, not here: a behaviour-preserving edit never fails `make test`. The runner deselects
this file in mutant runs; the survivor test fails if that ever stops.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from support import ROOT

TOOL = ROOT / "tools" / "mutants.py"
CANARY = "equivalent-docstring"


@pytest.fixture
def tool(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """tools/mutants.py as a module (it imports mutant_list from its own folder)."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    return importlib.import_module("mutants")


def test_a_run_refuses_to_start_on_a_stale_list(
    tool: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    """Staleness is checked where the list is used (a reworded line never fails make test): a run
    whose mutant no longer applies stops before anything runs, naming it and the fix."""
    stale = tool.Mutant("gone", "normkd/stats.py", "moved", "text that is nowhere\n", "x\n",
                        ("tests/test_stats.py",))  # fmt: skip
    monkeypatch.setattr(tool, "MUTANTS", [*tool.MUTANTS, stale])
    cache = tmp_path / "cache.jsonl"
    assert tool.main(["--only", "gone", "--cache", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "mutant 'gone' (moved) no longer applies" in err and "--only gone --quick" in err
    assert not cache.exists()  # nothing ran
    assert tool.main(["--check"]) == 1  # --check says the same for the whole list


def test_the_shipped_list_is_distinct_and_names_existing_tests(tool: ModuleType) -> None:
    """What can be checked without the code's wording: unique names, each with existing tests."""
    names = [m.name for m in tool.MUTANTS]
    assert len(set(names)) == len(names) >= 100
    for m in tool.MUTANTS:
        assert m.tests and all((ROOT / t.split("::")[0]).exists() for t in m.tests), m.name
        assert (ROOT / "src" / m.file).is_file(), m.name


def test_an_equivalent_mutant_is_reported_as_a_survivor(tmp_path: Path) -> None:
    """The canary (a reworded docstring) against its own test file, then a 'suite' of this very
    file and another: it must survive. Were this file run in the mutated copy, its --check would
    fail there and the canary would be counted killed, as every survivor was before."""
    cmd = [sys.executable, str(TOOL), "--only", CANARY, "--cache", str(tmp_path / "c.jsonl")]
    cmd += ["--suite", "tests/test_mutants.py", "tests/test_signals.py", "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^\[1/1\] survived\s+{CANARY} ", proc.stdout, re.M), proc.stdout
    assert "killed 0/1; survived: equivalent-docstring;" in proc.stdout


def test_the_canary_is_listed_as_equivalent(tool: ModuleType) -> None:
    canary = next(m for m in tool.MUTANTS if m.name == CANARY)
    assert canary.equivalent and canary.tests == ("tests/test_stats.py",)


TOY = '''"""A toy module."""


def add(a, b):
    return a + b
'''
TOY_TESTS = {
    "test_add.py": "from toy import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
    "test_ones.py": "from toy import add\n\n\ndef test_ones():\n    assert add(1, 1) == 2\n",
    "test_broken.py": "def test_always_fails():\n    assert False\n",
}


@pytest.fixture
def toy(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway tree (src/toy.py, three test files) and its pristine src/."""
    root = tmp_path / "tree"
    (root / "src").mkdir(parents=True)
    (root / "src" / "toy.py").write_text(TOY)
    (root / "tests").mkdir()
    for name, text in TOY_TESTS.items():
        (root / "tests" / name).write_text(text)
    shutil.copytree(root / "src", tmp_path / "pristine")
    return root, tmp_path / "pristine"


SUM = "    return a + b\n"
# name, new text for SUM (or for the docstring), the mutant's own tests, the suite after them
CASES = {
    "survived": ('"""A reworded toy module."""', ("tests/test_add.py",), ("tests/test_ones.py",)),
    "killed": ("    return a - b\n", ("tests/test_add.py",), ("tests/test_ones.py",)),
    "node": ("    return a - b\n", ("tests/test_add.py::test_add",), ()),
    "offlist": ("    return a + b + (a == 1)\n", ("tests/test_add.py",), ("tests/test_ones.py",)),
    "flaky": ('"""A reworded toy module."""', ("tests/test_add.py",), ("tests/test_broken.py",)),
    "import": ('"""A toy."""\nraise ImportError("no")', ("tests/test_add.py",), ()),
    "hang": ("    while True:\n        pass\n", ("tests/test_add.py",), ()),
}


FLAKY = "tests/test_broken.py::test_always_fails (outside its tests; re-run with the mutant: fail"


@pytest.mark.parametrize(
    "case, workers, status, by",
    [
        ("survived", 0, "survived", ""),
        ("killed", 0, "killed", "tests/test_add.py::test_add"),
        ("killed", 2, "killed", "tests/test_add.py::test_add"),  # xdist's -x exits 2
        ("node", 0, "killed", "tests/test_add.py::test_add"),  # its tests: a node id
        ("offlist", 0, "killed", "tests/test_ones.py::test_ones (outside its tests: fails again"),
        ("flaky", 0, "flaky", FLAKY + ", without it: fail)"),
        ("import", 0, "error", "no verdict (pytest exit 2): tests/test_add.py errored in collect"),
        ("import", 2, "error", "no verdict (pytest exit 2): tests/test_add.py errored in collect"),
        ("hang", 0, "timeout", "no result within 5 s"),
    ],
)
def test_outcomes_are_told_apart(
    tool: ModuleType, toy, case: str, workers: int, status: str, by: str
) -> None:
    """Only a test failing in its call phase kills; one outside the mutant's own tests only when
    it fails again with the mutant and passes without; an import error or a hang is no kill."""
    root, pristine = toy
    new, tests, suite = CASES[case]
    old = '"""A toy module."""' if new.startswith('"""') else SUM
    m = tool.Mutant(f"toy-{case}", "toy.py", case, old, new, tests)
    out = tool.run_one(
        m, root, pristine, suite, timeout=5.0 if case == "hang" else 120.0, workers=workers
    )
    assert (out.status, out.by[: len(by)]) == (status, by), out
    assert case not in ("killed", "node") or out.by == by  # its own test: no re-runs
    assert (root / "src" / "toy.py").read_text() == TOY  # restored


def test_old_text_matches_reformatted_and_reindented_code(tool: ModuleType) -> None:
    """ruff re-wrapping a call (with its magic trailing comma) or a block moving one level in
    keeps a mutant valid; the new text follows the block's indentation and compiles."""
    call = tool.Mutant("m", "f.py", "", "return f(alpha, beta)", "return f(alpha)")
    wrapped = "def g():\n    return f(\n        alpha,\n        beta,\n    )\n"
    assert tool.mutate(wrapped, call) == ("def g():\n    return f(alpha)\n", [2])
    block = tool.Mutant("b", "f.py", "", "    if x:\n        y()\n", "    if not x:\n        y()\n")
    nested = "def g(x):\n    for _ in ():\n        if x:\n            y()\n    return 1\n"
    got, lines = tool.mutate(nested, block)
    assert got == nested.replace("if x:", "if not x:") and lines == [3]
    compile(got, "f.py", "exec")
    assert tool.mutate("return f(alpha, beta_2)", call) == (None, [])
    assert tool.mutate("return f(alpha, beta)\nreturn f(alpha,beta)", call) == (None, [1, 2])


def test_a_stale_mutant_names_itself_its_file_the_nearest_line_and_the_fix(
    tool: ModuleType,
) -> None:
    m = tool.Mutant("dkd-beta", "normkd/losses/dkd.py", "beta ignored", "return a * t + b * n", "")
    text = textwrap.dedent(
        """\
        def loss(a, b, t, n):
            x = 1
            return a * t + beta * n
        """
    )
    mutated, lines = tool.mutate(text, m)
    msg = tool.stale_message(m, text, lines)
    assert mutated is None
    assert "mutant 'dkd-beta' (beta ignored) no longer applies" in msg
    assert "is no longer in src/normkd/losses/dkd.py" in msg
    assert "src/normkd/losses/dkd.py:3) reads\n        return a * t + beta * n" in msg
    assert "update the mutant named 'dkd-beta' in tools/mutant_list.py" in msg
    assert msg.endswith("python tools/mutants.py --only dkd-beta --quick")
    both = "return a * t + b * n\nreturn a*t + b*n\n"
    assert "matches 2 places (src/normkd/losses/dkd.py lines [1, 2])" in tool.stale_message(
        m, both, tool.mutate(both, m)[1]
    )


def test_the_copy_under_test_holds_every_tracked_top_level_entry(tool: ModuleType) -> None:
    """A file a test reads (docs/architecture.md, README.md) missing from the mutated copy fails
    that test's collection in every mutant run, so each survivor would read 'error' instead."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert {f.split("/")[0] for f in files} <= set(tool.SNAPSHOT)
