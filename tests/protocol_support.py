"""Helpers shared by the black-box protocol tests (conversation, limits, pipelining,
smuggling, hooks): a module-scoped server, per-session records, raw replies.

A server shared by the tests of a module records every session in one file;
each test finds its own session through the client's local port, which the
recording handler logs with CONNECT as the peer address.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from conftest import HOSTNAME, RECORDER, Client, Server, messages_from, server_env, wait_for

__all__ = [
    "launch", "local_port", "session_records", "session_hooks", "messages_from", "session_messages",
    "raw_reply", "nothing_arrives", "unstuff", "stuff", "rss_kib",
]


def launch(directory: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """Start ``prefork-esmtp start -X`` with the recording handler in ``directory``.

    The same command line as conftest's ``start_server``, for module-scoped
    fixtures (that one is function-scoped); the caller stops the server.
    """
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "server.log"
    record_path = directory / "records.jsonl"
    environment = server_env({"PREFORK_TEST_RECORD": str(record_path), **(env or {})})
    cmd = [sys.executable, "-m", "prefork_esmtp", "start", "-X", "--hostname", HOSTNAME,
           "--listen", "127.0.0.1:0", "--handler", RECORDER, *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                                cwd=str(directory))
    srv = Server(proc, log_path, record_path)

    def ready() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{srv.log()}")
        m = re.search(r"listening on \[?[\w.:]+\]?:(\d+)", srv.log())
        return m.group(1) if m else None

    srv.port = int(wait_for(ready, 15, message="the server's 'listening on' line"))
    srv.ports = [srv.port]
    return srv


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
