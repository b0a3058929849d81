"""The run directory: what a run writes, how it is resumed, and what an interruption leaves.

``RUN_DIR = engine.out_dir / (engine.run_name or name)`` holds config.yaml (the resolved recipe),
data.json, metrics.csv, TensorBoard events under tb/, last.pt / best.pt (training states) and,
once the schedule is complete, model.safetensors and summary.json. Every file is replaced whole
(temp file + rename), so a killed process leaves the previous version, never a torn one. Only
the main process (rank 0) writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from normkd.config import Recipe, recipe_from_dict, recipe_to_dict
from normkd.engine.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    save_model,
)
from normkd.engine.logs import MetricsCSV, TensorBoard, read_rows
from normkd.errors import UserError
from normkd.models.weights import CheckpointError

RUN_FILES = (
    "config.yaml",
    "metrics.csv",
    "last.pt",
    "best.pt",
    "model.safetensors",
    "summary.json",
)
# Engine settings that may change between a run and its resume (where it prints or is written).
RESUMABLE = ("quiet", "out_dir", "run_name")


class RunExistsError(UserError):
    """The run directory already holds another run."""


class RunLockedError(UserError):
    """Another process is writing the run directory."""


LOCK = ".lock"


def check_output(path: Path, force: bool) -> None:
    """Never replace a run's own files; replace any other existing file only with ``force``
    (the CLI's --force), checked before the work that makes the file."""
    own = path.name in (*RUN_FILES, "data.json", LOCK) or path.suffix == ".pt"
    if own and (path.parent / "config.yaml").is_file():
        raise UserError(f"{path} is a file of the run in {path.parent}: write elsewhere")
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"cannot write {path}: {path.parent} is not a folder")


class RunLock:
    """An exclusive lock on a run directory for as long as one process writes it.

    ``fcntl.flock`` on ``RUN_DIR/.lock``: the kernel drops it when the holder exits, however it
    dies (kill -9 included), so a stale lock never blocks anyone. The file names the holder
    (pid, host, start time) for the one-line refusal a second writer gets. A folder the lock
    made and nothing else wrote (the job failed while it was built) goes again on release, so a
    failed start leaves no run folder holding only ``.lock``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.fd: int | None = None
        self.made_folder = False

    def acquire(self) -> None:
        import fcntl

        try:
            self.made_folder = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(
                f"cannot write to run directory {self.path.parent}: {err.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is being written by {holder}; wait for it to "
                "finish or stop it (one writer at a time)"
            ) from None
        me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.write(fd, me.encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        folder = self.path.parent
        if self.made_folder and [p.name for p in folder.iterdir()] == [LOCK]:
            self.path.unlink(missing_ok=True)  # still held: no other writer is inside
            with contextlib.suppress(OSError):  # another process began meanwhile: keep it
                folder.rmdir()
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None


@dataclass
class Best:
    """The best test top-1 so far and its epoch, counted from 1 as everywhere a user reads it
    (metrics.csv, summary.json, the CLI; 0: none yet)."""

    top1: float = -1.0
    epoch: int = 0


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    for k in RESUMABLE:
        d.get("engine", {}).pop(k, None)
    return d


def same_recipe(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two recipe dicts train the same run (the engine settings a resume may change aside)."""
    return _comparable(a) == _comparable(b)


