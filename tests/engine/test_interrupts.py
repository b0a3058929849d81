"""Runs that are stopped from outside: Ctrl-C, kill -9 mid-epoch, kill -9 mid-checkpoint-write.

Each case runs ``python -m normkd`` (or a checkpoint writer) as a real subprocess and signals it,
then checks that ``last.pt`` is whole and that ``--resume`` ends bit-identical (on CPU) to a run
that was never stopped.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normkd.engine.checkpoint import load_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"
EPOCHS = 6
# Digits, a small BatchNorm student (so resume must restore buffers too), several short epochs.
SETS = [
    "student.model=resnet8",
    "data.n_train=400",
    f"optim.epochs={EPOCHS}",
    "engine.device=cpu",
]
RUN = "demo_teacher"


def _cmd(out: Path, *extra: str) -> list[str]:
    sets = [a for s in SETS for a in ("--set", s)]
    return [
        sys.executable,
        "-m",
        "normkd",
        "train",
        str(DEMO / "teacher.yaml"),
        "--out-dir",
        str(out),
        "--quiet",
        *sets,
        *extra,
    ]


def _default_sigint() -> None:
    """A shell's background job (``pytest &``) starts with SIGINT ignored, and Python then keeps
    it ignored, as a background job should; the run under test must hear Ctrl-C as a terminal's
    foreground job does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=out.parent,
        preexec_fn=_default_sigint,
    )


def _wait_for_first_checkpoint(proc: subprocess.Popen, last: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not last.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before writing {last}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {last} after {timeout} s")
        time.sleep(0.01)


def _finish(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cmd(out, *extra), capture_output=True, text=True, cwd=out.parent, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    a = load_checkpoint(a_path)
    b = load_checkpoint(b_path)
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert a["distiller"].keys() == b["distiller"].keys()
    for k in a["distiller"]:
        assert torch.equal(a["distiller"][k], b["distiller"][k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """last.pt of the same run, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _finish(out)
    return out / RUN / "last.pt"


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 2), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_ctrl_c_or_sigterm_saves_says_where_to_resume_and_exits(tmp_path, reference, sig, code):
    """Ctrl-C exits 2, SIGTERM (what SLURM / Kubernetes send) 143 = 128 + 15; both leave whole
    files, say what last.pt holds, and the resumed run ends bit-identical."""
    out = tmp_path / "runs"
    out.mkdir()
    proc = _start(out)
    last = out / RUN / "last.pt"
    _wait_for_first_checkpoint(proc, last)
    time.sleep(0.05)  # into the next epoch
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    epoch = load_checkpoint(last)["epoch"]  # a whole checkpoint, not a half-written one
    assert 1 <= epoch < EPOCHS, "the run finished before the signal: make the epochs longer"
    assert lines[0] == (
        f"normkd: interrupted; {last} holds epoch {epoch}/{EPOCHS} (the last completed one): "
        "run its recipe again with --resume to continue from there"
    )
    assert not list(last.parent.glob(".*.tmp"))  # an interrupted write cleans up after itself
    assert not (out / RUN / "model.safetensors").exists()

    _finish(out, "--resume")
    _assert_same_weights(reference, last)


def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "runs"
    out.mkdir()
    proc = _start(out)
    last = out / RUN / "last.pt"
    _wait_for_first_checkpoint(proc, last)
    time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    epoch = load_checkpoint(last)["epoch"]
    assert 1 <= epoch < EPOCHS, "the run finished before the kill: make the epochs longer"

    # What a kill during a checkpoint write leaves behind must not disturb the resumed run.
    (out / RUN / ".last.pt.killed.tmp").write_bytes(b"PK\x03\x04 half a zip")
    (out / RUN / ".best.pt.killed.tmp").write_bytes(b"")
    _finish(out, "--resume")
    _assert_same_weights(reference, last)
    assert not list((out / RUN).glob(".*.tmp"))
    assert (out / RUN / "model.safetensors").is_file()


# Runs in a subprocess: forks writers that loop over save_checkpoint and SIGKILLs each after a
# random 0-50 ms, then checks last.pt. Forking needs a process whose torch never started a thread
# pool, hence set_num_threads(1) before any tensor work.
_WRITER = r"""
import json, os, random, signal, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from normkd.engine.checkpoint import load_checkpoint, remove_stale_temps, save_checkpoint

path = Path(sys.argv[1]) / "last.pt"

def state(i):
    w = torch.full((128, 1024), float(i))
    return {"epoch": i, "distiller": {"w": w}, "optimizer": {}, "best_top1": 0.0,
            "best_epoch": 0, "recipe": {"writer": i}}

save_checkpoint(path, state(0))
rng = random.Random(int(sys.argv[2]))
epochs, left = set(), 0
for k in range(20):
    pid = os.fork()
    if pid == 0:
        i = 1000 * (k + 1)
        while True:
            i += 1
            save_checkpoint(path, state(i))
    time.sleep(rng.uniform(0.0, 0.05))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    s = load_checkpoint(path)  # raises if the kill left a broken last.pt
    assert torch.equal(s["distiller"]["w"], state(s["epoch"])["distiller"]["w"]), s["epoch"]
    assert s["recipe"] == {"writer": s["epoch"]}
    epochs.add(s["epoch"])
    left = len(list(path.parent.glob(".*.tmp")))
removed = remove_stale_temps(path.parent)
save_checkpoint(path, state(7))
assert load_checkpoint(path)["epoch"] == 7
print(json.dumps({"distinct": len(epochs), "temps_left": left, "removed": len(removed)}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_during_checkpoint_writes_never_breaks_last(tmp_path):
    import json

    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, str(tmp_path), "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # The kills landed mid-write (temp files were left) and between writes (last.pt moved on).
    assert report["temps_left"] >= 1, report
    assert report["removed"] == report["temps_left"]
    assert report["distinct"] >= 2, report
    assert not list(tmp_path.glob(".*.tmp"))
