"""Run logs: metrics.csv (one row per epoch, resumable) and TensorBoard events."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from normkd.extras import available, missing_line
from normkd.log import logger


class MetricsCSV:
    """Append one row per epoch; on resume, rows from epochs not in the checkpoint are dropped."""

    def __init__(self, path: Path, keep_through_epoch: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists() and keep_through_epoch is not None:
            with open(path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= keep_through_epoch]
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
