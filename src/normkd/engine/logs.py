"""Run logs: metrics.csv (one row per epoch, resumable) and TensorBoard events."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from normkd.errors import UserError
from normkd.extras import available, missing_line
from normkd.log import logger


class MetricsCSV:
    """Append one row per epoch; on resume, rows from epochs not in the checkpoint are dropped."""

    def __init__(self, path: Path, keep_through_epoch: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists() and keep_through_epoch is not None:
            self.rows = read_rows(path, keep_through_epoch)
            self._rewrite()

    def _rewrite(self) -> None:
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._rewrite()


MAX_COLUMNS = 200  # metrics.csv has about 15; far more is not a file normkd wrote


def read_rows(path: Path, epochs: int) -> list[dict[str, str]]:
    """The rows of epochs 1..``epochs`` of a metrics.csv, in order, each cell a number; a
    resume continues them and a finished run's summary is made of them. Anything else (missing,
    cut short, garbage, another run's) is a UserError, so nothing is rewritten from it. Reads
    at most ``epochs`` rows of bounded fields (csv's own 128 KiB limit per field)."""
    rows: list[dict[str, str]] = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            for row in reader:
                if len(rows) == epochs or len(fields) > MAX_COLUMNS:
                    break
                rows.append(row)
    except FileNotFoundError:
        why = "is missing"
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        why = f"cannot be read ({' '.join(str(err).split())[:100]})"
    else:
        why = _bad_rows(rows, fields, epochs)
    if why:
        raise UserError(
            f"{path} {why}: it must list epochs 1..{epochs}, as last.pt holds {epochs}; restore "
            "it, or start the run again with --overwrite"
        )
    return rows


def _bad_rows(rows: list[dict[str, str]], fields: list[str], epochs: int) -> str:
    """Why ``rows`` are not epochs 1..``epochs`` of numbers under normkd's columns ('' if they are)."""
    if len(fields) > MAX_COLUMNS or not {"epoch", "val_top1", "val_top5"} <= set(fields):
        return "is not a metrics.csv normkd wrote (its header lacks epoch, val_top1, val_top5)"
    if len(rows) < epochs:
        return f"lists {len(rows)} epoch(s)"
    for i, row in enumerate(rows, 1):
        if None in row or None in row.values() or row["epoch"] != str(i):
            return f"is damaged at data row {i}"
        for value in row.values():
            try:
                float(value)
            except ValueError:
                return f"is damaged at data row {i} (a cell is no number)"
    return ""


class TensorBoard:
    """Thin wrapper so a missing/broken tensorboard install never stops training."""

    def __init__(self, logdir: Path, purge_step: int | None = None) -> None:
        self.writer = None
        if not available("tensorboard"):
            logger.info(f"note: {missing_line('tensorboard')}; metrics.csv has the same figures")
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir), purge_step=purge_step)
        except Exception:  # a broken install never stops training
            self.writer = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
