"""docs/architecture.md stays true of the code: every file, module and function it names exists.

Names are read from the doc's backticks: paths (``engine/job.py``, relative to src/normkd or the
repository), dotted names (``Distiller.hooks_kept``, ``config.load_recipe``, recipe keys such as
``engine.bn_recalibrate``) and bare identifiers (``assemble``), each resolved in the code.
"""

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch

from normkd.config import Recipe

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "normkd"
DOC = (ROOT / "docs" / "architecture.md").read_text()
SPANS = sorted(set(re.findall(r"`([^`\n]+)`", DOC)))
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FILES = re.compile(r"\.(json|pt|safetensors|csv|yaml|md|onnx)$")
# Backticked words that are values or commands, not code: an ``engine.amp`` value, a CLI command.
WORDS = {"auto", "merge"}
# torch's own names the doc quotes when it walks through a step: they must exist in torch.
TORCH = {
    "GradScaler.step": (torch.amp.GradScaler, "step"),
    "scaler.step": (torch.amp.GradScaler, "step"),
    "scaler.scale": (torch.amp.GradScaler, "scale"),
    "optimizer.step": (torch.optim.Optimizer, "step"),
    "zero_grad": (torch.optim.Optimizer, "zero_grad"),
    "no_grad": (torch, "no_grad"),
}


def _defined() -> dict[str, set[str]]:
    """Every name defined in src/normkd -> the names defined inside it (a class's methods and
    attributes, a module's top-level names under its dotted module path)."""
    names: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        top = names.setdefault(module.removesuffix(".__init__"), set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                names.setdefault(node.name, set())
            if isinstance(node, ast.ClassDef):
                inner = names[node.name]
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        inner.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        inner.add(item.target.id)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                top.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                top |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


DEFINED = _defined()


def _path_exists(span: str) -> bool:
    if "<" in span:  # a placeholder (losses/<term>.py): its folder must exist
        span = span.split("<")[0]
    return any((base / span).exists() for base in (SRC, ROOT))


def _dotted_exists(span: str) -> bool:
    head, _, tail = span.rpartition(".")
    if span.startswith("normkd."):  # normkd.distill, normkd.norm
        return hasattr(importlib.import_module(head), tail)
    # a class (Distiller.hooks_kept), a module by its last part(s) (registry.LAZY_ZOO), or an
    # instance named after its class (job.step_module)
    for owner in (head, head.capitalize()):
        keys = [k for k in DEFINED if k == owner or k.endswith(f".{owner}")]
        if any(tail in DEFINED[k] for k in keys):
            return True
    section = Recipe.model_fields.get(head)  # a recipe key: engine.amp, optim.grad_clip
    if section is not None and hasattr(section.annotation, "model_fields"):
        return tail in section.annotation.model_fields
    try:
        return hasattr(importlib.import_module(f"normkd.{head}"), tail)
    except ImportError:
        return False


def _names_code(span: str) -> bool:
    """Whether a backticked span names code: a path, a dotted name or an identifier."""
    if span.endswith(".py") or ("/" in span and " " not in span and ":" not in span):
        return True
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", span):
        return not FILES.search(span)
    return bool(IDENT.fullmatch(span)) and span not in WORDS


def _checked() -> list[str]:
    """The spans that name code (prose, YAML and file names skipped), call parentheses cut."""
    spans = [span.split("(")[0].strip() for span in SPANS]
    return sorted({span for span in spans if _names_code(span)})


@pytest.mark.parametrize("span", _checked())
def test_every_name_in_the_architecture_doc_exists(span: str) -> None:
    if span in TORCH:
        owner, name = TORCH[span]
        assert hasattr(owner, name), span
    elif span.endswith(".py") or "/" in span:
        assert _path_exists(span), f"docs/architecture.md names {span}, which does not exist"
    elif "." in span:
        assert _dotted_exists(span), f"docs/architecture.md names {span}, not found in the code"
    else:
        assert span in DEFINED or any(span in inner for inner in DEFINED.values()), (
            f"docs/architecture.md names {span}, defined nowhere in src/normkd"
        )


def test_the_doc_names_what_it_is_checked_by() -> None:
    """The check reads enough of the doc to mean something (the regexes still match it)."""
    checked = _checked()
    assert {"engine/job.py", "assemble", "Distiller.hooks_kept", "norm/paper.py"} <= set(checked)
    assert len(checked) > 60


def test_the_paper_reads_in_one_short_file() -> None:
    """FT, the loss and the merge in one file a reader takes in at once (the doc's promise)."""
    paper = (SRC / "norm" / "paper.py").read_text()
    assert len(paper.splitlines()) <= 300
    assert all(f"def {name}(" in paper for name in ("norm_loss", "fold_ft", "spatial_ratio"))
    assert "class FeatureTransform(" in paper
