"""Bad inputs through the CLI: one line on stderr, exit code 2, no traceback, nothing saved lost.

docs/errors.md lists every case with the test that covers it; keep the two in step.
"""

import csv
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normkd.cli import main
from normkd.config import load_recipe, recipe_from_dict
from normkd.data.build import Data
from normkd.engine import run_recipe
from normkd.engine.checkpoint import load_checkpoint, save_checkpoint, save_model
from normkd.errors import ConfigError, UserError
from normkd.models import create_model
from support import build_job

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
TEACHER = str(DEMO / "teacher.yaml")  # task: train, no teacher needed
NORM = str(DEMO / "norm.yaml")  # task: distill with CE + NORM
FAST = ["student.model=resnet8", "data.n_train=200", "engine.device=cpu"]


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _one_line_exit_2(argv: list[str], capsys) -> str:
    """Run the CLI in-process; assert the user-error contract and return the message line."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("normkd: error: ")
    return lines[0]


class _Evil:
    """Unpickling this runs code: it creates ``marker``. normkd must refuse before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Files:
    """Bad files and folders, each made on demand under the test's tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root / "code-ran"

    def out(self) -> str:
        return str(self.root / "runs")

    def model_file(self, model: str = "resnet8") -> Path:
        path = self.root / f"{model}.safetensors"
        meta = {"model": model, "num_classes": 10, "kwargs": {}, "recipe": "x"}
        save_model(path, create_model(model, num_classes=10), meta)
        return path

    def truncated_pth(self) -> Path:
        path = self.root / "truncated.pth"
        torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
        return path

    def truncated_safetensors(self) -> Path:
        path = self.model_file()
        path.write_bytes(path.read_bytes()[:-100])
        return path

    def evil_pth(self) -> Path:
        path = self.root / "evil.pth"
        path.write_bytes(pickle.dumps({"model": _Evil(self.marker)}))
        return path

    def bad_meta(self) -> Path:
        from safetensors.torch import load_file, save_file

        path = self.model_file()
        save_file(load_file(path), str(path), metadata={"normkd": '{"model": "resnet8"}'})
        return path

    def foreign_safetensors(self) -> Path:
        from safetensors.torch import save_file

        path = self.root / "foreign.safetensors"
        save_file(create_model("resnet8", num_classes=10).state_dict(), str(path))
        return path

    def corrupt_cifar(self) -> Path:
        folder = self.root / "cifar" / "cifar-100-python"
        folder.mkdir(parents=True)
        for name in ("train", "test", "meta"):
            (folder / name).write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00data")  # cut short
        return folder.parent

    def empty_imagefolder(self) -> Path:
        for split in ("train", "val"):
            (self.root / "imagenet" / split / "n01440764").mkdir(parents=True)
        return self.root / "imagenet"

    def regular_file(self) -> Path:
        path = self.root / "file.txt"
        path.write_text("not a folder")
        return path


# (id, argv from Files, text the one line must contain). docs/errors.md rows 1-20 point here.
CASES = [
    ("unknown-key", lambda f: ["train", TEACHER, *_sets("optim.lrr=1")], "optim.lrr: unknown key"),
    (
        "wrong-type",
        lambda f: ["train", TEACHER, *_sets("optim.epochs=abc")],
        "optim.epochs: Input should be a valid integer",
    ),
    (
        "section-not-a-mapping",
        lambda f: ["train", TEACHER, *_sets("optim=5")],
        "optim: Input should be a valid dictionary",
    ),
    (
        "n-below-1",
        lambda f: ["distill", NORM, "--dry-run", *_sets("loss.1.n=0")],
        "loss.1.n: Input should be greater than 0",
    ),
    (
        "negative-weight",
        lambda f: ["distill", NORM, "--dry-run", *_sets("loss.1.weight=-0.5")],
        "loss.1.weight: Input should be greater than or equal to 0",
    ),
    (
        "infinite-lr",
        lambda f: ["train", TEACHER, *_sets("optim.lr=.inf")],
        "optim.lr: Input should be a finite number",
    ),
    (
        "model-kwargs-do-not-fit",
        lambda f: ["train", TEACHER, "--dry-run", *_sets(*FAST, "student.kwargs.dropout=0.1")],
        "student.kwargs {'dropout': 0.1} do not fit model 'resnet8'",
    ),
    (
        "malformed-set",
        lambda f: ["train", TEACHER, "--set", "optim.lr"],
        "--set expects key=value, got 'optim.lr'",
    ),
    (
        "missing-cifar-folder",
        lambda f: [
            "train",
            TEACHER,
            "--out-dir",
            f.out(),
            *_sets(*FAST, "data.kind=cifar100", f"data.root={f.root / 'nowhere'}"),
        ],
        "does not exist: expected",
    ),
    (
        "corrupt-cifar-files",
        lambda f: [
            "train",
            TEACHER,
            "--out-dir",
            f.out(),
            *_sets(*FAST, "data.kind=cifar100", f"data.root={f.corrupt_cifar()}"),
        ],
        "corrupt CIFAR-100 file",
    ),
    (
        "missing-imagenet-folder",
        lambda f: [
            "train",
            TEACHER,
            "--out-dir",
            f.out(),
            *_sets(*FAST, "data.kind=imagenet", f"data.root={f.root / 'nowhere'}"),
        ],
        "ImageNet root",
    ),
    (
        "empty-imagefolder",
        lambda f: [
            "train",
            TEACHER,
            "--out-dir",
            f.out(),
            *_sets(
                *FAST, "data.kind=imagenet", "data.workers=0", f"data.root={f.empty_imagefolder()}"
            ),
        ],
        "has no images",
    ),
    (
        "teacher-of-another-architecture",
        lambda f: [
            "distill",
            NORM,
            "--dry-run",
            *_sets(*FAST, "teacher.model=resnet8x4", f"teacher.weights={f.model_file('resnet8')}"),
        ],
        "teacher.weights: checkpoint",
    ),
    (
        "truncated-teacher-checkpoint",
        lambda f: [
            "distill",
            NORM,
            "--dry-run",
            *_sets(*FAST, "teacher.model=resnet8", f"teacher.weights={f.truncated_pth()}"),
        ],
        "(corrupt or truncated?)",
    ),
    (
        "missing-teacher-checkpoint",
        lambda f: [
            "distill",
            NORM,
            "--out-dir",
            f.out(),
            *_sets(*FAST, "teacher.model=resnet8", f"teacher.weights={f.root / 'nope.pt'}"),
        ],
        "teacher.weights: checkpoint not found",
    ),
    (
        "pickle-with-code-as-teacher",
        lambda f: [
            "distill",
            NORM,
            "--dry-run",
            *_sets(*FAST, "teacher.model=resnet8", f"teacher.weights={f.evil_pth()}"),
        ],
        "refused to load",
    ),
    (
        "eval-truncated-model-file",
        lambda f: ["eval", str(f.truncated_safetensors()), "--config", TEACHER],
        "as safetensors",
    ),
    (
        "eval-model-file-with-bad-metadata",
        lambda f: ["eval", str(f.bad_meta()), "--config", TEACHER],
        "normkd metadata must be JSON with model",
    ),
    (
        "eval-foreign-safetensors",
        lambda f: ["eval", str(f.foreign_safetensors()), "--config", TEACHER],
        "has no normkd metadata",
    ),
    (
        "unwritable-run-directory",
        lambda f: [
            "train",
            TEACHER,
            "--quiet",
            "--out-dir",
            str(f.regular_file() / "run"),
            *_sets(*FAST, "optim.epochs=1"),
        ],
        "cannot write to run directory",
    ),
    (
        "resume-without-checkpoint",
        lambda f: ["train", TEACHER, "--resume", "--out-dir", f.out(), *_sets(*FAST)],
        "--resume: no checkpoint",
    ),
]


@pytest.mark.parametrize("case,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_2(case, argv, needle, tmp_path, capsys):
    files = Files(tmp_path)
    line = _one_line_exit_2(argv(files), capsys)
    assert needle in line
    assert not files.marker.exists(), "code from a pickle ran"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_through_a_real_process_stderr_holds_only_the_line(tmp_path):
    """In a real process nothing else reaches stderr (torch warns on plain pickles, for one)."""
    files = Files(tmp_path)
    argv = CASES[[c[0] for c in CASES].index("pickle-with-code-as-teacher")][1](files)
    proc = subprocess.run(
        [sys.executable, "-m", "normkd", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("normkd: error: teacher.weights: refused to load")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not files.marker.exists()


# ------------------------------------------------------------------ errors inside a run directory

RUN_SETS = [*FAST, "optim.epochs=3", "engine.quiet=true"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run directory whose last.pt holds epoch 1 of 3 (as after a stop)."""
    out = tmp_path_factory.mktemp("stopped")
    run_recipe(load_recipe(TEACHER, [*RUN_SETS, f"engine.out_dir={out}"]), stop_after_epoch=1)
    return out / "demo_teacher"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def _resume(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", TEACHER, "--resume", "--out-dir", str(tmp_path), *_sets(*RUN_SETS, *extra)]


def test_truncated_last_checkpoint_is_refused_and_kept(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = last.read_bytes()
    line = _one_line_exit_2(_resume(tmp_path), capsys)
    assert f"cannot read checkpoint {last} (corrupt or truncated?)" in line
    assert last.read_bytes() == before and (run / "best.pt").is_file()


def test_pickle_with_code_as_last_checkpoint_is_refused_not_run(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    marker = tmp_path / "code-ran"
    (run / "last.pt").write_bytes(pickle.dumps({"format": _Evil(marker)}))
    line = _one_line_exit_2(_resume(tmp_path), capsys)
    assert "refused to load" in line and "objects other than tensors" in line
    assert not marker.exists()


def test_a_weights_file_as_last_checkpoint_is_refused_and_kept(stopped_run, tmp_path, capsys):
    """A plain state dict saved as last.pt (e.g. a model's weights copied over it) has no
    training state: resume refuses it by its missing format tag, and leaves it as it was."""
    run = _copy(stopped_run, tmp_path)
    torch.save({"epoch": 1, "weights": torch.ones(3)}, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    line = _one_line_exit_2(_resume(tmp_path), capsys)
    assert f"{run / 'last.pt'} is not a normkd training checkpoint" in line
    assert (run / "last.pt").read_bytes() == before


def test_resume_with_another_recipe_is_refused(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    before = (run / "last.pt").read_bytes()
    line = _one_line_exit_2(_resume(tmp_path, "optim.lr=0.5"), capsys)
    assert "the recipe differs from the one" in line
    assert (run / "last.pt").read_bytes() == before


def test_non_finite_loss_names_the_term_and_keeps_the_last_good_checkpoint(
    stopped_run, tmp_path, capsys
):
    run = _copy(stopped_run, tmp_path)
    state = load_checkpoint(run / "last.pt")
    state["distiller"]["student.fc.weight"].fill_(float("nan"))  # epoch 2's loss is NaN
    save_checkpoint(run / "last.pt", state)
    before = {f: (run / f).read_bytes() for f in ("last.pt", "best.pt")}
    line = _one_line_exit_2(_resume(tmp_path), capsys)
    assert "loss term(s) ce became non-finite at epoch 2, step 1" in line
    assert "the last good checkpoint is kept" in line
    assert {f: (run / f).read_bytes() for f in before} == before
    with open(run / "metrics.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1]
    assert not (run / "model.safetensors").exists()


# ------------------------------------------------------------------ below the CLI


def test_norm_with_a_non_integer_map_ratio_is_a_config_error():
    # On 12x12 inputs resnet8's last map is 3x3 and ShuffleV1's 2x2: no integer pooling ratio.
    recipe = recipe_from_dict(
        {
            "name": "r",
            "teacher": {"model": "resnet8"},
            "student": {"model": "ShuffleV1"},
            "loss": [{"kind": "ce"}, {"kind": "norm", "n": 2}],
        }
    )
    with pytest.raises(ConfigError) as info:
        build_job(recipe, untrained_teacher=True, data=Data(None, None, 10, (3, 12, 12)))
    assert str(info.value) == (
        "teacher resnet8 last map is 3x3 and student ShuffleV1 last map is 2x2 for 12x12 "
        "inputs: NORM needs an integer size ratio"
    )


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from normkd.engine import checkpoint

    good = {"epoch": 1, "distiller": {"w": torch.ones(3)}, "optimizer": {}}
    good |= {"best_top1": 0.0, "best_epoch": 0, "recipe": {}}
    save_checkpoint(tmp_path / "last.pt", good)
    before = (tmp_path / "last.pt").read_bytes()

    def disk_full(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(UserError, match=r"cannot write .*last.pt: No space left on device"):
        save_checkpoint(tmp_path / "last.pt", {**good, "epoch": 2})
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(UserError, match="cannot write"):
        save_checkpoint(tmp_path / "last.pt" / "x.pt", good)  # a folder under a file
