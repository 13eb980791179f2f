"""Helpers shared by the black-box protocol tests (conversation, limits, pipelining,
smuggling, hooks): a module-scoped server, per-session records, raw replies.

A server shared by the tests of a module records every session in one file;
each test finds its own session through the client's local port, which the
recording handler logs with CONNECT as the peer address.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from conftest import Client, Server, launch, messages_from, wait_for

__all__ = [
    "launch", "module_server", "local_port", "session_records", "session_hooks", "messages_from", "session_messages",
    "raw_reply", "nothing_arrives", "unstuff", "stuff", "rss_kib", "session_over",
]


def local_port(client: Client) -> int:
    """The client's own port (remembered, so it can be asked after the socket closed)."""
    port = getattr(client, "local_port", None)
    if port is None:
        port = client.local_port = client.sock.getsockname()[1]
    return port


def _sid(srv: Server, client: Client) -> str | None:
    port = local_port(client)
    for r in srv.records():
        if r["hook"] == "CONNECT" and r["args"] and r["args"][0][1:2] == [port]:
            return r["sid"]
    return None


def session_records(srv: Server, client: Client) -> list[dict]:
    """The hook records of the session ``client`` is (or was) talking to."""
    sid = wait_for(lambda: _sid(srv, client), 5, message="the session's CONNECT record")
    return [r for r in srv.records() if r["sid"] == sid]


def session_hooks(srv: Server, client: Client) -> list[str]:
    return [r["hook"] for r in session_records(srv, client)]



def session_messages(srv: Server, client: Client) -> list[dict]:
    return messages_from(session_records(srv, client))


def raw_reply(client: Client, timeout: float = 10.0) -> bytes:
    """The exact bytes of one (possibly multi-line) reply, CRLFs included."""
    out = b""
    while True:
        line = client._line(timeout) + b"\r\n"
        out += line
        if line[3:4] != b"-":
            return out


def nothing_arrives(client: Client, seconds: float = 0.3) -> bool:
    """True if the server sends nothing (and does not close) within ``seconds``.

    Used only to check that a reply is *not* sent early (e.g. before the end
    of data); the positive outcome is always checked afterwards.
    """
    if client.buf:
        return False
    client.sock.settimeout(seconds)
    try:
        data = client.sock.recv(65536)
    except (socket.timeout, TimeoutError):
        return True
    client.buf += data
    return False


def unstuff(data: bytes) -> bytes:
    """Reference dot-unstuffing (RFC 5321 4.5.2): lines end with CRLF only;
    a line that starts with a dot loses that dot."""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in data.split(b"\r\n"))


def stuff(data: bytes) -> bytes:
    """Reference dot-stuffing of a message that ends with CRLF (what a client sends)."""
    assert data.endswith(b"\r\n") or not data
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in data.split(b"\r\n"))


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def module_server(name: str, *args: str, **kwargs):
    """A module-scoped fixture: one :func:`conftest.launch`-ed server shared by a module's tests."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        server = launch(tmp_path_factory.mktemp(name), *args, **kwargs)
        yield server
        server.stop()

    return fixture


def split_maildir_trace(content: bytes) -> tuple[list[bytes], bytes]:
    """A stored Maildir file: our trace lines (Return-Path, then Received with its
    continuation lines) and the rest, which is the message as received."""
    lines = content.split(b"\n")
    assert lines[0].startswith(b"Return-Path: <") and lines[1].startswith(b"Received: from "), content[:200]
    n = 2
    while lines[n].startswith(b"\t"):
        n += 1
    return lines[:n], b"\n".join(lines[n:])


def session_over(run, theirs: socket.socket, lines: list[bytes], timeout: float = 10.0) -> list[str]:
    """Run a Session's ``run`` in a thread, send ``lines`` from the other end ``theirs`` of its
    socketpair, and return every reply line once the session closed (unit tests of the engine)."""
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    theirs.settimeout(timeout)
    theirs.sendall(b"".join(line + b"\r\n" for line in lines))
    data = b""
    while chunk := theirs.recv(65536):  # bounded: the session closes after QUIT, the recv times out
        data += chunk
    theirs.close()
    thread.join(timeout)
    assert not thread.is_alive()
    return data.decode().splitlines()
