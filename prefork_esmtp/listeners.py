"""Listening sockets: bound once by the master (or -X process), inherited by workers."""

from __future__ import annotations

import socket

from prefork_esmtp.settings import Address

#: Apache's ListenBacklog default.
BACKLOG = 511


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
