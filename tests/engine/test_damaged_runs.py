"""Damaged or foreign run folders: ``--resume``, ``eval``, ``merge`` and ``export`` either do the
right thing (exit 0) or say why not in one line (exit 2), and never change what was saved beyond
what the command is documented to write. docs/errors.md, section "Round three", lists them."""

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normkd.cli import main
from normkd.config import load_recipe
from normkd.engine import run_recipe
from support import DEMO, sets

TEACHER = str(DEMO / "teacher.yaml")
NORM = str(DEMO / "norm.yaml")
TINY = ["student.model=tinycnn", "student.kwargs={width: 8}", "data.n_train=128",
        "optim.epochs=2", "engine.device=cpu", "engine.quiet=true"]  # fmt: skip
FILES = ["config.yaml", "metrics.csv", "last.pt", "best.pt", "model.safetensors", "summary.json",
         "data.json"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three tiny digits runs, made once: a finished teacher run, the same recipe stopped after
    epoch 1 of 2, and a finished NORM distillation from that teacher (the one merge takes)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", TEACHER, "--out-dir", str(out / "fin"), *sets(*TINY)]) == 0
    recipe = load_recipe(TEACHER, [*TINY, f"engine.out_dir={out / 'half'}"])
    run_recipe(recipe, stop_after_epoch=1)
    teacher = out / "fin" / "demo_teacher" / "model.safetensors"
    over = ["teacher.model=tinycnn", "teacher.kwargs={width: 8}", f"teacher.weights={teacher}"]
    assert main(["distill", NORM, "--out-dir", str(out / "norm"), *sets(*TINY, *over)]) == 0
    return {
        "fin": out / "fin" / "demo_teacher",
        "half": out / "half" / "demo_teacher",
        "norm": out / "norm" / "demo_norm",
    }


def _resume_argv(kind: str, parent: Path, runs: dict[str, Path]) -> list[str]:
    if kind == "norm":
        teacher = runs["fin"] / "model.safetensors"
        over = ["teacher.model=tinycnn", "teacher.kwargs={width: 8}", f"teacher.weights={teacher}"]
        return ["distill", NORM, "--resume", "--out-dir", str(parent), *sets(*TINY, *over)]
    return ["train", TEACHER, "--resume", "--out-dir", str(parent), *sets(*TINY)]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _one_line(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normkd: error: "), err
    assert len(lines[0]) <= 2100
    return lines[0]


# A resume that got past its checks rewrites these first (out_dir as given now; the data read);
# what it trained from (last.pt, best.pt, metrics.csv) and a finished run's files stay.
RESUME_WRITES = {"config.yaml", "data.json"}


def _snapshot(run: Path, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, bytes]:
    return {
        f.name: f.read_bytes()
        for f in run.iterdir()
        if f.is_file() and f.name != ".lock" and f.name not in skip
    }


def _copy(run: Path, root: Path) -> Path:
    dst = root / run.parent.name / run.name
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------ the cases the issue names


def test_resume_from_another_runs_checkpoint_is_one_line_and_kept(runs, tmp_path):
    """A NORM run's last.pt (its recipe tag made to match) used to end in torch's 26-line
    state_dict traceback."""
    run = _copy(runs["half"], tmp_path)
    state = torch.load(runs["norm"] / "last.pt", weights_only=True)
    state |= {"recipe": torch.load(run / "last.pt", weights_only=True)["recipe"], "epoch": 1}
    state |= {"best_epoch": 1}
    torch.save(state, run / "last.pt")
    before = _snapshot(run)
    line = _one_line(*_run(_resume_argv("half", run.parent, runs))[::2])
    assert f"{run / 'last.pt'} does not fit the model its recipe builds" in line
    assert _snapshot(run, RESUME_WRITES) == {k: before[k] for k in before if k not in RESUME_WRITES}


def test_merge_after_the_recipe_was_edited_is_one_line(runs, tmp_path):
    run = _copy(runs["norm"], tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("n: 4", "n: 2"))
    before = _snapshot(run)
    line = _one_line(*_run(["merge", str(run), "--out", str(tmp_path / "m.safetensors")])[::2])
    assert (
        "does not fit the model its recipe builds (a checkpoint of another run, or a recipe "
        in line
    )
    assert _snapshot(run) == before and not (tmp_path / "m.safetensors").exists()


def test_garbage_metrics_csv_is_refused_on_resume_and_kept(runs, tmp_path):
    """It used to raise KeyError: 'epoch'."""
    run = _copy(runs["half"], tmp_path)
    (run / "metrics.csv").write_text("garbage\nx,y\n")
    before = _snapshot(run)
    line = _one_line(*_run(_resume_argv("half", run.parent, runs))[::2])
    assert "metrics.csv is not a metrics.csv normkd wrote" in line
    assert _snapshot(run) == before


def test_an_emptied_metrics_csv_never_rewrites_a_finished_runs_summary(runs, tmp_path):
    """A finished run with metrics.csv emptied was 'resumed': exit 0 and summary.json rewritten
    with final top-1 0.00. A finished run is not resumed; without summary.json (killed while
    finishing) it is finished from metrics.csv, which must then read back."""
    run = _copy(runs["fin"], tmp_path)
    (run / "metrics.csv").write_text("")
    before = _snapshot(run)
    line = _one_line(*_run(_resume_argv("fin", run.parent, runs))[::2])
    assert "is finished (2/2 epochs, see its summary.json): nothing to resume" in line
    assert _snapshot(run) == before
    (run / "summary.json").unlink()
    line = _one_line(*_run(_resume_argv("fin", run.parent, runs))[::2])
    assert "metrics.csv is not a metrics.csv normkd wrote" in line
    assert not (run / "summary.json").exists()


def test_a_checkpoint_with_an_absurd_epoch_is_one_line(runs, tmp_path):
    run = _copy(runs["half"], tmp_path)
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save(state | {"epoch": 2**64}, run / "last.pt")
    line = _one_line(*_run(_resume_argv("half", run.parent, runs))[::2])
    assert "is a malformed normkd training checkpoint: epoch 18446744073709551616" in line


# ------------------------------------------------------------------ every damage, every command

DAMAGES = ["delete", "truncate", "garbage", "other run's copy", "empty"]
COMMANDS = ["resume", "eval", "merge", "export"]


def _damage(run: Path, name: str, how: str, runs: dict[str, Path], seed: int) -> None:
    path = run / name
    if how == "delete":
        path.unlink(missing_ok=True)
    elif how == "truncate" and path.exists():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(torch.randint(0, 256, (777,), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.uint8).numpy().tobytes())  # fmt: skip
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "other run's copy":
        other = next(r for k, r in runs.items() if r != run.parent and (r / name).exists()
                     and k != run.parent.name)  # fmt: skip
        shutil.copyfile(other / name, path)


@settings(
    max_examples=14,
    deadline=None,
    derandomize=True,  # the same examples in CI every time: a failure here is a real one
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(["fin", "half", "norm"]),
    name=st.sampled_from(FILES),
    how=st.sampled_from(DAMAGES),
    command=st.sampled_from(COMMANDS),
    seed=st.integers(0, 2**16),
)
def test_a_damaged_run_folder_gets_the_right_result_or_one_line(
    runs, kind, name, how, command, seed
):
    """Damage one file of a finished or half-finished run, then run a command on it: exit 0 with
    the right result, or exit 2 with one line; files that existed are byte-identical afterwards,
    except what the command is documented to write (a resume: the run's own files)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = _copy(runs[kind], root)
        _damage(run, name, how, runs, seed)
        skip = RESUME_WRITES if command == "resume" else set()
        before = _snapshot(run, skip)
        out = root / ("out.onnx" if command == "export" else "out.safetensors")
        argv = {
            "resume": _resume_argv(kind, run.parent, runs),
            "eval": ["eval", str(run)],
            "merge": ["merge", str(run), "--out", str(out)],
            "export": ["export", str(run), "--onnx", str(out)],
        }[command]
        rc, stdout, err = _run(argv)
        if rc != 0:
            _one_line(rc, err)
            assert _snapshot(run, skip) == before
            return
        if command != "resume":
            assert _snapshot(run) == before
            assert command == "eval" or out.is_file()
            return
        # A resume that went on ends as the undamaged run did (bit-identical on CPU).
        want = json.loads((runs["norm" if kind == "norm" else "fin"] / "summary.json").read_text())
        got = json.loads((run / "summary.json").read_text())
        # (a finished run without summary.json re-reads its final top-1 from metrics.csv, which
        # keeps 6 significant digits)
        assert got["final_top1"] == pytest.approx(want["final_top1"], abs=1e-4)
        assert got["epochs"] == 2
        assert f"final top-1 {want['final_top1']:.2f}%" in stdout
