"""A benchmark-only handler: accepts and discards every message, recording each one it took.

Each worker appends one byte per accepted message to a file of its own,
``<dir>/<pid>.count`` (opened on its first message, ``O_APPEND``, one
``write`` per message, before the 250 goes out), so the number of messages
the server took is the total size of the files in ``dir``, across worker
exits and reloads.  The benchmark compares it with what ``smtp-source`` saw
acknowledged: a message acknowledged but not recorded is lost.

Loaded by ``prefork-esmtp start --handler counting_handler:CountingHandler
--handler-option dir=DIR`` with this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from typing import Any

from prefork_esmtp import ESMTPHandler
from prefork_esmtp.handler import HandlerConfigError, Reply
from prefork_esmtp.handlers.options import take


class CountingHandler(ESMTPHandler):
    """The base handler's replies, plus one byte per accepted message in the worker's count file."""

    directory = ""
    _fd = -1
    _fd_pid = 0

    @classmethod
    def configure(cls, options: dict[str, Any]) -> None:
        """``dir``: the directory of the count files (required, must exist)."""
        cls.directory = take(options, "dir", "", str)
        if not cls.directory or not os.path.isdir(cls.directory):
            raise HandlerConfigError(f"dir: not a directory: {cls.directory!r}")
        super().configure(options)

    @classmethod
    def _record(cls) -> None:
        """One byte more in this process's count file (opened once per process, also after a fork)."""
        pid = os.getpid()
        if cls._fd_pid != pid:
            cls._fd = os.open(os.path.join(cls.directory, f"{pid}.count"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            cls._fd_pid = pid
        os.write(cls._fd, b".")

    def EOM(self) -> Reply:
        """The base handler's 250, recorded first: a 250 never goes out for a message not counted."""
        reply = super().EOM()
        if reply[0] == 250:
            self._record()
        return reply
