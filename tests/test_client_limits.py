"""Limits a client must not defeat: a bounded lingering close, HELO/EHLO arguments without control characters."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import HOSTNAME, Client
from tls_support import records_of


def connect(srv) -> Client:
    return Client(socket.create_connection(("127.0.0.1", srv.port), timeout=10))


def test_lingering_close_is_bounded_in_time(start_server):
    """A refused client that drips a byte every 0.3 s after 421 frees the (-X) worker within ~2 s."""
    srv = start_server("--max-junk-commands", "1")
    dripper = connect(srv)
    assert dripper.reply()[0] == 220
    assert dripper.cmd("NOOP")[0] == 250
    assert dripper.cmd("NOOP")[0] == 421
    stop = threading.Event()

    def drip() -> None:
        deadline = time.monotonic() + 12
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                dripper.sock.sendall(b"x")
            except OSError:
                return  # the server closed: what we want
            stop.wait(0.3)

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        other = connect(srv)  # -X serves one session at a time: it is greeted once the linger ends
        assert other.reply(timeout=10)[0] == 220
        waited = time.monotonic() - started
        assert waited < 5, f"the next client waited {waited:.1f}s behind a dripping one"
        assert other.cmd("QUIT")[0] == 221
    finally:
        stop.set()
        thread.join(5)
        dripper.close()


@pytest.mark.parametrize("argument", ["bad\x1bname.example", "bell\x07.example", "del\x7f.example",
                                      "tab\there.example"])
@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_helo_with_control_characters_is_refused(start_server, verb, argument):
    srv = start_server()
    c = connect(srv)
    assert c.reply()[0] == 220
    c.send(f"{verb} {argument}\r\n".encode())
    code, lines = c.reply()
    assert code == 501 and lines[0].startswith("5.5.2 "), (code, lines)
    assert "control character" in lines[0]
    assert verb not in [r["hook"] for r in records_of(srv, c)], "the hook never sees the argument"
    assert c.cmd("EHLO good.example")[0] == 250, "the session goes on"
    assert c.cmd("QUIT")[0] == 221
    c.close()


def drip(client: Client, data: bytes, interval: float, stop: threading.Event, limit: float = 15.0) -> None:
    """Send ``data`` one octet at a time every ``interval`` seconds until stopped, refused or ``limit``."""
    deadline = time.monotonic() + limit
    for octet in data:
        if stop.is_set() or time.monotonic() > deadline:
            return
        try:
            client.sock.sendall(bytes([octet]))
        except OSError:
            return
        stop.wait(interval)


def test_command_deadline_ends_a_dripping_command_line(start_server):
    """One octet every 0.3 s: the line is not complete after --command-deadline 1, so 421 4.4.2."""
    srv = start_server("--command-deadline", "1")
    c = connect(srv)
    assert c.reply()[0] == 220
    stop = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=drip, args=(c, b"NOOP and some more words\r\n", 0.3, stop), daemon=True)
    thread.start()
    try:
        code, lines = c.reply(timeout=10)
        took = time.monotonic() - started
        assert code == 421 and lines[0].startswith("4.4.2 "), (code, lines)
        assert "not complete in time" in lines[0]
        assert took < 5, f"the dripping line held the session {took:.1f}s"
        assert c.closed()
    finally:
        stop.set()
        thread.join(5)
        c.close()
    other = connect(srv)  # -X: the worker is free again
    assert other.reply()[0] == 220
    assert other.cmd("QUIT")[0] == 221


def test_command_deadline_does_not_count_idle_time(start_server):
    """The deadline starts at the line's first octet: a client idle for longer is still served."""
    srv = start_server("--command-deadline", "1", "--timeout", "10")
    c = connect(srv)
    assert c.reply()[0] == 220
    time.sleep(1.5)  # idle longer than the deadline (the idle timeout is what governs this wait)
    assert c.cmd("EHLO idle.example")[0] == 250
    c.send(b"NO")  # a line in two pieces within the deadline is fine
    time.sleep(0.3)
    c.send(b"OP\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()


def test_slow_command_lines_cannot_lock_out_a_pool(start_server, tmp_path):
    """Two clients dripping a byte per 0.5 s at --workers 2: a third is greeted once their deadlines pass."""
    srv = start_server("--command-deadline", "2", mode=("--workers", "2", "--pidfile", str(tmp_path / "p.pid")))
    stop = threading.Event()
    drippers, threads = [], []
    try:
        for _ in range(2):
            d = connect(srv)
            assert d.reply()[0] == 220
            drippers.append(d)
            t = threading.Thread(target=drip, args=(d, b"EHLO slow.example.with.a.long.name\r\n", 0.5, stop),
                                 daemon=True)
            t.start()
            threads.append(t)
        started = time.monotonic()
        third = connect(srv)
        assert third.reply(timeout=15)[0] == 220
        assert time.monotonic() - started < 8
        for d in drippers:
            code, lines = d.reply(timeout=10)
            assert code == 421 and lines[0].startswith("4.4.2 "), (code, lines)
        assert third.cmd("QUIT")[0] == 221
        third.close()
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for d in drippers:
            d.close()


def test_max_session_time_ends_a_long_session(start_server):
    """NOOP every 0.3 s keeps a session busy; --max-session-time 2 ends it with 421 4.4.2."""
    srv = start_server("--max-session-time", "2")
    c = connect(srv)
    assert c.reply()[0] == 220
    started = time.monotonic()
    code, lines = 250, []
    while code == 250 and time.monotonic() - started < 10:
        time.sleep(0.3)
        code, lines = c.cmd("NOOP")
    assert code == 421 and lines[0].startswith("4.4.2 "), (code, lines)
    assert "session time limit" in lines[0]
    assert 1.5 < time.monotonic() - started < 5
    assert c.closed()
    c.close()


def test_max_session_time_mid_message_accepts_nothing(start_server):
    """The limit strikes during DATA: 421, EOM is never called, so the client keeps the message."""
    srv = start_server("--max-session-time", "2", "--min-data-rate", "0")
    c = connect(srv)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO slow.example")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: slow\r\n\r\n")
    code, lines = c.reply(timeout=10)  # nothing more is sent: the session's deadline ends it
    assert code == 421 and lines[0].startswith("4.4.2 "), (code, lines)
    hooks = [r["hook"] for r in records_of(srv, c)]
    c.close()
    assert "DATA" in hooks and "EOM" not in hooks, hooks


def test_a_refused_bdat_chunk_is_still_read_at_the_minimum_data_rate(start_server):
    """BDAT without a transaction: its chunk is read and dropped, but not at any pace the client likes.

    Ten octets a second against --min-data-rate 1000 (grace 1 s): 421 4.4.2 within a few
    seconds, as for a chunk that is taken, not after the idle timeout or the session's deadline.
    """
    srv = start_server("--min-data-rate", "1000", "--min-data-rate-grace", "1", "--timeout", "30")
    c = connect(srv)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO slow.example")[0] == 250
    c.send(b"BDAT 100000000\r\n")  # no MAIL: refused with 503 once the chunk is read
    stop = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=drip, args=(c, b"x" * 200, 0.1, stop), daemon=True)
    thread.start()
    try:
        code, lines = c.reply(timeout=15)
        took = time.monotonic() - started
        assert code == 421 and lines[0].startswith("4.4.2 "), (code, lines)
        assert "data rate too low" in lines[0]
        assert took < 8, f"the dripping chunk held the session {took:.1f}s"
        assert c.closed()
    finally:
        stop.set()
        thread.join(5)
        c.close()
