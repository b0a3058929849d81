"""normkd's messages go through :mod:`logging` (logger ``"normkd"``), so a user can silence,
filter or redirect them like any library's; by default they read as plain lines.

Progress and notes are INFO (stdout), warnings are WARNING (stderr, ``normkd: warning: ``).
``logging.getLogger("normkd").setLevel(logging.WARNING)`` keeps only warnings; replacing the
logger's handlers (or ``propagate = True`` and no handler) sends them wherever you log.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("normkd")


class _PlainLines(logging.Handler):
    """INFO to stdout, WARNING and above to stderr, as the lines normkd always printed; the
    streams are looked up at each message, so redirections made later (pytest, tee) apply."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                print(f"normkd: warning: {text}", file=sys.stderr, flush=True)
            else:
                print(text, file=sys.stdout, flush=True)
        except Exception:
            self.handleError(record)


if not logger.handlers:  # the user's own configuration, made before importing us, wins
    logger.addHandler(_PlainLines())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # no second copy through a root handler the user adds later
