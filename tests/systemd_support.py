"""Helpers for the systemd tests: a notify socket the test listens on, inherited listeners.

:class:`NotifySocket` is a real ``AF_UNIX`` datagram socket standing in for
systemd's (``NOTIFY_SOCKET``); :func:`start_activated` starts the real server
with listening sockets the test holds, at fd 3 onwards with ``LISTEN_PID`` set
to the server's own pid, as systemd's socket units pass them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from conftest import HOSTNAME, server_env, wait_for

__all__ = ["NotifySocket", "start_activated", "listening_socket", "LAUNCHER"]


class NotifySocket:
    """Receives the server's notifications; ``messages`` holds each datagram as a dict (plus ``_at``)."""

    def __init__(self, path: str | None = None) -> None:
        self.address = path or f"@prefork-esmtp-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:] if self.address.startswith("@") else self.address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str | float]] = []

    def receive(self) -> list[dict]:
        """Take every datagram waiting; return all messages so far."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields: dict[str, str | float] = dict(line.split("=", 1) for line in data.decode().split("\n"))
            fields["_at"] = time.monotonic()
            self.messages.append(fields)

    def wait(self, key: str, value: str | None = None, after: int = 0, timeout: float = 15.0) -> tuple[int, dict]:
        """The first message from index ``after`` on with ``key`` (equal to ``value`` if given):
        (its index, the message)."""
        def find() -> tuple[int, dict] | None:
            for index, message in enumerate(self.receive()[after:], after):
                if key in message and (value is None or message[key] == value):
                    return index, message
            return None
        return wait_for(find, timeout, message=f"a notification with {key}={value or '...'} "
                        f"(so far: {self.messages[after:]})")

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass


def listening_socket(kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket on a free loopback port, listening (TCP) or bound (UDP), as a socket unit opens it."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    return sock


#: Puts the given descriptors at 3, 4 ... and execs the server with LISTEN_PID = its own pid.
LAUNCHER = """
import fcntl, os, sys
count = int(sys.argv[1])
fds, names, argv = [int(fd) for fd in sys.argv[2:2 + count]], sys.argv[2 + count], sys.argv[3 + count:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(count))
if names:
    os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.executable, [sys.executable, *argv])
"""


def start_activated(directory: Path, sockets: list[socket.socket], names: str, *args: str,
                    env: dict[str, str] | None = None, log_name: str = "server.log") -> subprocess.Popen:
    """Start ``prefork-esmtp start ARGS`` with ``sockets`` inherited (systemd's protocol); output to
    ``directory / log_name``."""
    fds = [sock.fileno() for sock in sockets]
    cmd = [sys.executable, "-c", LAUNCHER, str(len(fds)), *map(str, fds), names,
           "-m", "prefork_esmtp", "start", "--hostname", HOSTNAME, *args]
    with open(directory / log_name, "ab") as output:
        return subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=server_env(env),
                                cwd=str(directory), pass_fds=fds)
