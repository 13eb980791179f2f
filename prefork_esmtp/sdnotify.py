"""systemd's notify protocol (sd_notify(3)): state lines as AF_UNIX datagrams to ``$NOTIFY_SOCKET``.

The master tells the service manager when it is ready, reloading, stopping,
how busy its workers are, and that its loop still turns (the watchdog).  One
:class:`Notifier` holds all of it; without ``NOTIFY_SOCKET`` every call does
nothing, so the master calls it unconditionally.  No dependency: a datagram
per message, as libsystemd sends it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("prefork_esmtp.sdnotify")

#: What the notify protocol puts in the environment; removed at start so that workers
#: and the programs handlers run never speak for the master.
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def send(address: str, text: str) -> None:
    """Send one notification datagram; ``@name`` is Linux's abstract namespace.  Raises OSError."""
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(text.encode(), target)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock ``MONOTONIC_USEC=`` is read against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """The master's messages to systemd at its events (ready, reloading, stopping, status, watchdog)."""

    def __init__(self, address: str | None = None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_interval = watchdog_usec / 1e6 if address else 0.0
        self.next_watchdog = 0.0
        self.last_status = ""
        self.failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """The notifier the service manager asked for, taking its variables out of ``environ``.

        The watchdog is on when ``WATCHDOG_USEC`` is a positive number and
        ``WATCHDOG_PID``, if set, is this process.
        """
        address, usec, pid = (environ.pop(name, None) for name in ENVIRONMENT)
        if not address or not address.startswith(("/", "@")):
            return cls()
        watchdog = int(usec) if usec and usec.isdigit() else 0
        if pid and pid != str(os.getpid()):
            watchdog = 0
        return cls(address, watchdog)

    def notify(self, *lines: str) -> None:
        """Send ``KEY=VALUE`` lines in one datagram; a failure is logged once, never raised."""
        if not self.address:
            return
        try:
            send(self.address, "\n".join(lines))
        except OSError as exc:
            if not self.failed:
                self.failed = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc)

    def ready(self, status: str) -> None:
        """The first generation serves, or a reload has finished (well or not: ``status`` says)."""
        self.last_status = status
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """A reload (HUP) has begun; ``ready`` ends it."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading")

    def stopping(self, status: str) -> None:
        self.last_status = status
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Free-form state (``systemctl status`` shows it); sent only when it changed."""
        if status != self.last_status:
            self.last_status = status
            self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        """Called on every turn of a healthy loop: ``WATCHDOG=1`` at half the interval systemd set."""
        if not self.watchdog_interval:
            return
        now = time.monotonic()
        if now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog_interval / 2
            self.notify("WATCHDOG=1")

    def wait_limit(self, longest: float) -> float:
        """How long the loop may sleep so that the next ``WATCHDOG=1`` is not late."""
        if not self.watchdog_interval:
            return longest
        return max(0.0, min(longest, self.next_watchdog - time.monotonic()))
