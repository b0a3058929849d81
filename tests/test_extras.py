"""Heavy packages only some features use are extras; a missing one is named in one line."""

import subprocess
import sys
import tomllib

import pytest

from normkd.errors import UserError
from normkd.extras import EXTRAS, available, require
from support import DEMO, ROOT


def test_core_needs_none_of_the_extras_and_pyproject_offers_each():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    extras = project["optional-dependencies"]
    pip_names = {"sklearn": "scikit-learn"}
    for module, (extra, _what) in EXTRAS.items():
        name = pip_names.get(module, module)
        assert name not in core, f"{name} is a core dependency"
        assert any(d.lower().startswith(name) for d in extras[extra]), (module, extra)
        assert "normkd[" in extras["all"][0] and extra in extras["all"][0]


def _blocked(module: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import module`` fails, as if not installed."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip


def test_a_missing_extra_is_one_line_naming_it():
    code = (
        "from normkd.cli import main\n"
        f"sys.exit(main(['train', {str(DEMO / 'teacher.yaml')!r}, '--dry-run',"
        " '--set', 'engine.device=cpu']))"
    )
    proc = _blocked("sklearn", code)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "normkd: error: the embedded digits data (scikit-learn ships it): install the optional "
        "extra, pip install 'normkd[digits]' (sklearn is missing)"
    ]


def test_without_matplotlib_the_table_is_written_and_the_plot_skipped_with_a_warning(tmp_path):
    code = (
        "from pathlib import Path\n"
        "from normkd.reproduce import Comparison, plot\n"
        f"plot(Comparison('resnet20__resnet8', 'smoke', 1, None, {{}}), Path({str(tmp_path)!r}) / 'x.png')\n"
    )
    proc = _blocked("matplotlib", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("normkd: warning: PNG plots (demo, reproduce, benchmarks): ")
    assert "pip install 'normkd[plots]'" in proc.stderr and not (tmp_path / "x.png").exists()


def test_require_and_available():
    assert available("onnx") and require("onnx").__name__ == "onnx"
    with pytest.raises(UserError, match=r"pip install 'normkd\[timm\]'"):
        sys.modules["timm"], saved = None, sys.modules.get("timm")  # type: ignore[assignment]
        try:
            require("timm")
        finally:
            if saved is None:
                del sys.modules["timm"]
            else:
                sys.modules["timm"] = saved
