"""A handler for the systemd tests: HELP tells which systemd variables a worker sees.

The master takes ``LISTEN_*``, ``NOTIFY_SOCKET`` and ``WATCHDOG_*`` out of the
environment at start, so a worker (and whatever a handler runs) must see none.
"""

from __future__ import annotations

import os

from prefork_esmtp import ESMTPHandler

SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                     "WATCHDOG_PID")


class EnvReport(ESMTPHandler):
    """``HELP`` answers ``214 2.0.0 systemd environment: <names or none>`` and the worker's pid."""

    def HELP(self, command: str | None = None) -> tuple:
        seen = [name for name in SYSTEMD_VARIABLES if name in os.environ]
        return 214, f"2.0.0 systemd environment: {' '.join(seen) or 'none'}; pid {os.getpid()}"
