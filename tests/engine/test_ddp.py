"""torchrun / DDP on the CPU (gloo): 2 processes equal 1, and a killed 2-process run resumes.

The student and its FT are BatchNorm-free (``tinycnn`` with ``norm: none``, FT with ``bn: false``): per-sample gradients then do not
depend on how the global batch is split over processes, so 1 and 2 processes must agree to float
rounding. (With BatchNorm they differ by design unless SyncBatchNorm is used, which PyTorch only
offers on GPUs.)
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normkd.cli import main
from normkd.engine.checkpoint import load_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"


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
        "loss.2.bn=false",
    )


def _launch(nproc: int, out: Path, teacher: Path, *extra: str, epochs: int = 3):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        "--master_addr=127.0.0.1",
        "-m",
        "normkd",
        "distill",
        str(DEMO / "norm_kd.yaml"),
        "--out-dir",
        str(out),
        "--quiet",
        *_student_sets(teacher, epochs),
        *extra,
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


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_two_processes_equal_one(tmp_path, teacher):
    one = tmp_path / "one"
    assert (
        main(
            [
                "distill",
                str(DEMO / "norm_kd.yaml"),
                "--out-dir",
                str(one),
                "--quiet",
                *_student_sets(teacher),
            ]
        )
        == 0
    )
    proc = _launch(2, tmp_path / "two", teacher)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    a = load_checkpoint(one / "demo_norm_kd" / "last.pt")["distiller"]
    b = load_checkpoint(tmp_path / "two" / "demo_norm_kd" / "last.pt")["distiller"]
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(f"max |weight diff| 1 vs 2 processes after 3 epochs: {worst:.2e}")
    assert worst <= 1e-5
    ra, rb = _rows(one / "demo_norm_kd"), _rows(tmp_path / "two" / "demo_norm_kd")
    assert len(ra) == len(rb) == 3  # one line per epoch, written once
    for x, y in zip(ra, rb):
        for col in ("ce", "kd", "norm", "loss", "test_top1"):
            assert float(x[col]) == pytest.approx(float(y[col]), rel=1e-5, abs=1e-6), col
    # Only one run directory was written by the two ranks.
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["demo_norm_kd"]


def test_killed_two_process_run_resumes_to_the_same_weights(tmp_path, teacher):
    full = _launch(2, tmp_path / "full", teacher)
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out

    run = tmp_path / "cut" / "demo_norm_kd"
    proc = _launch(2, tmp_path / "cut", teacher)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / "last.pt").exists() and load_checkpoint(run / "last.pt")["epoch"] >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(run / "last.pt")["epoch"]
    resumed = _launch(2, tmp_path / "cut", teacher, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    a = load_checkpoint(tmp_path / "full" / "demo_norm_kd" / "last.pt")["distiller"]
    b = load_checkpoint(run / "last.pt")["distiller"]
    for k in a:
        assert torch.equal(a[k], b[k]), (k, done)
    assert [int(r["epoch"]) for r in _rows(run)] == [0, 1, 2]