class RunDir:
    """One run's folder. ``check`` before building anything, ``open`` once the job is built."""

    def __init__(self, recipe: Recipe, *, resume: bool, overwrite: bool, main: bool = True):
        self.recipe = recipe
        self.path = recipe.run_dir()
        self.resume = resume
        self.overwrite = overwrite
        self.main = main
        self.state: dict[str, Any] | None = None  # the checkpoint a resume continues from
        self.csv: MetricsCSV | None = None
        self.tb: TensorBoard | None = None

    def check(self) -> None:
        """Refuse what cannot go on: a resume without a checkpoint or with another recipe, or an
        existing run without --overwrite. Reads, never writes."""
        if not self.resume:
            existing = self._existing()
            if existing and not self.overwrite:
                raise RunExistsError(
                    f"run directory {self.path} already holds a run ({', '.join(existing)}); "
                    "pass --resume to continue it or --overwrite to replace it"
                )
            return
        last = self.path / "last.pt"
        if not last.is_file():
            raise UserError(f"--resume: no checkpoint {last} to resume from")
        self.state = load_checkpoint(last)
        saved = recipe_from_dict(self.state["recipe"], f"{last}")
        if not same_recipe(recipe_to_dict(saved), recipe_to_dict(self.recipe)):
            raise UserError(
                f"--resume: the recipe differs from the one {self.path} was started with; "
                "resume with the same recipe (see its config.yaml)"
            )
        epoch = check_progress(self.state, last, self.recipe.optim.epochs)
        if epoch == self.recipe.optim.epochs and (self.path / "summary.json").exists():
            raise UserError(
                f"--resume: {self.path} is finished ({epoch}/{epoch} epochs, see its "
                "summary.json): nothing to resume; pass --overwrite to train it again"
            )
        read_rows(self.path / "metrics.csv", epoch)  # what the run goes on from must read back

    def _existing(self) -> list[str]:
        return [f for f in RUN_FILES if (self.path / f).exists()]

    def open(self, data_info: dict[str, Any]) -> None:
        """Clear a run being replaced, write config.yaml and data.json, open the logs."""
        start = self.state["epoch"] if self.state is not None else 0
        if self.main:
            if not self.resume:
                self._clear()
            remove_stale_temps(self.path)  # partial writes of a killed earlier process
            config = yaml.safe_dump(recipe_to_dict(self.recipe), sort_keys=False)
            atomic_write_text(self.path / "config.yaml", config)
            atomic_write_text(self.path / "data.json", json.dumps(data_info, default=str))
            self.csv = MetricsCSV(self.path / "metrics.csv", keep_through_epoch=start)
            self.tb = TensorBoard(self.path / "tb", purge_step=start + 1)  # steps: 1-based epochs

    def _clear(self) -> None:
        for f in self._existing():
            (self.path / f).unlink()
        if (self.path / "tb").is_dir():
            shutil.rmtree(self.path / "tb")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to run directory {self.path}: {err.strerror}") from err

    @property
    def history(self) -> list[dict[str, Any]]:
        """metrics.csv rows kept from before a resume (numbers again, not CSV strings)."""
        rows = self.csv.rows if self.csv is not None else []
        return [{k: _num(v) for k, v in r.items()} | {"epoch": int(r["epoch"])} for r in rows]

    def save_epoch(
        self,
        row: dict[str, Any],
        stats: dict[str, float],
        test: dict[str, float],
        state: dict[str, Any],
        best_now: bool,
    ) -> None:
        """Log one epoch and checkpoint it: last.pt always, best.pt when the best improved."""
        if not self.main:
            return
        assert self.csv is not None and self.tb is not None
        check_finite(state, test, row["epoch"])  # a poisoned state never replaces a good one
        self.csv.append(row)
        scalars = {f"train/{k}": v for k, v in stats.items()}
        self.tb.scalars(scalars | {f"val/{k}": v for k, v in test.items()}, row["epoch"])
        save_checkpoint(self.path / "last.pt", state)
        if best_now:
            save_checkpoint(self.path / "best.pt", state)

    def finish(self, model: nn.Module, meta: dict[str, Any], summary: dict[str, Any]) -> None:
        """The deployable model and summary.json, written once the schedule is complete."""
        if self.main:
            save_model(self.path / "model.safetensors", model, meta)
            atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def check_progress(state: dict[str, Any], path: Path, epochs: int) -> int:
    """The epoch a training state holds, checked against the recipe's ``epochs`` with its best
    epoch and top-1 (numbers a resume feeds to seeds, logs and summary.json)."""
    epoch, best_epoch, best = state["epoch"], state["best_epoch"], state["best_top1"]
    ok = (
        type(epoch) is int
        and 1 <= epoch <= epochs
        and type(best_epoch) is int
        and 0 <= best_epoch <= epoch
        and isinstance(best, float | int)
        and -1.0 <= best <= 100.0
    )
    if not ok:
        raise CheckpointError(
            f"{path} is a malformed normkd training checkpoint: epoch {str(epoch)[:20]}, best "
            f"epoch {str(best_epoch)[:20]}, best top-1 {str(best)[:20]} for a {epochs}-epoch recipe"
        )
    return epoch


def load_state(module: Any, state: Any, path: Path) -> None:
    """``module.load_state_dict(state)`` or a one-line CheckpointError: a checkpoint of another
    run (or a recipe edited since) would otherwise end in torch's many-line key listing."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        first = " ".join(str(err).split())
        raise CheckpointError(
            f"{path} does not fit the model its recipe builds (a checkpoint of another run, or "
            f"a recipe edited since?): {first[:300]}"
        ) from None


class NonFiniteStateError(UserError):
    """Weights, buffers or the evaluation went NaN/inf; nothing of that epoch is written."""


def check_finite(state: dict[str, Any], test: dict[str, float], epoch: int) -> None:
    """Raise before a checkpoint holding NaN/inf is written (e.g. BatchNorm statistics that
    overflowed while the training loss still looked finite)."""
    bad = [
        k
        for k, v in state["distiller"].items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(v.isfinite().all())
    ]
    loss = test.get("loss", float("nan"))
    if bad or (loss == loss and not math.isfinite(loss)):  # nan: not evaluated this epoch
        what = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteStateError(
            f"the model became non-finite in epoch {epoch} ("
            + (what or f"test loss {loss}")
            + f"); stopped before writing it: last.pt still holds epoch {epoch - 1} (try a lower lr)"
        )


def _num(v: Any) -> Any:
    """CSV cells (strings after a resume) back to numbers."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def interrupt_note(recipe: Recipe, dry_run: bool) -> str:
    """One line for an interrupted run: what ``last.pt`` holds and the flag that continues it."""
    run_dir = recipe.run_dir()
    last = run_dir / "last.pt"
    if dry_run:
        return "interrupted during a dry run; nothing was written"
    if last.is_file():
        try:
            epoch = load_checkpoint(last)["epoch"]
        except (UserError, KeyboardInterrupt):
            epoch = "?"
        return (
            f"interrupted; {last} holds epoch {epoch}/{recipe.optim.epochs} (the last completed "
            "one): run its recipe again with --resume to continue from there"
        )
    if (run_dir / "config.yaml").is_file():
        return (
            f"interrupted before the first epoch of {run_dir} finished; nothing to resume: "
            "run its recipe again with --overwrite to start again"
        )
    return "interrupted before the run started; nothing was written"
