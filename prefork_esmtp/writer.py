"""The reply writer: replies queue up and go out in one send when input runs dry.

With PIPELINING a client may send a batch of commands in one packet; their
replies are collected here in order and written with a single send just
before the reader would block for more input (RFC 2920 section 3.2): the
connection's ``recv`` sends the queue itself, :meth:`ReplyWriter.flush` is for
the other moments (before STARTTLS's handshake, at the end).
"""

from __future__ import annotations

import socket


class ClientGone(Exception):
    """The client closed the connection or it broke (while we read or wrote)."""


class ReplyWriter:
    """Buffers bytes for one client socket and sends them in one go on flush."""

    __slots__ = ("sock", "pending")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: the bytes queued, in order; the same list for the writer's life (the session appends to it)
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Queue bytes for the client; nothing is sent until :meth:`flush`."""
        self.pending.append(data)

    def flush(self) -> None:
        """Send everything queued, in order, in one system call where possible."""
        if not self.pending:
            return
        data = b"".join(self.pending)  # one reply: the same bytes object, not a copy
        self.pending.clear()
        try:
            self.sock.sendall(data)
        except OSError as exc:  # reset, broken pipe, send timeout, TLS error
            raise ClientGone(str(exc)) from None
