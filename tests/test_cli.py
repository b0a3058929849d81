"""The command line: help, exit codes, merge and ONNX export of a NORM student."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normkd.cli import build_parser, main
from normkd.config import load_recipe
from normkd.engine.checkpoint import load_model_file
from support import DEMO, sets

FAST = ["data.n_train=200", "engine.device=cpu", "optim.epochs=1"]


@pytest.fixture(scope="module")
def norm_run(tmp_path_factory, demo_teacher) -> Path:
    out = tmp_path_factory.mktemp("cli")
    assert (
        main(
            [
                "distill",
                str(DEMO / "norm.yaml"),
                "--out-dir",
                str(out),
                "--quiet",
                *sets(*FAST, "teacher.model=resnet8", f"teacher.weights={demo_teacher}"),
            ]
        )
        == 0
    )
    return out / "demo_norm"


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for cmd in ["demo", "train", "distill", "eval", "merge", "export", "list-models"]:
        assert cmd in text
    sub = subprocess.run(
        [sys.executable, "-m", "normkd", "distill", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--resume" in sub.stdout and "--set" in sub.stdout and "--dry-run" in sub.stdout


def test_merge_command_writes_plain_student_and_reports_difference(norm_run, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(norm_run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max |logit diff|" in text
    merged, meta = load_model_file(out)
    deployed, _ = load_model_file(norm_run / "model.safetensors")
    assert meta["model"] == "resnet8"
    for k, v in deployed.state_dict().items():
        assert torch.allclose(v, merged.state_dict()[k], atol=1e-6), k


def test_export_onnx_matches_pytorch(norm_run, tmp_path, capsys):
    out = tmp_path / "student.onnx"
    assert main(["export", str(norm_run), "--onnx", str(out), "--input-shape", "3,8,8"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "onnxruntime max |logit diff|" in text
    diff = float(text.rsplit(":", 1)[1])
    assert diff < 1e-4


def test_export_takes_the_runs_input_shape_and_labels_the_file(norm_run, tmp_path, capsys):
    """No --input-shape: the run's own (digits: 3x8x8, not the old 3,32,32 default); the ONNX
    file carries the input shape, normalisation and class count a deployment needs."""
    import onnx

    out = tmp_path / "student.onnx"
    assert main(["export", str(norm_run), "--onnx", str(out)]) == 0
    assert "input 3,8,8" in capsys.readouterr().out
    props = {e.key: json.loads(e.value) for e in onnx.load(str(out)).metadata_props}
    data = load_recipe(norm_run / "config.yaml").data
    assert props["input_shape"] == [3, 8, 8] and props["num_classes"] == 10
    assert props["model"] == "resnet8" and len(props["mean"]) == len(props["std"]) == 3
    assert data.kind == "digits" and min(props["std"]) > 0
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, renamed whole


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "nope.yaml"], "recipe not found"),
        (["distill", str(DEMO / "teacher.yaml")], "run it with `normkd train`"),
        (["train", str(DEMO / "teacher.yaml"), "--set", "student.model=foo"], "valid names"),
        (["train", str(DEMO / "teacher.yaml"), "--set", "optim.lr=-1"], "optim.lr"),
        (["eval", "no/such/run"], "no model file"),
        (["merge", "no/such/run", "--out", "x.safetensors"], "not found"),
        (["demo", "--methods", "telepathy"], "unknown demo method"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(
    argv, needle, tmp_path, monkeypatch, capsys
):
    """In process (test_errors runs one through a real process: nothing else reaches stderr)."""
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_the_command_sets_the_task_of_a_recipe_that_names_none(tmp_path, capsys):
    """`normkd train` on a recipe without `task:` trains (no teacher needed); a recipe that
    names the other task is still refused with the command to use."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "name: mine\nstudent: {model: tinycnn, kwargs: {width: 4}}\nloss: [{kind: ce}]\n"
        "data: {kind: digits, n_train: 64}\noptim: {epochs: 1, milestones: []}\n"
        f"engine: {{device: cpu, quiet: true, out_dir: {tmp_path}}}\n"
    )
    assert main(["train", str(recipe)]) == 0
    assert (tmp_path / "mine" / "model.safetensors").is_file()
    assert main(["distill", str(recipe), "--dry-run"]) == 2  # distill needs a teacher
    assert "needs a teacher" in capsys.readouterr().err
