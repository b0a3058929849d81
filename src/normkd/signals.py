"""SIGTERM handled like Ctrl-C, for the whole command (torch-free, so the CLI can take it first).

Schedulers (SLURM, Kubernetes) send SIGTERM before they kill a job. Python's default ends the
process on the spot; normkd turns it into :class:`Terminated`, a KeyboardInterrupt, so a run
stops the way Ctrl-C stops it (whole files, a line saying what last.pt holds) with exit code 143.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers (SLURM, Kubernetes) send before they kill a job."""

    exit_code = 143  # 128 + 15, as a shell reports a process that SIGTERM ended


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM while inside (main thread only; others can't)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum: int, _frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
