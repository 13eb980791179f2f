"""The benchmark's session accounting (benchmarks/production.py and its helpers), on real programs.

What the reload and HAProxy figures count must match what the real tools do:
smtp-source's diagnostics for a refused connection, a 421, a dropped session,
run against scripted SMTP peers on loopback; the counting handler's records in
a real server, across a reload; and a reload's end as the master reports it on
a notify socket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import require_tool
from mailservers import free_port
from prefork_esmtp.handler import HandlerConfigError
from prefork_esmtp.testing import running_server

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # appended: the benchmark's module names never shadow others

import haproxy_options  # noqa: E402
import production  # noqa: E402
import servers  # noqa: E402
from counting_handler import CountingHandler  # noqa: E402
from measure import Workload  # noqa: E402
from servers import Notices  # noqa: E402

CONN = Workload("conn", "connection per message", 1, 512, False, 3)


def _serve(conn: socket.socket, behaviour: str) -> None:
    """One scripted SMTP session: ``ok`` accepts the message; the others fail it one way."""
    f = conn.makefile("rb")
    if behaviour == "banner421":
        conn.sendall(b"421 4.3.2 not now\r\n")
        return
    conn.sendall(b"220 scripted ESMTP\r\n")
    for _ in range(100):  # bounded: one short session
        line = f.readline(4096)
        if not line:
            return
        verb = line[:4].upper()
        if verb == b"MAIL" and behaviour == "mail421":
            conn.sendall(b"421 4.3.2 closing\r\n")
            return
        if verb == b"MAIL" and behaviour == "drop_at_mail":
            return
        if verb == b"DATA":
            conn.sendall(b"354 go on\r\n")
            for _ in range(10000):
                data = f.readline(65536)
                if not data or data == b".\r\n":
                    break
            conn.sendall(b"250 2.0.0 taken\r\n")
        elif verb == b"QUIT":
            conn.sendall(b"221 bye\r\n")
            return
        else:
            conn.sendall(b"250 ok\r\n")


@contextmanager
def scripted_peer(behaviour: str) -> Iterator[int]:
    """A loopback SMTP peer that serves every connection with ``behaviour``; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    _serve(conn, behaviour)
                except OSError:
                    pass

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def source(port: int, count: int = 3) -> tuple[int, dict]:
    """smtp-source as a counted run starts it; its exit status and the benchmark's counts."""
    require_tool("smtp-source")
    cmd = production.source_command(CONN, count, port)
    done = subprocess.run(cmd, capture_output=True, timeout=60)
    return done.returncode, production.classify(done.stderr.decode(errors="replace"))


def test_every_message_accepted_counts_nothing() -> None:
    with scripted_peer("ok") as port:
        status, found = source(port)
    assert status == 0
    assert (found["refused"], found["cut"], found["rejected"], found["failed_attempts"]) == (0, 0, 0, 0)


def test_421_to_mail_cuts_each_session_and_the_run_goes_on() -> None:
    with scripted_peer("mail421") as port:
        status, found = source(port)
    assert status == 0  # -A: each 421 ends its session, the next one starts
    assert (found["refused"], found["cut"], found["failed_attempts"]) == (0, 3, 3)
    assert "sender rejected: 421 4.3.2 closing" in found["errors"]


def test_dropped_session_is_cut_and_stops_smtp_source() -> None:
    with scripted_peer("drop_at_mail") as port:
        status, found = source(port)
    assert status != 0
    assert (found["refused"], found["cut"]) == (0, 1)
    assert any(e.startswith("lost connection") for e in found["errors"])


def test_421_greeting_is_refused_not_cut() -> None:
    with scripted_peer("banner421") as port:
        status, found = source(port)
    assert status != 0  # smtp-source sends HELO on, and finds the connection closed
    assert (found["refused"], found["cut"]) == (1, 0)


def test_refused_connections_are_each_counted() -> None:
    port = free_port()  # nothing listens there
    status, found = source(port)
    assert status != 0
    assert found["refused"] == production.CONNECT_TRIES
    assert found["cut"] == 0


def test_counting_handler_needs_its_directory() -> None:
    with pytest.raises(HandlerConfigError):
        CountingHandler.configure({})


def _send(server, n: int) -> None:
    with server.smtp() as client:
        for i in range(n):
            client.sendmail("a@example.org", ["b@example.org"], f"Subject: {i}\r\n\r\nbody\r\n")


def test_counting_handler_records_across_a_reload_that_the_notify_socket_reports(tmp_path: Path) -> None:
    counts = tmp_path / "counts"
    counts.mkdir()
    notices = Notices(tmp_path / "notify.sock")
    try:
        with running_server(CountingHandler, "--handler-option", f"dir={counts}", workers=2,
                            directory=tmp_path / "server", env={"NOTIFY_SOCKET": str(notices.path)}) as server:
            _send(server, 3)
            _send(server, 1)
            before = {p.name for p in counts.iterdir()}
            assert sum(p.stat().st_size for p in counts.iterdir()) == 4
            assert all(name.removesuffix(".count").isdigit() for name in before)

            notices.hup(server.proc.pid)
            assert notices.reloading
            assert notices.wait_reloaded(30), notices.status
            assert (notices.reloads, notices.failed, len(notices.durations)) == (1, 0, 1)

            for _ in range(4):  # the new generation's workers record in files of their own
                _send(server, 1)
            assert sum(p.stat().st_size for p in counts.iterdir()) == 8
            assert {p.name for p in counts.iterdir()} - before
    finally:
        notices.close()
    assert not os.path.exists(notices.path)


@pytest.mark.parametrize("variant", ["benchmark", *haproxy_options.VARIANTS])
def test_haproxy_configs_are_valid_for_the_real_haproxy(tmp_path: Path, variant: str) -> None:
    """What the HAProxy figure runs with, and every variant compared with it, passes ``haproxy -c``."""
    haproxy = require_tool("haproxy")
    tuning = servers.HAPROXY_TUNING if variant == "benchmark" else haproxy_options.VARIANTS[variant]
    config = tmp_path / "haproxy.cfg"
    config.write_text(servers.haproxy_config(free_port(), free_port(), tuning))
    for line in (line for section in tuning.values() for line in section):
        assert f"    {line}\n" in config.read_text()
    done = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
