"""The read timeout a connection inherits from its listener (SO_RCVTIMEO), and why it is safe.

The master sets each listener's ``SO_RCVTIMEO`` to the timeout a session's first
read would set, and only ever lowers it (generations with other timeouts share
the listeners across a reload); a worker reads it once and takes it as an upper
bound, so the first read needs no ``setsockopt`` of its own.  Whatever the
listener holds, no session waits longer than its own idle timeout, and a
listener timeout shorter than a session's only wakes its reads early.
In-process workers on real loopback sockets, raw clients.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from prefork_esmtp import ESMTPHandler
from prefork_esmtp import master as master_module
from prefork_esmtp.connection import listener_read_timeout
from prefork_esmtp.listeners import lower_read_timeout, read_timeout
from prefork_esmtp.master import Master
from prefork_esmtp.reader import Reader, first_read_timeout
from prefork_esmtp.settings import resolve
from prefork_esmtp.worker import Worker


class _RecordingSocket:
    """What a Reader reads from: one command line per recv; the timeouts it sets are kept."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def recv(self, size: int) -> bytes:
        return b"EHLO client.example\r\n"

    def settimeout(self, seconds: float) -> None:
        self.timeouts.append(seconds)


@pytest.mark.parametrize("timeout, wake_after", [
    (300.0, 10.0), (300.0, None), (5.0, 10.0), (1.5, None), (300.0, 0.5), (2.7, None), (30.0, 2.5),
])
def test_first_read_timeout_is_what_a_new_reader_sets_first(timeout, wake_after):
    sock = _RecordingSocket()
    Reader(sock, timeout, wake_after).readline(512)
    assert sock.timeouts == [first_read_timeout(timeout, wake_after)]


def test_a_reader_that_inherits_its_timeout_sets_none_until_a_shorter_one_is_owed():
    sock = _RecordingSocket()
    reader = Reader(sock, 300.0, 10.0, socket_timeout=10.0)
    assert reader.readline(512) == b"EHLO client.example"
    assert reader.readline(512) == b"EHLO client.example"
    assert sock.timeouts == []
    longer = _RecordingSocket()  # the listener's is longer than this session's idle timeout: set at once
    Reader(longer, 5.0, None, socket_timeout=10.0).readline(512)
    assert longer.timeouts == [5.0]


def test_lower_read_timeout_sets_then_only_lowers(listener):
    assert read_timeout(listener) is None
    lower_read_timeout(listener, 10.0)
    assert read_timeout(listener) == 10.0
    lower_read_timeout(listener, 30.0)  # a generation with a longer timeout: never raised
    assert read_timeout(listener) == 10.0
    lower_read_timeout(listener, 2.5)
    assert read_timeout(listener) == 2.5


def test_the_master_sets_its_listeners_and_lowers_them_at_a_reload(listener, monkeypatch, tmp_path):
    first = resolve({"hostname": "mx.test.example", "timeout": "300", "min_data_rate_grace": "10"}, {})
    quicker = resolve({"hostname": "mx.test.example", "timeout": "4", "min_data_rate": "0"}, {})
    slower = resolve({"hostname": "mx.test.example", "timeout": "600", "min_data_rate": "0"}, {})
    configs = [quicker, slower]
    master = Master(first, [listener], lambda: configs.pop(0), handler_class=ESMTPHandler)
    monkeypatch.setattr(master, "spawn_missing", lambda: None)  # no fork: only the listeners matter here
    monkeypatch.setattr(master_module.logs, "setup", lambda *args: None)
    try:
        assert read_timeout(listener) == listener_read_timeout(first) == 10.0
        master.handle_hup()
        assert read_timeout(listener) == 4.0  # the new generation's is shorter: lowered before it accepts
        master.reloading = None  # as if the old generation had retired
        master.handle_hup()
        assert master.config is slower
        assert read_timeout(listener) == 4.0  # a worker of the 4 s generation may still be serving
    finally:
        master.scoreboard.close()
        for fd in (master.wake_r, master.wake_w, master.error_r, master.error_w):
            os.close(fd)


def _serve_one(listener: socket.socket, **settings: str) -> tuple[Worker, threading.Thread]:
    config = resolve({"hostname": "mx.test.example", "error_sleep": "0", **settings}, {})
    worker = Worker([listener], ESMTPHandler, config, max_sessions=1)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_listener_timeout_longer_than_the_session_s_never_makes_it_wait_longer(listener):
    lower_read_timeout(listener, 30.0)  # e.g. left by a generation with a longer timeout
    worker, thread = _serve_one(listener, timeout="1", min_data_rate="0")
    with socket.create_connection(listener.getsockname(), timeout=10) as client:
        assert _reply(client).startswith(b"220 ")
        started = time.monotonic()
        reply = _reply(client)  # say nothing
        elapsed = time.monotonic() - started
    assert reply.startswith(b"421 4.4.2 mx.test.example Error: timeout exceeded"), reply
    assert 0.8 <= elapsed < 5, elapsed
    thread.join(10)
    assert not thread.is_alive() and worker.served == 1


def test_a_listener_timeout_shorter_than_the_session_s_only_wakes_the_read(listener):
    lower_read_timeout(listener, 0.3)
    worker, thread = _serve_one(listener, timeout="5", min_data_rate="0")
    with socket.create_connection(listener.getsockname(), timeout=10) as client:
        assert _reply(client).startswith(b"220 ")
        time.sleep(1.0)  # past the listener's timeout, well within the session's
        client.sendall(b"EHLO client.example\r\n")
        assert _reply(client).startswith(b"250-mx.test.example")
        client.sendall(b"QUIT\r\n")
        assert _reply(client).startswith(b"221 ")
    thread.join(10)
    assert not thread.is_alive() and worker.served == 1
