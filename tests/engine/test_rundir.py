"""The run directory's guards: one writer at a time, and only finite state is ever written."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normkd.cli import main
from normkd.config import load_recipe
from normkd.engine import run_recipe
from normkd.engine.checkpoint import load_checkpoint, load_model_file, save_checkpoint
from normkd.engine.rundir import NonFiniteStateError
from support import DEMO, sets

# A tiny CPU run: BN-free students start and finish in a couple of seconds.
TINY = [
    "student.model=tinycnn",
    "student.kwargs={width: 8}",
    "data.n_train=128",
    "optim.epochs=2",
    "engine.device=cpu",
]


def _train(out: Path) -> list[str]:
    return [sys.executable, "-m", "normkd", "train", str(DEMO / "teacher.yaml"), "--out-dir",
            str(out), "--quiet", *sets(*TINY)]  # fmt: skip


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path, capsys):
    """While a process holds the run directory, another writer exits 2 with one line naming the
    holder; once the holder dies (kill -9: no cleanup), the directory is free again."""
    run = tmp_path / "demo_teacher"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from normkd.engine.rundir import RunLock;"
            f"RunLock(Path({str(run)!r})).acquire(); print('locked', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        argv = ["train", str(DEMO / "teacher.yaml"), "--out-dir", str(tmp_path), "--quiet"]
        assert main([*argv, *sets(*TINY)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"run directory {run} is being written by pid {holder.pid} on " in err
        assert not (run / "config.yaml").exists()  # the refused writer wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert main([*argv, *sets(*TINY)]) == 0  # a dead holder's lock is gone with it


def test_two_writers_started_together_one_wins_the_other_gets_one_line(tmp_path):
    """Started at the same moment: one run completes, the other exits 2 with one line
    (refused by the lock, or by the finished run it finds), and the winner's files are whole."""
    for trial in range(1):
        out = tmp_path / f"t{trial}"
        procs = [subprocess.Popen(_train(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]  # fmt: skip
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        loser = next(err for code, err in results if code == 2).strip()
        assert len(loser.splitlines()) == 1 and "Traceback" not in loser, loser
        assert "is being written by" in loser or "already holds a run" in loser, loser
        run = out / "demo_teacher"
        assert load_checkpoint(run / "last.pt")["epoch"] == 2
        model, _meta = load_model_file(run / "model.safetensors")
        assert sum(p.numel() for p in model.parameters()) > 0


def test_a_non_finite_state_is_never_written_even_with_a_finite_loss(tmp_path):
    """BatchNorm statistics can overflow while the training loss stays finite (batch statistics
    are used in training): the engine refuses to checkpoint such a state and keeps last.pt."""
    over = ["student.model=resnet8", "data.n_train=128", "optim.epochs=3", "engine.device=cpu",
            "engine.quiet=true", f"engine.out_dir={tmp_path}"]  # fmt: skip
    recipe = load_recipe(DEMO / "teacher.yaml", over)
    run_recipe(recipe, stop_after_epoch=1)
    last = tmp_path / "demo_teacher" / "last.pt"
    state = load_checkpoint(last)
    state["distiller"]["student.bn1.running_var"].fill_(float("inf"))
    save_checkpoint(last, state)
    before = last.read_bytes()
    rows_before = (tmp_path / "demo_teacher" / "metrics.csv").read_text()
    with pytest.raises(NonFiniteStateError, match=r"non-finite in epoch 2 \(student\.bn1\."):
        run_recipe(recipe, resume=True)
    assert last.read_bytes() == before
    assert (tmp_path / "demo_teacher" / "metrics.csv").read_text() == rows_before
    assert not (tmp_path / "demo_teacher" / "model.safetensors").exists()
    assert (
        os.path.getsize(last) > 0
        and torch.isinf(load_checkpoint(last)["distiller"]["student.bn1.running_var"]).all()
    )


def test_epochs_are_counted_from_1_wherever_a_user_reads_them(tmp_path, capsys):
    """The CLI's done line, summary.json, metrics.csv and the checkpoints name the same epoch."""
    argv = ["train", str(DEMO / "teacher.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    assert main([*argv, *sets(*TINY)]) == 0
    said = int(capsys.readouterr().out.split("(epoch ", 1)[1].split(")", 1)[0])
    run = tmp_path / "demo_teacher"
    summary = json.loads((run / "summary.json").read_text())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    best_row = max(rows, key=lambda r: (float(r["val_top1"]), -int(r["epoch"])))
    assert said == summary["best_epoch"] == int(best_row["epoch"]) >= 1
    assert load_checkpoint(run / "best.pt")["epoch"] == said
    assert load_checkpoint(run / "best.pt")["best_epoch"] == said


def test_a_run_that_fails_while_it_is_built_leaves_no_folder_behind(tmp_path, capsys):
    """A start that fails before writing anything (here: the teacher's weights are missing)
    removes the run folder its lock made; a folder that was there before is kept."""
    argv = ["distill", str(DEMO / "kd.yaml"), "--out-dir", str(tmp_path), "--quiet", *sets(*TINY)]
    missing = "teacher.weights=" + str(tmp_path / "absent.safetensors")
    assert main([*argv, "--set", missing]) == 2
    assert "absent.safetensors" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "demo_kd"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main([*argv, "--set", missing]) == 2
    assert sorted(p.name for p in kept.iterdir()) == [".lock", "notes.txt"]
