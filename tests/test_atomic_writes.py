"""Every file normkd, its benchmarks and tools write appears whole or not at all.

Why: a run, a report or a record cut off mid-write (a crash, a full disk, a killed worker) must
leave the previous file, never a truncated one that a later resume or table build trusts. So a
write goes through ``atomic_write`` / ``atomic_write_text`` (a temp file, fsync, rename), and a
direct write is allowed only where its target is itself a temp file or a throwaway, listed below
with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WRITERS = {"write_text", "write_bytes", "savefig", "save", "save_file"}
# (file, enclosing function): why its direct write is safe
ALLOWED = {
    ("src/normkd/engine/logs.py", "_rewrite"): "writes metrics.csv.tmp, then renames it",
    ("src/normkd/engine/rundir.py", "_clear"): "a probe file, deleted at once",
    ("src/normkd/engine/deploy.py", "_onnx_metadata"): "edits export's temp file",
    ("src/normkd/engine/deploy.py", "export_onnx"): "export calls it on atomic_write's temp",
    ("tools/mutants.py", "_apply"): "mutates a throwaway copy of src",
    ("tools/mutants.py", "write_report"): "writes mutants.md.tmp, then renames it",
    ("tools/mutants.py", "main"): "appends whole lines to its own result cache",
    ("tools/probe/mutant_probe.py", "_record"): "appends to a temp probe log",
}


def _sources() -> list[Path]:
    roots = [REPO / "src" / "normkd", REPO / "benchmarks", REPO / "tools"]
    return sorted(p for r in roots for p in r.rglob("*.py"))


def _is_write(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute):  # torch.onnx.export, not normkd's own (atomic) export
        onnx = f.attr == "export" and getattr(f.value, "attr", None) == "onnx"
        return f.attr in WRITERS or onnx
    if isinstance(f, ast.Name) and f.id == "open":
        mode = call.args[1] if len(call.args) > 1 else None
        mode = mode or next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax")
    return f.id in {"save_file"} if isinstance(f, ast.Name) else False


def direct_writes(path: Path) -> list[tuple[str, int]]:
    """``(enclosing function, line)`` of each write in ``path`` not inside a lambda (the
    ``atomic_write(path, lambda tmp: ...)`` form) or a nested function handed to atomic_write."""
    found: list[tuple[str, int]] = []
    tree = ast.parse(path.read_text(), str(path))
    writers = _handed_to_atomic_write(tree)

    def visit(node: ast.AST, func: str, in_writer: bool) -> None:
        if isinstance(node, ast.Lambda):
            in_writer = True
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_writer = in_writer or node.name in writers
            func = node.name
        elif isinstance(node, ast.Call) and _is_write(node) and not in_writer:
            found.append((func, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, func, in_writer)

    visit(tree, "<module>", False)
    return found


def _handed_to_atomic_write(tree: ast.AST) -> set[str]:
    """Names passed as the writer of ``atomic_write(path, writer)``."""
    return {
        n.args[1].id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and getattr(n.func, "id", getattr(n.func, "attr", None)) == "atomic_write"
        and len(n.args) > 1
        and isinstance(n.args[1], ast.Name)
    }


def test_every_write_in_the_package_benchmarks_and_tools_is_atomic() -> None:
    bad = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        for func, line in direct_writes(path):
            if (rel, func) not in ALLOWED:
                bad.append(f"{rel}:{line} in {func}()")
    assert not bad, "direct file writes (use atomic_write / atomic_write_text):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("def f(p):\n    p.write_text('x')\n", [("f", 2)]),
        ("def f(p, fig):\n    fig.savefig(p)\n", [("f", 2)]),
        ("def f(p):\n    with open(p, 'w') as fh:\n        fh.write('x')\n", [("f", 2)]),
        ("def f(p):\n    atomic_write(p, lambda tmp: Path(tmp).write_text('x'))\n", []),
        ("def f(p):\n    def w(tmp):\n        torch.save({}, tmp)\n    atomic_write(p, w)\n", []),
        ("def f(p):\n    with open(p) as fh:\n        return fh.read()\n", []),
        ("def f(m, p):\n    torch.onnx.export(m, (), p)\n", [("f", 2)]),
        ("def f(m, p):\n    deploy.export(m, {}, p)\n", []),
    ],
)
def test_the_check_tells_a_direct_write_from_an_atomic_one(
    tmp_path: Path, code: str, expected: list[tuple[str, int]]
) -> None:
    src = tmp_path / "m.py"
    src.write_text(code)
    assert direct_writes(src) == expected
