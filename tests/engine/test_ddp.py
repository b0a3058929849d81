"""torchrun / DDP on the CPU (gloo): 2 processes equal 1, a killed 2-process run resumes, the
deployable model of a 2-process NORM run is the merged plain student, evaluation is sharded over
ranks without changing the numbers, and settings that cannot work under torchrun are refused.

The digits runs use a BatchNorm-free student and FT (``tinycnn`` with ``norm: none``, FT with
``bn: false``): per-sample gradients then do not depend on how the global batch is split over
processes, so 1 and 2 processes must agree to float rounding. (With BatchNorm they differ by design
unless SyncBatchNorm is used, which PyTorch only offers on GPUs.)
"""

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from normkd.cli import main
from normkd.config import load_recipe
from normkd.engine import evaluate
from normkd.engine.checkpoint import load_checkpoint, load_model_file
from normkd.models import create_model
from normkd.norm import FTStudent, merge_ft
from support import build_job, write_image_folder

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"
KILL_EPOCHS = 6  # epochs take ~0.1 s on 2 CPU cores: room to kill after epoch 1, before the end


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_teacher")
    assert (
        main(
            [
                "train",
                str(DEMO / "teacher.yaml"),
                "--out-dir",
                str(out),
                "--quiet",
                *_sets(
                    "student.model=tinycnn",
                    "optim.epochs=1",
                    "data.n_train=256",
                    "engine.device=cpu",
                ),
            ]
        )
        == 0
    )
    return out / "demo_teacher" / "model.safetensors"


def _student_sets(teacher: Path, epochs: int = 3) -> list[str]:
    return _sets(
        "teacher.model=tinycnn",
        f"teacher.weights={teacher}",
        "student.model=tinycnn",
        "student.kwargs={norm: none, width: 8}",
        f"optim.epochs={epochs}",
        "data.n_train=256",
        "data.batch_size=64",
        "engine.device=cpu",
        "engine.amp=off",  # 1 vs 2 processes to 1e-5: bf16 rounding of two sums differs more
        "loss.2.bn=false",
    )


def _launch(nproc: int, out: Path, teacher: Path, *extra: str, epochs: int = 3):
    return _torchrun(nproc, out, *_student_sets(teacher, epochs), *extra)


def _torchrun(nproc: int, out: Path, *args: str, recipe: str = "norm_kd.yaml"):
    """``torchrun -m normkd distill DEMO/recipe --out-dir OUT --quiet ARGS`` in its own session."""
    return _torchrun_target(
        nproc,
        ["-m", "normkd", "distill", str(DEMO / recipe), "--out-dir", str(out), "--quiet"],
        args,
    )


# Each rank's own figures: the CLI prints and writes rank 0's only.
RANK_FIGURES = """
import json, os, sys
from pathlib import Path
from normkd.config import load_recipe
from normkd.engine import run_recipe

result = run_recipe(load_recipe(sys.argv[1], sys.argv[3:]))
keep = ("epochs", "best_top1", "best_epoch", "final_top1", "final_top5", "ft_top1", "merged_top1")
figures = {k: getattr(result, k) for k in keep}
# images_per_s is each rank's own clock
figures["history"] = [{k: v for k, v in r.items() if k != "images_per_s"} for r in result.history]
Path(sys.argv[2], f"rank{os.environ['RANK']}.json").write_text(json.dumps(figures))
"""


