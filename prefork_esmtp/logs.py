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
    """Reopen the log file (after logrotate moved it away).

    ``setStream`` is the handler's public way to swap streams (it flushes the
    old one under the handler's lock); no stat of the file on every record,
    as ``WatchedFileHandler`` would do.
    """
    if isinstance(_handler, logging.FileHandler):
        stream = open(_handler.baseFilename, _handler.mode, encoding=_handler.encoding)
        old = _handler.setStream(stream)
        if old is not None:
            old.close()
