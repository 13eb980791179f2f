"""The client socket's timeouts: kernel timeouts on plain sockets, Python timeouts inside TLS.

A plain client socket stays blocking with ``SO_RCVTIMEO``; a TLS socket keeps
Python timeouts (OpenSSL would retry a read the kernel timed out).  Either way
an idle client gets 421 at the idle timeout, a stopping server (TERM) ends a
session idle between commands at once, and a client that does not read its
replies cannot hold the worker past the idle timeout.  Real servers, raw
sockets, and the Connection itself over a socketpair for the send path.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time

import pytest

from conftest import HOSTNAME, Client, launch
from prefork_esmtp.connection import Connection
from prefork_esmtp.settings import resolve
from prefork_esmtp.writer import ClientGone
from tls_support import client_context, pki, starttls_client  # noqa: F401 (pki is a fixture)


def tls_server(pki, directory, *args: str):
    return launch(directory, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                  "--error-sleep", "0", *args, tls_listen=True)


@pytest.fixture(scope="module")
def quick(pki, tmp_path_factory):
    """Idle timeout 1 s, STARTTLS and implicit TLS."""
    server = tls_server(pki, tmp_path_factory.mktemp("timeouts"), "--timeout", "1")
    yield server
    server.stop()


def implicit_client(pki, srv) -> Client:
    sock = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
    c = Client(client_context(pki).wrap_socket(sock, server_hostname=HOSTNAME))
    assert c.reply()[0] == 220
    return c


def assert_times_out(c: Client) -> None:
    """Say nothing: 421 timeout after about the idle timeout (1 s), then the close."""
    started = time.monotonic()
    code, lines = c.reply(timeout=6)
    elapsed = time.monotonic() - started
    assert (code, lines) == (421, [f"4.4.2 {HOSTNAME} Error: timeout exceeded"])
    assert 0.8 <= elapsed < 5, elapsed
    assert c.closed(5)


def plain_client(pki, srv) -> Client:
    c = Client(srv.connect())
    assert c.reply()[0] == 220
    return c


@pytest.mark.parametrize("open_client", [plain_client, starttls_client, implicit_client],
                         ids=["plain", "inside-starttls", "inside-implicit-tls"])
def test_idle_timeout(quick, pki, open_client):
    c = open_client(pki, quick)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        assert_times_out(c)
    finally:
        c.close()


def test_a_large_message_inside_starttls(quick, pki):
    """Inside TLS reads and sends go through Python timeouts: a message of many reads arrives whole."""
    c = starttls_client(pki, quick)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: t\r\n\r\n" + b"line\r\n" * 5000 + b".\r\n")
        assert c.reply()[0] == 250
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()


@pytest.mark.parametrize("how", ["plain", "starttls", "implicit"])
def test_term_ends_a_session_idle_between_commands_at_once(pki, tmp_path, how):
    """A blocked read (kernel timeout or TLS) is interrupted by TERM: 421 at once, not at the timeout."""
    srv = tls_server(pki, tmp_path, "--timeout", "60", "--graceful-timeout", "20")
    try:
        if how == "plain":
            c = Client(srv.connect())
            assert c.reply()[0] == 220
        elif how == "starttls":
            c = starttls_client(pki, srv)
        else:
            c = implicit_client(pki, srv)
        assert c.cmd("EHLO client.example")[0] == 250
        assert "EHLO" in srv.hooks()  # the session now waits for the next command
        started = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        code, lines = c.reply(timeout=10)
        assert code == 421 and "shutting down" in lines[0], lines
        assert time.monotonic() - started < 5
        assert c.closed(5)
        assert srv.proc.wait(10) == 0
    finally:
        srv.stop()


# -- the send path ---------------------------------------------------------------------------------

def connection(timeout: float) -> tuple[Connection, socket.socket]:
    config = resolve({}, {"hostname": "mx.test.example", "timeout": timeout}, source="test")
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return Connection(ours, ("192.0.2.1", 4321), config), theirs


def test_replies_larger_than_the_window_arrive_whole_for_a_slow_reader():
    conn, theirs = connection(timeout=5)
    data = bytes(range(256)) * 4096  # 1 MiB: many windows
    received = bytearray()

    def read_slowly() -> None:
        theirs.settimeout(10)
        while len(received) < len(data):
            chunk = theirs.recv(8192)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        conn.writer.write(data)
        conn.writer.flush()
        reader.join(20)
        assert bytes(received) == data
        assert conn.sock.gettimeout() is None  # blocking again, the kernel's read timeout in charge
    finally:
        conn.close()
        theirs.close()


def test_a_reply_to_a_full_send_buffer_waits_for_room_instead_of_dropping_the_client():
    """EAGAIN on the first, non-blocking send means "no room yet", not "client gone"."""
    conn, theirs = connection(timeout=5)
    try:
        filler = b"f" * 65536
        while True:  # fill our send buffer and their receive buffer to the brim
            try:
                conn.sock.send(filler, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        received = bytearray()

        def drain_later() -> None:
            time.sleep(0.3)  # the reply's first send finds no room
            theirs.settimeout(10)
            while not received.endswith(b"250 OK\r\n"):
                chunk = theirs.recv(65536)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=drain_later)
        reader.start()
        conn.writer.write(b"250 OK\r\n")
        conn.writer.flush()  # before the fix: ClientGone (BlockingIOError), the session dropped
        reader.join(20)
        assert received.endswith(b"250 OK\r\n")
    finally:
        conn.close()
        theirs.close()


def test_a_client_that_never_reads_cannot_hold_the_send_past_the_timeout():
    conn, theirs = connection(timeout=1)
    try:
        conn.writer.write(b"x" * (1 << 20))
        started = time.monotonic()
        with pytest.raises(ClientGone):
            conn.writer.flush()
        assert 0.8 <= time.monotonic() - started < 5
    finally:
        conn.close()
        theirs.close()


def test_the_kernel_read_timeout_ends_a_silent_read_as_a_timeout():
    from prefork_esmtp.reader import ReadTimeout

    conn, theirs = connection(timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(ReadTimeout):
            conn.reader.readline(512)
        assert 0.4 <= time.monotonic() - started < 3
        theirs.sendall(b"NOOP\r\n")  # and the connection still reads afterwards
        assert conn.reader.readline(512) == b"NOOP"
    finally:
        conn.close()
        theirs.close()


def test_a_shorter_timeout_left_from_data_is_only_a_wake_up():
    """After DATA the socket keeps the data rate's shorter timeout: a command arriving later still
    counts, the idle timeout is still the whole idle timeout, and the data rate still cuts off."""
    from prefork_esmtp.reader import DataTooSlow, ReadTimeout

    conn, theirs = connection(timeout=1.0)
    reader = conn.reader
    try:
        reader.start_rate(1_000_000, 0.3)
        theirs.sendall(b"x")
        assert reader.read(1) == b"x"  # the socket's timeout is now the rate's 0.3 s
        started = time.monotonic()
        with pytest.raises(DataTooSlow):
            reader.read(1)
        assert 0.25 <= time.monotonic() - started < 0.9
        reader.stop_rate()

        timer = threading.Timer(0.6, theirs.sendall, (b"NOOP\r\n",))
        timer.start()
        started = time.monotonic()
        assert reader.readline(512) == b"NOOP"  # woken at 0.3 s, read on
        assert time.monotonic() - started >= 0.55
        timer.join()

        started = time.monotonic()
        with pytest.raises(ReadTimeout):
            reader.readline(512)
        assert 0.95 <= time.monotonic() - started < 3
    finally:
        conn.close()
        theirs.close()
