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
