"""More bad inputs that once crashed with a traceback: each now gets one line and exit 2, and
nothing a run wrote is replaced. docs/errors.md lists them (section "Recipes, outputs, sizes")."""

from pathlib import Path

import pytest

from normkd.cli import main
from normkd.engine.checkpoint import save_model
from normkd.models import create_model
from support import DEMO, one_error_line, sets

TEACHER = str(DEMO / "teacher.yaml")
NORM = str(DEMO / "norm.yaml")
DRY = ["--dry-run", "--set", "engine.device=cpu", "--set", "teacher.weights=null"]


def _line(argv: list[str], capsys) -> str:
    return one_error_line(main, argv, capsys)


def _recipe(tmp_path: Path, text: bytes) -> str:
    path = tmp_path / "r.yaml"
    path.write_bytes(text)
    return str(path)


def test_a_key_written_twice_is_refused_not_silently_replaced(tmp_path, capsys):
    text = b"name: x\ntask: train\nstudent: {model: resnet8}\noptim: {lr: 0.1}\noptim: {lr: 9}\n"
    line = _line(["train", _recipe(tmp_path, text), "--dry-run"], capsys)
    assert "not valid YAML: key 'optim' appears twice (line 5)" in line
    line = _line(["train", TEACHER, "--dry-run", "--set", "optim={lr: 1, lr: 2}"], capsys)
    assert "key 'lr' appears twice" in line


def test_a_recipe_that_is_not_utf8_or_nests_without_end(tmp_path, capsys):
    line = _line(["train", _recipe(tmp_path, b"name: caf\xe9\n"), "--dry-run"], capsys)
    assert "not UTF-8 text (byte 9); save it as UTF-8" in line
    deep = b"name: x\nstudent: " + b"[" * 5000 + b"]" * 5000 + b"\n"
    line = _line(["train", _recipe(tmp_path, deep), "--dry-run"], capsys)
    assert "nested deeper than 50 levels" in line


def test_a_huge_value_is_not_echoed_whole(capsys):
    line = _line(["train", TEACHER, "--set", "optim.lr=" + "[" * 3 + "x" * 100_000], capsys)
    assert len(line) < 400


def test_norm_with_an_absurd_n_is_refused_before_allocating(capsys):
    line = _line(["distill", NORM, *DRY, "--set", "loss.1.n=1000000"], capsys)
    assert "loss norm: n=1000000 makes FT" in line and "use n <= " in line


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "m.safetensors"
    meta = {"model": "resnet8", "num_classes": 10, "kwargs": {}, "recipe": "x"}
    save_model(path, create_model("resnet8", num_classes=10), meta)
    return path


def test_export_refuses_bad_shapes_and_paths_and_existing_files(tmp_path, model_file, capsys):
    base = ["export", str(model_file), "--onnx"]
    line = _line([*base, str(tmp_path / "a.onnx"), "--input-shape", "abc"], capsys)
    assert "--input-shape must be C,H,W (three positive integers), got 'abc'" in line
    (tmp_path / "file.txt").write_text("x")
    line = _line([*base, str(tmp_path / "file.txt" / "a.onnx"), "--input-shape", "3,8,8"], capsys)
    assert "file.txt is not a folder" in line
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"keep me")
    line = _line([*base, str(existing), "--input-shape", "3,8,8"], capsys)
    assert "old.onnx exists; pass --force to replace it" in line
    assert existing.read_bytes() == b"keep me"
    # A model file from before normkd stored the input shape: say how to give one.
    line = _line([*base, str(tmp_path / "b.onnx")], capsys)
    assert "records no input shape" in line and "--input-shape" in line
    assert not (tmp_path / "b.onnx").exists()


def test_merge_never_writes_over_the_runs_own_files(tmp_path, demo_teacher, capsys):
    out = tmp_path / "runs"
    argv = ["distill", NORM, "--out-dir", str(out), "--quiet"]
    over = ["data.n_train=100", "optim.epochs=1", "engine.device=cpu", "teacher.model=resnet8"]
    assert main([*argv, *sets(*over, f"teacher.weights={demo_teacher}")]) == 0
    run = out / "demo_norm"
    last = (run / "last.pt").read_bytes()
    for target in (run / "last.pt", run / "model.safetensors"):
        line = _line(["merge", str(run), "--out", str(target), "--force"], capsys)
        assert f"{target} is a file of the run in {run}: write elsewhere" in line
    assert (run / "last.pt").read_bytes() == last
    other = tmp_path / "merged.safetensors"
    assert main(["merge", str(run), "--out", str(other)]) == 0
    line = _line(["merge", str(run), "--out", str(other)], capsys)
    assert "merged.safetensors exists; pass --force to replace it" in line
    assert main(["merge", str(run), "--out", str(other), "--force"]) == 0


def test_eval_refuses_a_model_of_another_class_count(tmp_path, capsys):
    path = tmp_path / "m7.safetensors"
    meta = {"model": "resnet8", "num_classes": 7, "kwargs": {}, "recipe": "x"}
    save_model(path, create_model("resnet8", num_classes=7), meta)
    line = _line(["eval", str(path), "--config", TEACHER, "--set", "engine.device=cpu"], capsys)
    assert "predicts 7 classes but its recipe's digits data has 10" in line
