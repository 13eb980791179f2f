"""The conversation as dialogs: client and server lines, run in-process over a socketpair.

Each ``tests/dialogs/*.dialog`` file is one conversation. Lines:

- ``C: text``   the client sends ``text`` and CRLF;
- ``R: bytes``  the client sends raw bytes, Python escapes allowed (``\\r\\n``, ``\\x00``),
  for pipelining and broken line endings;
- ``S: text``   the server's next reply line must be exactly ``text``;
- ``S: <closed>`` the server must close the connection now;
- ``set NAME VALUE`` (before the first exchange) a setting, as in the TOML file;
- ``handler MODULE:CLASS`` the handler class (default: the base ESMTPHandler);
- ``#`` comments and blank lines are ignored.

The engine's Session runs in a thread on one end of a ``socket.socketpair()``:
no network, no processes, milliseconds per dialog. The real-process tests keep
the master, TLS tools and reload.
"""

from __future__ import annotations

import ast
import socket
import threading
from pathlib import Path

import pytest

from prefork_esmtp import ESMTPHandler
from prefork_esmtp.loader import load_handler
from prefork_esmtp.session import Session
from prefork_esmtp.settings import resolve

DIALOGS = sorted((Path(__file__).parent / "dialogs").glob("*.dialog"))
#: Seconds a dialog may wait for one server line or for the session to end.
STEP_TIMEOUT = 5.0


def parse_dialog(path: Path) -> tuple[dict, str | None, list[tuple[str, bytes | str]]]:
    settings: dict = {"hostname": "mx.test.example"}
    handler = None
    steps: list[tuple[str, bytes | str]] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip("\n")
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("set "):
            _, name, value = line.split(" ", 2)
            settings[name] = value
        elif line.startswith("handler "):
            handler = line.split(" ", 1)[1].strip()
        elif line.startswith("C: "):
            steps.append(("send", line[3:].encode("utf-8") + b"\r\n"))
        elif line.startswith("R: "):
            steps.append(("send", ast.literal_eval("b'" + line[3:].replace("'", "\\'") + "'")))
        elif line.startswith("S: "):
            steps.append(("expect", line[3:]))
        else:
            raise ValueError(f"{path.name}:{number}: cannot read {line!r}")
    return settings, handler, steps


class Client:
    """The client end: sends bytes, reads the server's lines one by one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(STEP_TIMEOUT)
        self.buf = b""

    def line(self) -> str | None:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                if self.buf:
                    raise AssertionError(f"connection closed inside a line: {self.buf!r}")
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line.decode("utf-8", "replace")


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
def test_dialog(path: Path) -> None:
    settings, handler_spec, steps = parse_dialog(path)
    config = resolve({}, settings, source=path.name)
    handler_class = load_handler(handler_spec) if handler_spec else ESMTPHandler
    ours, theirs = socket.socketpair()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            Session(ours, ("192.0.2.1", 4321), handler_class, config).run()
        except BaseException as exc:  # a session must never raise: the test says so
            failure.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = Client(theirs)
    try:
        for number, (kind, value) in enumerate(steps, 1):
            if kind == "send":
                theirs.sendall(value)
                continue
            got = client.line()
            if value == "<closed>":
                assert got is None, f"step {number}: expected the server to close, got {got!r}"
            else:
                assert got == value, f"step {number}: expected {value!r}, got {got!r}"
        extra = b""
        theirs.setblocking(False)
        try:
            extra = client.buf + theirs.recv(65536)
        except BlockingIOError:
            extra = client.buf
        assert extra == b"", f"the server said more than the dialog expects: {extra!r}"
    finally:
        theirs.close()
        thread.join(STEP_TIMEOUT)
    assert not thread.is_alive(), "the session did not end after the client went away"
    assert not failure, f"the session raised {failure[0]!r}"


def test_there_are_dialogs() -> None:
    assert len(DIALOGS) >= 10
