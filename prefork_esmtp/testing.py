"""A real server around a handler inside a test: a context manager and a pytest fixture.

Like aiosmtpd's ``Controller``, but the server is the real thing: the
``prefork-esmtp start`` command in a child process (``-X`` by default, or a
small pool), on a free loopback port, with its log captured.  The handler is
imported by that process, so it must live in an importable module (a test
module is fine: its directory goes on the child's ``PYTHONPATH``).

    from prefork_esmtp.testing import running_server

    with running_server("mymod:MyServer") as server:
        with server.smtp() as client:
            client.sendmail("a@example.org", ["b@example.org"], "Subject: hi\\r\\n\\r\\nhello\\r\\n")
    print(server.log())

With pytest the plugin (installed with the package) offers the fixture
``esmtp_server``: a factory with the same arguments, stopped after the test.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Seconds a server may take to come up, and to stop, before the kit gives up.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

#: The master's "listening on HOST:PORT" lines, in text logs or as a JSON message (--log-format json).
_LISTENING = re.compile(r"listening on (?:\[[^\]]+\]|[\d.]+):(\d+)( \(implicit TLS\))?(?=$|\")", re.M)
_READY = ("serving with", "ready: generation")


def listening_ports(log_text: str) -> tuple[list[int], list[int]]:
    """The ports a server's log says it listens on: (plain, implicit TLS), in order."""
    found = _LISTENING.findall(log_text)
    return [int(p) for p, tls in found if not tls], [int(p) for p, tls in found if tls]


def wait_until_ready(proc: subprocess.Popen, read_log: Any, timeout: float = START_TIMEOUT) -> str:
    """Wait until the server's log says it serves (``-X``) or its first workers booted; return the log.

    Raises :class:`ServerFailed` with the log if the process exits or the time runs out.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited with status {proc.returncode}:\n{read_log()}")
        text = read_log()
        if any(mark in text for mark in _READY) and _LISTENING.search(text):
            return text
        if time.monotonic() > deadline:
            raise ServerFailed(f"the server was not ready after {timeout:.0f}s:\n{text}")
        time.sleep(0.02)


class ServerFailed(RuntimeError):
    """The server exited or did not become ready; the message carries its log."""


class RunningServer:
    """A started server: where it listens, a client factory, its log, and ``stop()``."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, host: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.host = host
        self.port = 0  # the first plain listener's port
        self.ports: list[int] = []
        self.tls_ports: list[int] = []

    @property
    def pid(self) -> int:
        """The pid of the server (the master of a pool)."""
        return self.proc.pid

    def log(self) -> str:
        """Everything the server has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def smtp(self, timeout: float = 10.0) -> smtplib.SMTP:
        """A connected ``smtplib.SMTP`` (use it in a ``with`` block)."""
        return smtplib.SMTP(self.host, self.port, timeout=timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the server serves; its ports are then in ``port``, ``ports`` and ``tls_ports``."""
        try:
            text = wait_until_ready(self.proc, self.log, timeout)
        except ServerFailed:
            self.stop()
            raise
        self.ports, self.tls_ports = listening_ports(text)
        self.port = self.ports[0] if self.ports else 0

    def stop(self) -> int:
        """Graceful stop (TERM), then kill after STOP_TIMEOUT; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode


def handler_spec(handler: type | str) -> tuple[str, list[str]]:
    """``module:Class`` for a handler, and the directories its module needs on the path."""
    if isinstance(handler, str):
        return handler, []
    module = sys.modules.get(handler.__module__)
    spec = f"{handler.__module__}:{handler.__qualname__}"
    if module is None or handler.__module__ == "__main__" or "<locals>" in handler.__qualname__:
        raise ValueError(f"{handler!r} must be defined at the top level of an importable module")
    path = getattr(module, "__file__", None)
    if not path:
        return spec, []
    root = Path(path).resolve().parent
    for _ in range(handler.__module__.count(".")):
        root = root.parent  # a package's module: the path entry is above the package
    if Path(path).name == "__init__.py":
        root = root.parent
    return spec, [str(root)]


def start_server(handler: type | str = "prefork_esmtp:ESMTPHandler", *args: str,
                 workers: int | None = None, host: str = "127.0.0.1",
                 directory: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None) -> RunningServer:
    """Start ``prefork-esmtp start`` with ``handler`` on a free port of ``host``; return once it serves.

    ``args`` are more command-line options (``"--max-recipients", "5"``);
    ``workers`` runs a pool of that size instead of ``-X``; ``directory`` is the
    server's working directory (default: a new temporary one).
    """
    spec, paths = handler_spec(handler)
    workdir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="prefork-esmtp-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    mode = ["-X"] if workers is None else ["--workers", str(workers), "--pidfile", str(workdir / "server.pid")]
    cmd = [sys.executable, "-m", "prefork_esmtp", "start", *mode, "--listen", f"{host}:0",
           "--handler", spec, "--log-file", str(log_path), *args]
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [*paths, os.getcwd(), *filter(None, [environment.get("PYTHONPATH")])])
    environment.update(env or {})
    with open(workdir / "server.out", "wb") as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, cwd=str(workdir),
                                env=environment)
    server = RunningServer(proc, log_path, host)
    try:
        server.wait_ready()
    except ServerFailed as exc:
        # errors before logging is set up (a bad option) go to standard output
        raise ServerFailed(f"{exc}{(workdir / 'server.out').read_text(errors='replace')}") from None
    return server


@contextmanager
def running_server(handler: type | str = "prefork_esmtp:ESMTPHandler", *args: str,
                   **kwargs: Any) -> Iterator[RunningServer]:
    """:func:`start_server` as a context manager: the server stops when the block ends."""
    server = start_server(handler, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


try:
    import pytest
except ImportError:  # the kit works without pytest; only the fixture needs it
    pytest = None

if pytest is not None:
    @pytest.fixture
    def esmtp_server(tmp_path: Path) -> Iterator[Any]:
        """A factory: ``esmtp_server(MyHandler, "--max-recipients", "5")``; every server stops after the test."""
        servers: list[RunningServer] = []

        def start(handler: type | str = "prefork_esmtp:ESMTPHandler", *args: str,
                  **kwargs: Any) -> RunningServer:
            kwargs.setdefault("directory", tmp_path / f"server{len(servers) + 1}")
            server = start_server(handler, *args, **kwargs)
            servers.append(server)
            return server

        yield start
        for server in servers:
            server.stop()
