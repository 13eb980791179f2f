"""The worker's accept path: what the session learns of its connection, without asking twice.

The worker accepts with the listener's family and type known once, and for a
listener bound to one address hands the session that address as the
connection's own (no ``getsockname()`` per connection); a wildcard listener's
connections are asked, since each may arrive on a different address.
"""

from __future__ import annotations

import socket
import threading

import pytest

from prefork_esmtp import ESMTPHandler
from prefork_esmtp.settings import resolve
from prefork_esmtp.worker import Worker, _bound_address


class _Seen(ESMTPHandler):
    """Records the addresses the session gives the handler at CONNECT."""

    seen: list = []

    def CONNECT(self):  # noqa: N802 - the hook's name
        _Seen.seen.append((self.peer, self.local))
        return super().CONNECT()


def _one_session(listener: socket.socket, connect_to: tuple[str, int]) -> tuple:
    """Serve one session through Worker.run; return (peer, local) as the handler saw them, and the client's view."""
    _Seen.seen = []
    worker = Worker([listener], _Seen, resolve({"hostname": "mx.test.example"}, {}), max_sessions=1)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    client = socket.create_connection(connect_to, timeout=5)
    try:
        assert client.recv(512).startswith(b"220 mx.test.example")
        client.sendall(b"QUIT\r\n")
        assert client.recv(512).startswith(b"221")
        view = (client.getsockname()[:2], client.getpeername()[:2])
    finally:
        client.close()
        thread.join(10)
    assert not thread.is_alive(), "the worker did not return after its one session"
    assert worker.served == 1
    return _Seen.seen[0], view


def test_a_listener_bound_to_one_address_names_the_local_address(listener):
    (peer, local), (client_side, server_side) = _one_session(listener, listener.getsockname())
    assert local == server_side == listener.getsockname()
    assert peer == client_side


def test_a_wildcard_listener_asks_each_connection_for_its_address():
    sock = socket.create_server(("0.0.0.0", 0), backlog=16)
    sock.setblocking(False)
    try:
        port = sock.getsockname()[1]
        assert _bound_address(sock) is None
        (peer, local), (client_side, server_side) = _one_session(sock, ("127.0.0.1", port))
        assert local == server_side == ("127.0.0.1", port)
        assert peer == client_side
    finally:
        sock.close()


def _listening(family: int, host: str, option: tuple[int, int] | None = None) -> socket.socket:
    """A listener on ``host`` (with a socket option set to 1 before binding); skipped where the
    machine has no such family or the option needs a privilege it lacks."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        pytest.skip(f"no {family.name} here")
    try:
        if option is not None:
            sock.setsockopt(*option, 1)
        sock.bind((host, 0))
    except OSError as exc:
        sock.close()
        pytest.skip(f"cannot listen on {host} with {option}: {exc}")
    sock.listen(1)
    return sock


@pytest.mark.parametrize("host, bound", [("127.0.0.1", True), ("0.0.0.0", False), ("::1", True), ("::", False)])
def test_bound_address_only_for_one_address(host, bound):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _listening(family, host) as sock:
        expected = sock.getsockname()[:2] if bound else None
        assert _bound_address(sock) == expected


def test_a_unix_listener_has_no_bound_address(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s"))
        sock.listen(1)
        assert _bound_address(sock) is None


@pytest.mark.parametrize("family, host, level, option", [
    (socket.AF_INET, "127.0.0.1", socket.SOL_IP, 19), (socket.AF_INET6, "::1", socket.IPPROTO_IPV6, 75)])
def test_a_transparent_listener_asks_each_connection_for_its_address(family, host, level, option):
    """IP_TRANSPARENT (a TPROXY listener, systemd's Transparent=yes) accepts connections made to
    other addresses than its own: its address is not every connection's."""
    with _listening(family, host, (level, option)) as sock:
        assert _bound_address(sock) is None
        (peer, local), (client_side, server_side) = _one_session(sock, sock.getsockname()[:2])
        assert local == server_side
