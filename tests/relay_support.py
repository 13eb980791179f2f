"""Helpers for the relay and LMTP tests: a relay in front of an upstream, and upstreams that misbehave.

``start_relay(start_server, upstream, *options)`` runs the real ``prefork-esmtp``
with the Relay handler.  :class:`ScriptedUpstream` is a loopback SMTP server in
a thread that answers from a script and keeps the exact bytes it received, for
the failures a real server will not produce on demand (silence, garbage, a
close after 354) and for byte-for-byte checks of what the relay sent.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from conftest import Server

RELAY = "prefork_esmtp.handlers.relay:Relay"


def start_relay(start_server: Callable[..., Server], upstream: str, *options: str, args: tuple[str, ...] = (),
                handler: str = RELAY, **kwargs) -> Server:
    """A relay (``-X`` unless ``mode`` is given) whose upstream is ``upstream`` (``host:port``)."""
    flags = ["--handler-option", f"upstream={upstream}"]
    for option in options:
        flags += ["--handler-option", option]
    return start_server(*flags, *args, handler=handler, **kwargs)


class LoopbackServer:
    """A listener on 127.0.0.1 served by a daemon thread, one connection at a time, until :meth:`close`.

    Subclasses set what ``_handle(conn)`` needs before calling ``__init__``
    (the thread starts at once); ``_handle`` runs with a 20 s socket timeout.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.stopping = threading.Event()
        self.current: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.current = conn
            with conn:
                conn.settimeout(20)
                try:
                    self._handle(conn)
                except (OSError, ValueError):
                    pass

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop: the connection being served is shut down, so its handling ends at once."""
        self.stopping.set()
        conn = self.current
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(30)
        self.listener.close()

    def __enter__(self) -> "LoopbackServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScriptedUpstream(LoopbackServer):
    """An SMTP server in a thread, one connection at a time, with a behaviour per test.

    ``behaviour``: "ok" (a plain ESMTP server), "silent" (greets, then never
    answers), "garbage" (greets, then answers nonsense), "close_after_354"
    (closes once the message starts), "refuse" (554 greeting), "eom_451".
    ``messages`` holds each message's exact DATA bytes (end-of-data line excluded);
    ``commands`` every command line received.
    """

    def __init__(self, behaviour: str = "ok", extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME")) -> None:
        self.behaviour = behaviour
        self.extensions = extensions
        self.messages: list[bytes] = []
        self.commands: list[str] = []
        super().__init__()

    def _handle(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        if self.behaviour == "refuse":
            conn.sendall(b"554 5.7.1 upstream says no\r\n")
            return
        conn.sendall(b"220 upstream.test ESMTP\r\n")
        while not self.stopping.is_set():
            line = reader.readline(4096)
            if not line:
                return
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(command)
            verb = command.split(" ", 1)[0].upper()
            if self.behaviour == "silent" and verb != "EHLO":
                self.stopping.wait(30)
                return
            if self.behaviour == "garbage" and verb != "EHLO":
                conn.sendall(b"this is not smtp\r\n")
                continue
            if verb == "EHLO":
                lines = ["upstream.test", *self.extensions]
                conn.sendall("".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n"
                                     for i, text in enumerate(lines)).encode())
            elif verb == "DATA":
                conn.sendall(b"354 go ahead\r\n")
                if self.behaviour == "close_after_354":
                    return
                lines: list[bytes] = []
                while True:
                    more = reader.readline(1 << 20)
                    if not more:
                        return
                    if more == b".\r\n" and (not lines or lines[-1].endswith(b"\r\n")):
                        break
                    lines.append(more)
                self.messages.append(b"".join(lines))
                if self.behaviour == "eom_451":
                    conn.sendall(b"451 4.3.0 upstream queue trouble\r\n")
                else:
                    conn.sendall(f"250 2.0.0 queued as Q{len(self.messages)}\r\n".encode())
            elif verb == "QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            elif verb == "RCPT" and "unknown" in command.lower():
                conn.sendall(b"550 5.1.1 <unknown@example.org>: user unknown here\r\n")
            else:
                conn.sendall(b"250 2.0.0 ok\r\n")


class RawUpstream(LoopbackServer):
    """A loopback server in a thread whose every connection is handled by ``script(sock, reader, state)``.

    For the upstream misbehaviours a scripted dialogue cannot express (a reply
    trickled byte by byte, a reply before end-of-data, an extra reply).
    ``state`` is a dict shared by all connections: the script records there
    what it saw (``state["connections"]`` counts them).
    """

    def __init__(self, script: Callable[[socket.socket, object, dict], None]) -> None:
        self.script = script
        self.state: dict = {"connections": 0}
        super().__init__()

    def _handle(self, conn: socket.socket) -> None:
        self.state["connections"] += 1
        self.script(conn, conn.makefile("rb"), self.state)


def read_message(reader) -> bytes | None:
    """The DATA section a raw upstream receives, up to its end-of-data line (excluded); None on EOF."""
    lines: list[bytes] = []
    while True:
        line = reader.readline(1 << 20)
        if not line:
            return None
        if line == b".\r\n" and (not lines or lines[-1].endswith(b"\r\n")):
            return b"".join(lines)
        lines.append(line)


def ehlo_reply(*extensions: str) -> bytes:
    lines = ["upstream.test", *extensions]
    return "".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n" for i, text in enumerate(lines)).encode()
