"""What a session sets up for the handler and counts at its end, as the engine makes them.

The session makes its ConnectionState without the dataclass's ``__init__``;
these tests hold it, the handler's handles and the session-duration histogram
to what the full constructors and :func:`prefork_esmtp.counters.observe` give.
Sessions run in-process over a socketpair with a real client on the other end.
"""

from __future__ import annotations

import dataclasses
import re
import socket

import pytest

from prefork_esmtp import ESMTPHandler, counters
from prefork_esmtp import session as session_module
from prefork_esmtp.reader import Reader
from prefork_esmtp.session import Session
from prefork_esmtp.settings import resolve
from prefork_esmtp.state import ConnectionState
from prefork_esmtp.writer import ReplyWriter
from protocol_support import session_over

TIMEOUT = 5.0
PEER = ("192.0.2.7", 4321)


class Watcher(ESMTPHandler):
    """Keeps what it saw at CONNECT, EHLO and DISCONNECT."""

    def CONNECT(self):
        Watcher.at_connect = {
            "state": dataclasses.replace(self._esmtp_state),  # a copy, as it was then
            "views": (self.peer, self.local, self.hostname, self.client, self.esmtp, self.tls,
                      self.auth_user, self.auth_mechanism, self.proxy, self.session_id),
            "handles": (self.input_handle, self.output_handle, self.disconnect, self.chunkmode),
        }
        return super().CONNECT()

    def EHLO(self, domain):
        Watcher.at_ehlo = (self.client, self.esmtp)
        return super().EHLO(domain)

    def DISCONNECT(self):
        Watcher.at_disconnect = (self.client, self.esmtp, self.session_id)


def run(session: Session, theirs: socket.socket, lines: list[bytes]) -> list[str]:
    """Run ``session``, send ``lines`` from ``theirs``, return every reply line."""
    return session_over(session.run, theirs, lines, TIMEOUT)


@pytest.fixture
def config():
    return resolve({}, {"hostname": "mx.test.example"}, source="test")


def test_the_session_state_is_what_the_dataclass_would_make(config):
    ours, theirs = socket.socketpair()
    session = Session(ours, PEER, Watcher, config, local=("198.51.100.25", 25))
    state = session.state
    assert re.fullmatch(r"[0-9A-F]{12}", state.session_id)
    assert state == ConnectionState(PEER, ("198.51.100.25", 25), "mx.test.example", session_id=state.session_id)
    handler = session.handler
    assert handler._esmtp_state is state
    assert isinstance(handler.input_handle, Reader) and handler.input_handle is session.reader
    writer = handler.output_handle
    assert type(writer) is ReplyWriter and writer.sock is session.conn and writer.pending is session.conn.pending
    replies = run(session, theirs, [b"EHLO c.example", b"QUIT"])
    assert replies[0].startswith("220 mx.test.example ") and replies[-1] == "221 2.0.0 Closing connection"
    seen = Watcher.at_connect
    assert seen["state"] == ConnectionState(PEER, ("198.51.100.25", 25), "mx.test.example",
                                            session_id=state.session_id)
    assert seen["views"] == (PEER, ("198.51.100.25", 25), "mx.test.example", None, False, None, None, None, None,
                             state.session_id)
    assert seen["handles"][2:] == (False, False)
    assert Watcher.at_ehlo == ("c.example", True)
    assert Watcher.at_disconnect == ("c.example", True, state.session_id)


def test_a_state_field_set_in_a_session_stays_with_that_session(config):
    """The class-level defaults are shared: what one session sets must not show in the next."""
    pairs = [socket.socketpair() for _ in range(2)]
    first, second = (Session(ours, PEER, ESMTPHandler, config) for ours, _ in pairs)
    first.state.client, first.state.tls = "one.example", {"version": "TLSv1.3"}
    assert (second.state.client, second.state.tls, second.handler.client) == (None, None, None)
    assert ConnectionState().client is None and ConnectionState.client is None
    for sock in (s for pair in pairs for s in pair):
        sock.close()


def test_no_state_field_needs_a_factory():
    """A session reads unset fields from the class: each field's default must be a plain immutable value."""
    for f in dataclasses.fields(ConnectionState):
        assert f.default is not dataclasses.MISSING, f.name
        assert getattr(ConnectionState, f.name) == f.default
        assert f.default is None or isinstance(f.default, (str, bool, int, tuple)), f.name


def test_the_session_duration_lands_where_observe_puts_it(config, monkeypatch):
    clock = iter([100.0, 100.07])  # began, then ended: 70 ms
    ours, theirs = socket.socketpair()
    monkeypatch.setattr(session_module, "_monotonic", lambda: next(clock, 100.07))
    session = Session(ours, PEER, ESMTPHandler, config)
    values = counters.current.values
    expected = list(values)
    run(session, theirs, [b"QUIT"])
    first, width = counters.SESSION_DURATION, len(counters.DURATION_BOUNDS) + 2  # buckets, +Inf, sum
    counters.observe(expected, first, counters.DURATION_BOUNDS, 0.07)  # type: ignore[arg-type]
    assert list(values[first:first + width]) == pytest.approx(expected[first:first + width])
    assert values[first + 2] == expected[first + 2] and expected[first + 2] >= 1  # 0.05 < 0.07 <= 0.1
