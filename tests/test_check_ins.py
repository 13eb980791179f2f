"""A worker checks in before every wait for its client, sends included, so the killer never takes it for stuck.

The stuck-worker killer acts on the last promise a worker made ("I may be
silent this long").  A session promises the idle timeout before each read;
a send to a client that does not read can wait that long too, so it checks
in first: otherwise a client that waits (within the idle timeout) and then
sends a command whose reply does not fit its window gets the worker killed
(no session line, no DISCONNECT, a Redis session count left behind).
Unit tests over a socketpair (plain and TLS), and the real server.
"""

from __future__ import annotations

import platform
import re
import socket
import ssl
import threading
import time

import pytest

from conftest import HOSTNAME, Client, launch, wait_for
from master_support import pool_mode, workers_of
from prefork_esmtp.connection import Connection
from prefork_esmtp.settings import resolve
from prefork_esmtp.writer import ClientGone
from tls_support import client_context, pki  # noqa: F401 (pki is a fixture)


class Promises:
    """The check-ins a connection makes: (monotonic time, seconds promised)."""

    def __init__(self) -> None:
        self.made: list[tuple[float, float]] = []

    def __call__(self, seconds: float) -> None:
        self.made.append((time.monotonic(), seconds))

    def kept_until(self, when: float) -> bool:
        """Whether the last promise made before ``when`` still covers ``when``."""
        before = [at + seconds for at, seconds in self.made if at <= when]
        return bool(before) and before[-1] >= when - 0.05


def plain_pair(timeout: float, promises: Promises) -> tuple[Connection, socket.socket]:
    config = resolve({}, {"hostname": HOSTNAME, "timeout": timeout}, source="test")
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return Connection(ours, ("192.0.2.1", 4321), config, check_in=promises), theirs


def test_a_send_that_waits_for_the_window_checks_in_first():
    promises = Promises()
    conn, theirs = plain_pair(1.0, promises)
    try:
        promises(1.0)  # the read before the command: promised the idle timeout ...
        time.sleep(0.8)  # ... and the client took most of it to send the command
        conn.writer.write(b"x" * (1 << 20))  # a reply the client never reads
        with pytest.raises(ClientGone):
            conn.writer.flush()
        gave_up = time.monotonic()
        assert gave_up - promises.made[0][0] > 1.5  # the send itself waited the idle timeout
        assert promises.kept_until(gave_up), promises.made
    finally:
        conn.close()
        theirs.close()


def test_a_send_that_fits_makes_no_check_in():
    """The common case, a reply with room in the window: one send, no check-in (no cost added)."""
    promises = Promises()
    conn, theirs = plain_pair(1.0, promises)
    try:
        conn.writer.write(b"250 OK\r\n")
        conn.writer.flush()
        assert theirs.recv(100) == b"250 OK\r\n"
        assert promises.made == []
    finally:
        conn.close()
        theirs.close()


def test_a_tls_send_that_waits_for_the_window_checks_in_first(pki):  # noqa: F811
    promises = Promises()
    config = resolve({}, {"hostname": HOSTNAME, "timeout": 1.0}, source="test")
    ours, theirs = socket.socketpair()
    conn = Connection(ours, ("192.0.2.1", 4321), config, check_in=promises)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(pki.cert), str(pki.key))
    client = client_context(pki).wrap_socket(theirs, server_hostname=HOSTNAME, do_handshake_on_connect=False)
    shaker = threading.Thread(target=client.do_handshake)
    shaker.start()
    try:
        assert conn.start_tls(server_context) is not None
        shaker.join(10)
        promises.made.clear()
        promises(1.0)
        time.sleep(0.8)
        conn.writer.write(b"x" * (4 << 20))  # never read by the client
        with pytest.raises(ClientGone):
            conn.writer.flush()
        gave_up = time.monotonic()
        assert promises.kept_until(gave_up), promises.made
    finally:
        conn.close()
        client.close()


# -- the real server --------------------------------------------------------------------------------

#: What a thread blocked in a system call is doing, from /proc/<pid>/syscall: the
#: numbers of poll (Python's socket timeout, the send path) and recvfrom (the read).
_SYSCALLS = {"x86_64": {"7": "send", "45": "recv"}, "aarch64": {"73": "send", "207": "recv"}}