def _torchrun_target(nproc: int, target: list[str], args: tuple[str, ...] | list[str]):
    """``torchrun [--nproc_per_node ...] TARGET ARGS`` in its own session."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        "--master_addr=127.0.0.1",
        *target,
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _children(pid: int) -> list[int]:
    """Ids of the processes whose parent is ``pid`` (read from Linux's /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, teacher) -> Path:
    """Run directory of a 2-process NORM+KD run of KILL_EPOCHS epochs, never stopped: the 1-vs-2
    process comparison and the killed run's reference both read it."""
    out = tmp_path_factory.mktemp("two")
    proc = _launch(2, out, teacher, epochs=KILL_EPOCHS)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    # Only one run directory was written by the two ranks.
    assert [p.name for p in out.iterdir()] == ["demo_norm_kd"]
    return out / "demo_norm_kd"


def test_two_processes_equal_one(tmp_path, teacher, two_process_run):
    one = tmp_path / "one"
    argv = ["distill", str(DEMO / "norm_kd.yaml"), "--out-dir", str(one), "--quiet"]
    assert main([*argv, *_student_sets(teacher, KILL_EPOCHS)]) == 0
    a = load_checkpoint(one / "demo_norm_kd" / "last.pt")["distiller"]
    b = load_checkpoint(two_process_run / "last.pt")["distiller"]
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(f"max |weight diff| 1 vs 2 processes after {KILL_EPOCHS} epochs: {worst:.2e}")
    assert worst <= 1e-5
    ra, rb = _rows(one / "demo_norm_kd"), _rows(two_process_run)
    assert len(ra) == len(rb) == KILL_EPOCHS  # one line per epoch, written once
    for x, y in zip(ra, rb):
        for col in ("ce", "kd", "norm", "loss", "val_top1"):
            assert float(x[col]) == pytest.approx(float(y[col]), rel=1e-5, abs=1e-6), col


def test_killed_two_process_run_resumes_to_the_same_weights(tmp_path, teacher, two_process_run):
    """kill -9 of the whole torchrun job (launcher and both workers) after epoch 1; --resume must
    end where a run that was never stopped ends. The kill must land before the run finished, or
    nothing was resumed."""
    run = tmp_path / "cut" / "demo_norm_kd"
    proc = _launch(2, tmp_path / "cut", teacher, epochs=KILL_EPOCHS)
    deadline = time.time() + 240
    # last.pt appears (renamed into place whole) after epoch 1; a stat is all the poll costs, so
    # the kill follows quickly even on a loaded machine.
    while time.time() < deadline and proc.poll() is None and not (run / "last.pt").exists():
        time.sleep(0.01)
    # torchrun starts each worker in a session of its own: kill them by pid, then the launcher.
    workers = _children(proc.pid)
    for pid in [*workers, -proc.pid]:
        with contextlib.suppress(ProcessLookupError):  # the run may have ended on its own
            os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert (run / "last.pt").exists(), out
    done = load_checkpoint(run / "last.pt")["epoch"]
    print(f"killed after epoch {done} of {KILL_EPOCHS}")
    assert 1 <= done < KILL_EPOCHS, f"the kill landed after epoch {done} of {KILL_EPOCHS}: {out}"
    assert not (run / "model.safetensors").exists(), "the killed run had already finished"
    assert len(workers) == 2, out
    resumed = _launch(2, tmp_path / "cut", teacher, "--resume", epochs=KILL_EPOCHS)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    a = load_checkpoint(two_process_run / "last.pt")["distiller"]
    b = load_checkpoint(run / "last.pt")["distiller"]
    for k in a:
        assert torch.equal(a[k], b[k]), (k, done)
    assert [int(r["epoch"]) for r in _rows(run)] == list(range(1, KILL_EPOCHS + 1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder root with train/ and val/, model.safetensors of a tinycnn teacher on it).

    6 val images: divisible by 2, so DistributedSampler pads no duplicate into the 2-rank eval.
    """
    tmp = tmp_path_factory.mktemp("ddp_folder")
    root = write_image_folder(tmp / "images", classes=3, size=20, split=(8, 2))
    argv = ["train", str(DEMO / "teacher.yaml"), "--out-dir", str(tmp), "--quiet"]
    assert main([*argv, *_sets(*_folder_sets(root), "student.model=tinycnn")]) == 0
    return root, tmp / "demo_teacher" / "model.safetensors"


def _folder_sets(root: Path) -> list[str]:
    return [
        "data.kind=folder",
        f"data.root={root}",
        "data.image_size=16",
        "data.workers=0",
        "data.batch_size=8",
        "data.eval_batch_size=2",
        "optim.epochs=2",
        "engine.device=cpu",
    ]


def test_two_process_norm_run_with_ft_batchnorm_deploys_the_merged_student(tmp_path, folder):
    """One 2-process NORM run on an image folder (a DataLoader with a DistributedSampler), FT
    with BatchNorm, started as the CLI starts it (load_recipe, run_recipe) by a script that also
    keeps each rank's own figures, checked three times over:

    - model.safetensors is the plain student (no FT keys) whose logits are merge_ft of the FT
      student restored from last.pt: rank 0 merges what DDP trained, not a copy or the FT model.
    - the reported test accuracy and loss, measured on per-rank shards of the val set and summed
      over ranks, equal a 1-process evaluation on the whole val set.
    - every rank computed the same figures (epoch means, evaluation, best epoch, merged top-1)
      as rank 0, which alone writes them: ranks that disagree take different branches.
    """
    root, teacher_file = folder
    script = tmp_path / "rank_figures.py"
    script.write_text(RANK_FIGURES)
    overrides = [
        *_folder_sets(root),
        "teacher.model=tinycnn",
        f"teacher.weights={teacher_file}",
        "student.model=tinycnn",
        "student.kwargs={width: 8}",
        "loss.2.bn=true",
        f"engine.out_dir={tmp_path}",
        "engine.quiet=true",
    ]
    target = [str(script), str(DEMO / "norm_kd.yaml"), str(tmp_path)]
    proc = _torchrun_target(2, target, overrides)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    run = tmp_path / "demo_norm_kd"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["epochs"] == 2 and len(ranks[0]["history"]) == 2
    assert ranks[1] == ranks[0]

    model, meta = load_model_file(run / "model.safetensors")
    fresh = create_model("tinycnn", num_classes=3, width=8)
    assert set(load_file(run / "model.safetensors")) == set(fresh.state_dict())
    assert meta["merged_from_ft"]

    recipe = load_recipe(run / "config.yaml")
    job = build_job(recipe)
    data = job.data
    assert len(data.test.dataset) == 6
    job.distiller.load_state_dict(load_checkpoint(run / "last.pt")["distiller"])
    ft = job.student.eval()
    assert isinstance(ft, FTStudent) and any(
        isinstance(m, torch.nn.BatchNorm2d) for m in ft.ft.modules()
    )
    x = torch.cat([b[0] for b in data.test])
    with torch.no_grad():
        torch.testing.assert_close(model(x), merge_ft(ft).eval()(x), rtol=0, atol=1e-5)

    whole_ft = evaluate(ft, data.test, torch.device("cpu"))
    whole_model = evaluate(model, data.test, torch.device("cpu"))
    last = _rows(run)[-1]
    summary = json.loads((run / "summary.json").read_text())
    # metrics.csv holds 6 significant digits; summary.json the exact value. The loss also tells
    # whether every rank evaluated rank 0's model: after the last step each rank holds its own
    # BatchNorm running statistics, so unless they are synced before evaluation the shards are
    # scored by slightly different models (the top-1 of 6 images can hide that, the loss cannot).
    assert float(last["val_top1"]) == pytest.approx(whole_ft["top1"], rel=1e-5)
    assert float(last["val_loss"]) == pytest.approx(whole_ft["loss"], rel=1e-5)
    assert summary["final_top1"] == pytest.approx(whole_ft["top1"], abs=1e-9)
    assert summary["merged_top1"] == pytest.approx(whole_model["top1"], abs=1e-9)
    assert summary["merged_top1"] == ranks[0]["merged_top1"]
    assert summary["best_top1"] == ranks[0]["best_top1"]


def test_sync_bn_on_cpu_is_refused_under_torchrun(tmp_path, teacher):
    """PyTorch has no CPU SyncBatchNorm: every rank must stop with the one-line user error (exit
    code 2, as any normkd user error) instead of a traceback or a silently unsynced run.

    The ranks are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_* set), without
    the launcher, so each process's own exit code is seen.
    """
    port = str(_free_port())
    argv = [sys.executable, "-m", "normkd", "distill", str(DEMO / "norm_kd.yaml")]
    argv += ["--out-dir", str(tmp_path), "--quiet", *_student_sets(teacher, epochs=1)]
    argv += _sets("engine.sync_bn=true")
    procs = [
        subprocess.Popen(
            argv,
            env=dict(
                os.environ,
                OMP_NUM_THREADS="1",
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (rank, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "engine.sync_bn needs CUDA" in lines[0], (rank, err)
    assert not (tmp_path / "demo_norm_kd" / "last.pt").exists()


def test_cuda_index_is_refused_under_torchrun(tmp_path, teacher, monkeypatch, capsys):
    """Under torchrun each rank takes cuda:LOCAL_RANK, so a fixed cuda:N is refused before any
    process group exists (MASTER_ADDR unset: creating one would fail instead of exiting 2)."""
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    argv = ["distill", str(DEMO / "norm_kd.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    rc = main([*argv, *_student_sets(teacher, epochs=1), *_sets("engine.device=cuda:1")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "under torchrun use 'auto' or 'cuda'" in lines[0], err
    assert not dist.is_initialized()
    assert list(tmp_path.iterdir()) == []
