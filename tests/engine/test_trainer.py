"""The engine end to end on the embedded digits set: artifacts, merge, resume, errors."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from normkd.cli import main
from normkd.config import load_recipe
from normkd.engine import run_recipe
from normkd.engine.checkpoint import load_checkpoint, load_model_file
from support import DEMO, FAST, sets


@pytest.fixture
def teacher_file(demo_teacher: Path) -> Path:
    """The session's resnet8 demo teacher (tests/conftest.py)."""
    return demo_teacher


def _recipe(name: str, out: Path, teacher: Path, *extra: str):
    return load_recipe(
        DEMO / f"{name}.yaml",
        [
            *FAST,
            f"engine.out_dir={out}",
            "teacher.model=resnet8",
            f"teacher.weights={teacher}",
            "optim.epochs=3",
            *extra,
        ],
    )


def test_distill_cli_writes_every_artifact(tmp_path, teacher_file, capsys):
    rc = main(
        [
            "distill",
            str(DEMO / "norm_kd.yaml"),
            "--out-dir",
            str(tmp_path),
            "--quiet",
            *sets(
                *FAST, "teacher.model=resnet8", f"teacher.weights={teacher_file}", "optim.epochs=2"
            ),
        ]
    )
    assert rc == 0
    run = tmp_path / "demo_norm_kd"
    for f in [
        "config.yaml",
        "metrics.csv",
        "last.pt",
        "best.pt",
        "model.safetensors",
        "summary.json",
        "data.json",
    ]:
        assert (run / f).is_file(), f
    assert any((run / "tb").glob("events.out.tfevents.*"))
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for col in [
        "ce",
        "kd",
        "norm",
        "loss",
        "train_top1",
        "val_top1",
        "val_top5",
        "lr",
        "images_per_s",
    ]:
        assert col in rows[0], col
    summary = json.loads((run / "summary.json").read_text())
    # The deployed (merged) student scores exactly as the FT student it came from.
    assert summary["merged_top1"] == pytest.approx(summary["ft_top1"], abs=1e-9)
    assert summary["ft_form"] == "map"  # a CNN student: FT after its last conv map
    assert summary["merge_max_logit_diff"] < 1e-4
    # It is the plain architecture: same keys as a fresh resnet8, no FT parameters.
    model, meta = load_model_file(run / "model.safetensors")
    assert meta["model"] == "resnet8" and meta["merged_from_ft"]
    assert set(load_file(run / "model.safetensors")) == set(model.state_dict())
    assert not any("ft." in k for k in load_file(run / "model.safetensors"))
    data = json.loads((run / "data.json").read_text())
    assert len(data["train_indices"]) == 300
    out = capsys.readouterr().out
    assert "merged student top-1" in out
    # `normkd eval` on the run directory reproduces the final accuracy.
    assert main(["eval", str(run)]) == 0
    assert f"top-1 {summary['final_top1']:.2f}%" in capsys.readouterr().out


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, teacher_file):
    full = run_recipe(_recipe("norm_kd", tmp_path, teacher_file, "engine.run_name=full"))
    part = _recipe("norm_kd", tmp_path, teacher_file, "engine.run_name=part")
    run_recipe(part, stop_after_epoch=1)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    resumed = run_recipe(part, resume=True)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["distiller"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["distiller"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.final_top1 == full.final_top1
    with open(tmp_path / "part" / "metrics.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]


def test_different_seeds_give_different_runs(tmp_path, teacher_file):
    a = run_recipe(_recipe("kd", tmp_path, teacher_file, "engine.run_name=a", "engine.seed=0"))
    b = run_recipe(_recipe("kd", tmp_path, teacher_file, "engine.run_name=b", "engine.seed=1"))
    wa = load_checkpoint(tmp_path / "a" / "last.pt")["distiller"]
    wb = load_checkpoint(tmp_path / "b" / "last.pt")["distiller"]
    assert not torch.equal(wa["student.conv1.weight"], wb["student.conv1.weight"])
    assert a.history[0]["loss"] != b.history[0]["loss"]


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, teacher_file, capsys):
    args = [
        "distill",
        str(DEMO / "kd.yaml"),
        "--out-dir",
        str(tmp_path),
        "--quiet",
        *sets(*FAST, "teacher.model=resnet8", f"teacher.weights={teacher_file}", "optim.epochs=1"),
    ]
    assert main(args) == 0
    before = (tmp_path / "demo_kd" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "Traceback" not in err
    assert (tmp_path / "demo_kd" / "model.safetensors").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_distill_without_teacher_weights_is_a_user_error(tmp_path, capsys):
    rc = main(
        [
            "distill",
            str(DEMO / "kd.yaml"),
            "--out-dir",
            str(tmp_path),
            "--quiet",
            "--set",
            "teacher.weights=null",
        ]
    )
    assert rc == 2
    assert "teacher.weights" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, teacher_file):
    from normkd.engine import NonFiniteLossError
    from normkd.engine.checkpoint import save_checkpoint

    recipe = _recipe("kd", tmp_path, teacher_file, "engine.run_name=nan")
    run_recipe(recipe, stop_after_epoch=1)
    # Poison the student's weights in the saved state: the next epoch's losses are inf/NaN.
    state = load_checkpoint(tmp_path / "nan" / "last.pt")
    state["distiller"]["student.fc.weight"].fill_(float("inf"))
    save_checkpoint(tmp_path / "nan" / "last.pt", state)
    poisoned = (tmp_path / "nan" / "last.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"loss term\(s\) ce, kd became non-finite"):
        run_recipe(recipe, resume=True)
    assert (tmp_path / "nan" / "last.pt").read_bytes() == poisoned
    with open(tmp_path / "nan" / "metrics.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1]