def doing(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            number = f.read().split()[0]
    except (OSError, IndexError):
        return "?"
    return _SYSCALLS[platform.machine()].get(number, number)


@pytest.mark.skipif(platform.machine() not in _SYSCALLS, reason="system call numbers known for x86_64 and aarch64")
def test_a_worker_waiting_for_a_client_that_does_not_read_is_not_killed_as_stuck(tmp_path):
    timeout = 5
    srv = launch(tmp_path, "--timeout", str(timeout), "--worker-timeout", "1",
                 mode=pool_mode(tmp_path, "--workers", "1"))
    try:
        (worker,) = wait_for(lambda: workers_of(srv.proc.pid), 10, message="the worker")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.settimeout(10)
        assert sock.recv(1000).startswith(b"220 ")
        # Pipelined EHLOs, their replies never read, until the worker waits to send ...
        deadline = time.monotonic() + 20
        while doing(worker) != "send":
            assert time.monotonic() < deadline, "the worker never waited to send"
            sock.sendall(b"EHLO x\r\n" * 200)
            time.sleep(0.02)
        # ... then read just enough for its send to finish: it waits for the next command,
        # its send buffer and our window still full.
        while doing(worker) == "send":
            assert time.monotonic() < deadline, "the worker never finished its send"
            sock.recv(8192)
        wait_for(lambda: doing(worker) == "recv", 5, message="the worker to wait for a command")
        time.sleep(timeout - 1.5)  # the client takes its time, within the idle timeout
        sock.sendall(b"EHLO x\r\n" * 20000)  # far more replies than fit
        wait_for(lambda: doing(worker) == "send", 3, message="the worker to wait for room again")
        # The worker waits up to the idle timeout for room, then gives up on the client:
        # a session line, not a kill.
        wait_for(lambda: " session client=" in srv.log() or "is stuck" in srv.log(), timeout + 5,
                 message="the session's end")
        log = srv.log()
        assert "is stuck" not in log, log
        assert re.search(r" session client=127\.0\.0\.1:\d+ .* end=(gone|timeout) ", log), log
        assert worker in workers_of(srv.proc.pid)
        sock.close()
    finally:
        srv.stop()


def test_a_worker_waiting_for_a_slow_proxy_header_is_not_killed_as_stuck(tmp_path):
    """The PROXY header may take proxy_timeout, longer here than the idle timeout plus worker_timeout."""
    srv = launch(tmp_path, "--timeout", "1", "--worker-timeout", "1", "--proxy-protocol", "--proxy-timeout", "6",
                 mode=pool_mode(tmp_path, "--workers", "1"))
    try:
        (worker,) = wait_for(lambda: workers_of(srv.proc.pid), 10, message="the worker")
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 4321 25")
        time.sleep(4)  # a balancer that takes its time, within proxy_timeout
        sock.sendall(b"\r\n")
        assert sock.recv(1000).startswith(b"220 ")
        sock.sendall(b"QUIT\r\n")
        assert sock.recv(1000).startswith(b"221 ")
        sock.close()
        wait_for(lambda: " session client=192.0.2.7:4321 " in srv.log(), 5, message="the session line")
        assert "is stuck" not in srv.log(), srv.log()
        assert worker in workers_of(srv.proc.pid)
    finally:
        srv.stop()


def test_a_handler_stuck_in_eom_inside_tls_is_still_killed(tmp_path, pki):  # noqa: F811
    """The check-ins before TLS sends promise no more than the reads did: a hook that never
    returns is still found out, idle timeout plus worker_timeout after the last read."""
    srv = launch(tmp_path, "--timeout", "1", "--worker-timeout", "1", "--tls-cert", str(pki.cert),
                 "--tls-key", str(pki.key), mode=pool_mode(tmp_path, "--workers", "1"),
                 env={"PREFORK_TEST_EOM_DELAY": "60"}, tls_listen=True)
    try:
        (worker,) = wait_for(lambda: workers_of(srv.proc.pid), 10, message="the worker")
        raw = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
        c = Client(client_context(pki).wrap_socket(raw, server_hostname=HOSTNAME))
        assert c.reply()[0] == 220
        for command, code in (("EHLO client.example", 250), ("MAIL FROM:<a@example.org>", 250),
                              ("RCPT TO:<b@example.org>", 250), ("DATA", 354)):
            assert c.cmd(command)[0] == code
        started = time.monotonic()
        c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        assert c.closed(15)
        assert time.monotonic() - started < 8
        assert c.buf == b""  # no reply at all, never a 250
        wait_for(lambda: f"worker {worker} is stuck" in srv.log(), 5, message="the stuck worker's kill")
    finally:
        srv.stop()


def test_a_worker_slowing_down_an_erring_client_is_not_killed_as_stuck(tmp_path):
    """error_sleep waits before each error reply past soft_error_limit: pipelined errors after a
    pause within the idle timeout add up to more than the idle timeout plus worker_timeout."""
    srv = launch(tmp_path, "--timeout", "3", "--worker-timeout", "1", "--error-sleep", "0.5",
                 "--soft-error-limit", "1", "--max-errors", "20", mode=pool_mode(tmp_path, "--workers", "1"))
    try:
        (worker,) = wait_for(lambda: workers_of(srv.proc.pid), 10, message="the worker")
        c = Client(srv.connect())
        assert c.reply()[0] == 220
        time.sleep(2)  # the client takes its time, within the idle timeout
        c.send(b"BOGUS\r\n" * 10)  # nine of the replies wait error_sleep each: 4.5 s in all
        assert [c.reply(timeout=15)[0] for _ in range(10)] == [500] * 10
        assert c.cmd("QUIT")[0] == 221
        wait_for(lambda: " session client=" in srv.log(), 5, message="the session line")
        assert "is stuck" not in srv.log(), srv.log()
        assert worker in workers_of(srv.proc.pid)
    finally:
        srv.stop()
