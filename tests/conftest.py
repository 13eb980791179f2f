"""Fixtures that start the real server (the CLI, real processes, loopback sockets)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prefork_esmtp.testing import ServerFailed, listening_ports, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECORDER = "recorder:Recorder"
HOSTNAME = "mx.test.example"


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll ``condition`` until it returns something true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def messages_from(records: list[dict]) -> list[dict]:
    """The messages whose EOM was called, rebuilt from one session's hook records.

    Each: headers [(name, value)], raws (each header's exact bytes), section (the
    header section's exact bytes), body bytes, chunks [(bytes, chunkmode)], eoh,
    hooks (DATA to EOM), the EOM record, and its sender, recipients, mail_params, tag.
    """
    out = []
    current: dict | None = None
    for r in records:
        if r["hook"] == "DATA":
            current = {"headers": [], "raws": [], "section": b"", "body": b"", "chunks": [],
                       "eoh": False, "hooks": ["DATA"]}
            continue
        if current is None:
            continue
        current["hooks"].append(r["hook"])
        if r["hook"] == "HEADER":
            current["headers"].append(tuple(r["args"]))
            current["raws"].append(base64.b64decode(r.get("raw", "")))
        elif r["hook"] == "EOH":
            current["eoh"] = True
            current["section"] = base64.b64decode(r.get("raw", ""))
        elif r["hook"] == "BODY":
            current["body"] += r["bytes"]
            current["chunks"].append((r["bytes"], r["chunkmode"]))
        elif r["hook"] == "EOM":
            current.update(record=r, sender=r["sender"], recipients=r["recipients"],
                           mail_params=r.get("mail_params"), tag=r.get("tag"))
            out.append(current)
            current = None
    return out


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A non-blocking listening socket on a free loopback port, for in-process Worker tests."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def clients() -> Iterator[list]:
    """A list to put raw clients in; every one is closed at teardown."""
    opened: list = []
    yield opened
    for c in opened:
        c.close()


class Server:
    """A running ``prefork-esmtp start`` process and what it left behind."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, record_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.record_path = record_path
        self.port = 0
        self.ports: list[int] = []
        self.tls_port = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self) -> list[dict]:
        if not self.record_path.exists():
            return []
        out = []
        text = self.record_path.read_text()
        # Only whole lines: a record being written right now is read on the next call.
        for line in text[:text.rfind("\n") + 1].splitlines():
            entry = json.loads(line)
            if "b64" in entry:
                entry["bytes"] = base64.b64decode(entry["b64"])
            out.append(entry)
        return out

    def hooks(self, sid: str | None = None) -> list[str]:
        return [r["hook"] for r in self.records() if sid is None or r["sid"] == sid]

    def sessions(self) -> dict[str, list[dict]]:
        by_sid: dict[str, list[dict]] = {}
        for r in self.records():
            by_sid.setdefault(r["sid"], []).append(r)
        return by_sid

    def accepted_messages(self) -> list[dict]:
        """Messages whose EOM was called, in every session: see :func:`messages_from`."""
        return [m for records in self.sessions().values() for m in messages_from(records)]

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def launch(directory: Path, *args: str, env: dict[str, str] | None = None, handler: str = RECORDER,
           mode: tuple[str, ...] = ("-X",), listen: tuple[str, ...] = ("127.0.0.1:0",),
           tls_listen: bool = False, wait: bool = True, log_file: Path | None = None) -> Server:
    """Start ``prefork-esmtp start`` (``-X`` unless ``mode`` says otherwise) in ``directory``.

    The caller stops it (or uses the ``start_server`` fixture, which does).
    ``mode=("--workers", "4", "--pidfile", ...)`` runs a pool; ``tls_listen`` adds an
    implicit-TLS listener (``srv.tls_port``); ``log_file`` adds ``--log-file`` and
    ``srv.log()`` reads it.  Ports come from the server's own "listening on"
    lines, so there is no race for a free port; with ``wait`` it returns once
    the server serves (``-X``) or its first workers have booted (a pool).
    """
    directory.mkdir(parents=True, exist_ok=True)
    n = len(list(directory.glob("server*.log"))) + 1
    log_path, record_path = directory / f"server{n}.log", directory / f"records{n}.jsonl"
    environment = server_env({"PREFORK_TEST_RECORD": str(record_path), **(env or {})})
    cmd = [sys.executable, "-m", "prefork_esmtp", "start", *mode, "--hostname", HOSTNAME]
    for address in listen:
        cmd += ["--listen", address]
    if handler:
        cmd += ["--handler", handler]
    cmd += list(args)
    if tls_listen:
        cmd += ["--tls-listen", "127.0.0.1:0"]
    if log_file is not None:  # the server logs there; its stdout/stderr still go to log_path
        cmd += ["--log-file", str(log_file)]
    with open(log_path, "wb") as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                cwd=str(directory))
    srv = Server(proc, log_file if log_file is not None else log_path, record_path)
    if wait:
        # The testing kit's own readiness check and port discovery: the suite uses what it offers users.
        try:
            text = wait_until_ready(proc, srv.log, 15)
        except ServerFailed as exc:
            if proc.poll() is None:  # never leave a server behind that no fixture will stop
                proc.kill()
                proc.wait(10)
            raise AssertionError(str(exc)) from None
        srv.ports, tls_ports = listening_ports(text)
        srv.port = srv.ports[0] if srv.ports else 0
        srv.tls_port = tls_ports[0] if tls_ports else 0
    return srv


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers with :func:`launch` in this test's ``tmp_path``; all are stopped at teardown.

    Usage: ``srv = start_server("--max-recipients", "100", env={...})``.
    """
    servers: list[Server] = []

    def start(*args: str, **kwargs) -> Server:
        srv = launch(tmp_path, *args, **kwargs)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


class Client:
    """A raw-socket SMTP client for exact bytes: send anything, read whole replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; unread: {self.buf!r}")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self, timeout: float = 10.0) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: (code, [text of each line])."""
        lines = []
        while True:
            line = self._line(timeout)
            assert re.fullmatch(rb"[2-5]\d\d[ -].*|[2-5]\d\d", line, re.S), f"malformed reply line {line!r}"
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def replies(self, count: int, timeout: float = 10.0) -> list[tuple[int, list[str]]]:
        return [self.reply(timeout) for _ in range(count)]

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (after any unread replies)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client_for() -> Iterator[Callable[[Server], Client]]:
    """Open a raw client on a server and read its greeting (checked: 220)."""
    clients: list[Client] = []

    def connect(srv: Server, greet: bool = True) -> Client:
        c = Client(srv.connect())
        clients.append(c)
        if greet:
            code, lines = c.reply()
            assert code == 220, (code, lines)
        return c

    yield connect
    for c in clients:
        c.close()


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, but fail in CI (PREFORK_ESMTP_REQUIRE_TOOLS=1)."""
    import shutil

    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path:
        return path
    if os.environ.get("PREFORK_ESMTP_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{name} is required in CI but not installed (.ci/run installs it)")
    pytest.skip(f"{name} not installed")
