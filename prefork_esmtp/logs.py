"""Logging set-up: text or JSON lines, standard error or a file that USR1 reopens; structured events.

An :class:`Event` is a log record with fields: one per transaction and one
per session end (the session writes them).  In text it reads like Postfix,
``<sid>: <event> key=value ...``; with ``log_format = "json"`` every record
is one JSON object per line, and an event's fields are keys of it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import datetime
from typing import Any

FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"

_handler: logging.Handler | None = None


class Event:
    """A log message made of fields: ``sid`` (the session id), the event's name, then key=value pairs.

    Rendered only when a handler formats the record, so a disabled level costs nothing.
    """

    __slots__ = ("sid", "name", "fields")

    def __init__(self, sid: str, name: str, fields: dict[str, Any]) -> None:
        self.sid = sid
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        # None and int (most fields) are written here; only other values need _text_value.
        pairs = " ".join([f"{key}=-" if value is None else f"{key}={value}" if type(value) is int
                          else f"{key}={_text_value(value)}" for key, value in self.fields.items()])
        return f"{self.sid}: {self.name} {pairs}"


def address(peer: Any) -> str | None:
    """``host:port`` (``[v6]:port``) of an address tuple, as event fields name a client; None for none."""
    if not peer:
        return None
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


#: Values written as they are in text; anything else is quoted (spaces, quotes, '=', control characters).
_PLAIN = re.compile(r'[^\s"\\=]+')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if text.isprintable():  # no control characters: nothing to escape but '"' and '\\'
        if _PLAIN.fullmatch(text):
            return text
        if '"' not in text and "\\" not in text:
            return f'"{text}"'  # a reply, say: spaces only
    return '"' + "".join(_ESCAPES.get(c) or (c if c.isprintable() else f"\\x{ord(c):02x}")
                         for c in text) + '"'


class TextFormatter(logging.Formatter):
    """The text format: :data:`FORMAT`, with the date and time to the second formatted once per second.

    ``time.strftime`` of the local time is the dearest part of a text record;
    records of the same second share it.  The text is the standard Formatter's.
    """

    _second: int | None = None
    _date = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._date = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._date, record.msecs)


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, pid, message (and an event's fields; a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        event = record.msg
        if isinstance(event, Event):
            out["sid"] = event.sid
            out["event"] = event.name
            for key, value in event.fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str, path: str | None, fmt: str = "text") -> None:
    """Send the ``prefork_esmtp`` loggers to ``path`` (append) or standard error, as text or JSON."""
    global _handler
    logger = logging.getLogger("prefork_esmtp")
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler.close()
    _handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    _handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter(FORMAT))
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
