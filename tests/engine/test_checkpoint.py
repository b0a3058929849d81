"""Checkpoint writes on a real write failure: a file-size limit stands in for a full disk."""

import subprocess
import sys

SCRIPT = r"""
import resource, signal, sys, torch
from pathlib import Path
from normkd.engine.checkpoint import load_checkpoint, save_checkpoint
from normkd.models.weights import CheckpointError

path = Path(sys.argv[1])
small = {"epoch": 1, "distiller": {"w": torch.ones(4)}, "optimizer": {}, "best_top1": 1.0,
         "best_epoch": 0, "recipe": {}}
save_checkpoint(path, small)
before = path.read_bytes()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
big = dict(small, epoch=2, distiller={"w": torch.ones(1_000_000)})  # 4 MB > 64 KB
try:
    save_checkpoint(path, big)
except CheckpointError as err:
    print("refused:", err)
assert path.read_bytes() == before, "the previous checkpoint changed"
assert load_checkpoint(path)["epoch"] == 1
assert not list(path.parent.glob(".*.tmp")), "a temp file was left behind"
print("kept")
"""


def test_a_write_past_the_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    """torch.save reports a failed write as RuntimeError (not OSError): still one clear error,
    the previous last.pt byte-identical, no temp file left."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "last.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "kept"
    assert lines[0].startswith(f"refused: cannot write {tmp_path / 'last.pt'}: ")
    assert len(lines[0]) < 300


def test_every_atomic_writer_leaves_an_ordinary_readable_file(tmp_path):
    """mkstemp's 0600 must not leak into saved runs (model.safetensors was 0600 while the rest were 0644)."""
    import stat

    import torch.nn as nn

    from normkd.engine.checkpoint import atomic_write_text, save_checkpoint, save_model

    save_model(tmp_path / "model.safetensors", nn.Linear(2, 2), {"model": "x"})
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    atomic_write_text(tmp_path / "summary.json", "{}")
    for name in ("model.safetensors", "last.pt", "summary.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
