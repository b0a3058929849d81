"""What a user gets from a clone or a wheel: the license, shipped recipes by name, file modes."""

import stat
import subprocess
import sys
import zipfile

from normkd.cli import main
from normkd.config import load_recipe, shipped_recipes
from normkd.engine.checkpoint import atomic_write_text
from support import ROOT


def test_the_wheel_carries_the_license_and_the_recipes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("normkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "normkd/configs/demo/norm_kd.yaml" in names
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_shipped_recipes_load_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    names = shipped_recipes()
    assert "demo/norm_kd" in names and "cifar100/resnet32x4__resnet8x4/norm" in names
    assert load_recipe("demo/norm_kd").name == "demo_norm_kd"
    assert load_recipe("cifar100/resnet32x4__resnet8x4/norm.yaml").student.model == "resnet8x4"
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out.split() == names
    argv = ["distill", "demo/norm_kd", "--dry-run", "--set", "teacher.weights=null"]
    assert main([*argv, "--set", "engine.device=cpu"]) == 0
    assert main(["distill", "demo/no_such_recipe", "--dry-run"]) == 2
    assert "normkd recipes` lists them" in capsys.readouterr().err


def test_written_files_are_readable_by_others(tmp_path):
    """mkstemp creates 0600 files; a saved run is an ordinary 0644 file like any tool writes."""
    path = tmp_path / "summary.json"
    atomic_write_text(path, "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
