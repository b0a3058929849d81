"""The model registry depends on no zoo module (timm's layout): the zoo modules import it, the
package imports every zoo module but the lazy ones, so a new model is one ``@register_model``."""

import ast
import subprocess
import sys
from pathlib import Path

import normkd.models
from normkd.models.registry import LAZY_ZOO

MODELS = Path(normkd.models.__file__).parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_the_registry_imports_no_model_module() -> None:
    assert not {m for m in _imports(MODELS / "registry.py") if m.startswith("normkd.models")}


def test_every_eager_zoo_module_is_imported_with_the_package_and_no_lazy_one() -> None:
    zoo = sorted(
        ".".join(("normkd", *p.relative_to(MODELS.parent).with_suffix("").parts))
        for p in MODELS.rglob("*.py")
        if "@register_model(" in p.read_text()
    )
    assert "normkd.models.vit" in zoo and "normkd.models.imagenet" in zoo
    code = f"import sys, normkd.models; print([m for m in {zoo!r} if m not in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ast.literal_eval(out.stdout) == list(LAZY_ZOO)
