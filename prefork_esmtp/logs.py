"""Logging set-up: one format, standard error or a file that USR1 reopens."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"

_handler: logging.Handler | None = None


def setup(level: str, path: str | None) -> None:
    """Send the ``prefork_esmtp`` loggers to ``path`` (append) or standard error."""
    global _handler
    logger = logging.getLogger("prefork_esmtp")
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler.close()
    _handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(_handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def reopen() -> None:
    """Reopen the log file (after logrotate moved it away)."""
    if isinstance(_handler, logging.FileHandler):
        _handler.acquire()
        try:
            _handler.close()
            _handler.stream = _handler._open()
        finally:
            _handler.release()
