"""Run records: what one finished comparison run measured, small enough to commit.

A table outlives the machine that ran it only if its inputs do: each record holds the run's
summary, its resolved recipe, the commit and machine it ran on, its precision and the sha256 of
the teacher it learned from. ``normkd reproduce --records DIR`` writes one per run (and skips the
runs already recorded); ``build_table`` rebuilds the table from the records alone. A table's
teacher is kept beside its records (``teacher.safetensors`` + ``teacher.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from normkd.engine.checkpoint import atomic_write, atomic_write_text
from normkd.errors import UserError

FORMAT = "normkd-run-record-v1"
REPO = Path(__file__).resolve().parents[2]  # a source checkout's root (src/normkd/records.py)
TEACHER = "teacher"  # the method name of a table's teacher run
MAX_RECORD_BYTES = 1 << 20  # a record is a few KB; anything far larger is not one of ours


@dataclass
class Record:
    """One finished run of a comparison (a student, or the table's teacher)."""

    pair: str
    method: str
    seed: int
    scale: str
    epochs: int
    precision: str  # the precision the run trained in: bf16, fp16 or fp32 (evaluation is fp32)
    best_top1: float
    best_epoch: int
    final_top1: float
    seconds: float
    commit: str
    machine: str
    finished: str
    teacher_sha256: str | None = None  # the weights a student learned from (None: the teacher)
    weights_sha256: str | None = None  # the teacher's own weights (teacher records only)
    summary: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT


def record_path(folder: Path, method: str, seed: int) -> Path:
    """Where the record of ``method`` at ``seed`` lives (the teacher: ``teacher.json``)."""
    return folder / ("teacher.json" if method == TEACHER else f"{method}_seed{seed}.json")


def write_record(folder: Path, record: Record) -> Path:
    """Write ``record`` atomically; returns its path."""
    path = record_path(folder, record.method, record.seed)
    atomic_write_text(path, json.dumps(asdict(record), indent=1, sort_keys=True) + "\n")
    return path


def read_record(path: Path) -> Record:
    """A record read back and checked; anything else is a UserError naming the file."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"over {MAX_RECORD_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"no format {FORMAT!r}")
        names = {f.name for f in fields(Record)}
        record = Record(**{k: v for k, v in data.items() if k in names})
        for name in ("best_top1", "final_top1", "seconds"):
            value = getattr(record, name)
            if not isinstance(value, int | float) or not -1e9 < value < 1e9:
                raise ValueError(f"{name} is {value!r}")
        for name in ("seed", "epochs", "best_epoch"):
            if not isinstance(getattr(record, name), int):
                raise ValueError(f"{name} is not an integer")
    except (OSError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{path} is not a normkd run record ({reason})") from None
    return record


def read_records(folder: Path) -> list[Record]:
    """Every record in ``folder`` (the teacher's included), in file-name order."""
    if not folder.is_dir():
        raise UserError(f"no records folder at {folder}")
    return [read_record(p) for p in sorted(folder.glob("*.json"))]


def sha256(path: Path) -> str:
    """The file's sha256 (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def keep_teacher(folder: Path, weights: Path, record: Record) -> Path:
    """Copy the teacher's weights into ``folder`` beside its record; returns the copy's path."""
    target = folder / "teacher.safetensors"
    atomic_write(target, lambda tmp: shutil.copyfile(weights, tmp))
    record.weights_sha256 = sha256(target)
    write_record(folder, record)
    return target


def kept_teacher(folder: Path) -> Path | None:
    """The teacher kept in ``folder``, checked against its record's sha256 (None if none)."""
    weights, rec = folder / "teacher.safetensors", folder / "teacher.json"
    if not weights.is_file():
        return None
    if not rec.is_file():
        raise UserError(f"{weights} has no teacher.json beside it: cannot tell what it is")
    want = read_record(rec).weights_sha256
    if sha256(weights) != want:
        raise UserError(f"{weights} does not match the sha256 in {rec} ({want}): restore it")
    return weights


def git_commit() -> str:
    """HEAD of normkd's source checkout (``+dirty`` when src/ has uncommitted changes)."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()
        head = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def machine_line() -> str:
    """CPU model, cores, the SIMD flags that decide bf16 speed, torch and its threads."""
    if torch.cuda.is_available():
        chip = f"GPU {torch.cuda.get_device_name()}"
    else:
        chip, flags = platform.processor() or platform.machine(), []
        try:
            info = Path("/proc/cpuinfo").read_text()
            chip = next(
                ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln
            )
            have = next(ln for ln in info.splitlines() if ln.startswith("flags")).split()
            flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in have]
        except (OSError, StopIteration):
            pass
        chip += f", {os.cpu_count()} cores" + (f", {' '.join(flags)}" if flags else "")
    return f"{chip}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def now() -> str:
    """UTC time of day, as records and tables write it."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
