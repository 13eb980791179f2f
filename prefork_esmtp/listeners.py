"""Listening sockets: bound once by the master (or -X process), inherited by workers."""

from __future__ import annotations

import socket
import struct

from prefork_esmtp.settings import Address

#: Apache's ListenBacklog default.
BACKLOG = 511


_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO


class ListenError(Exception):
    """A listener could not be opened; the message names the address and the reason."""


def bind(address: Address) -> socket.socket:
    """Open a non-blocking TCP listener on ``address``."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, address.family, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def bind_all(addresses: list[Address]) -> list[socket.socket]:
    """Open every listener, or none (closing those already open) and raise ListenError."""
    socks: list[socket.socket] = []
    try:
        for address in addresses:
            socks.append(bind(address))
    except ListenError:
        for sock in socks:
            sock.close()
        raise
    return socks


def describe(sock: socket.socket) -> str:
    """``host:port`` of a bound listener, as the log and ``status`` show it."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_timeout(sock: socket.socket) -> float | None:
    """The listener's ``SO_RCVTIMEO`` in seconds, which every connection it accepts inherits; None: none set."""
    try:
        seconds, micro = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size))
    except (OSError, struct.error):
        return None
    return seconds + micro / 1e6 or None


def lower_read_timeout(sock: socket.socket, seconds: float) -> None:
    """Give the listener's connections at most ``seconds`` as their first read timeout; never raise it.

    Only the master sets it (one process: no two writers race), at start and at
    each reload, and only ever lowers it: a worker reads it once (:func:`read_timeout`)
    and may take it as an upper bound for its whole life, whatever generation
    comes after, so no connection waits longer than its own idle timeout.  A
    lower value than a worker needs only wakes its reads early (they resume).
    """
    current = read_timeout(sock)
    if current is not None and current <= seconds:
        return
    micro = max(1, int(min(seconds, 1e9) * 1e6))  # more would overflow; 0 would mean none
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(micro // 1_000_000, micro % 1_000_000))
    except OSError:
        pass  # not a socket that takes it: its connections' readers set their own
