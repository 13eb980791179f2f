"""The command round's two paths give the same bytes on the wire.

The session loop reads a command itself when nothing is buffered, no deadline
is near and the socket is plain (the common round: send the queued replies,
check in, read one CRLF-ended line); everything else goes through
``Reader.readline`` and ``Connection.recv``.  These tests run the engine over a
scripted socket (each ``recv`` returns the next scripted piece, so the reads
are exactly as scripted) once with the default settings, where the loop's
own path serves the common rounds, and once with ``max_session_time`` shorter
than ``timeout``, where every read takes the long way, and require the same
replies, byte for byte, the same session state, and the same steps in the same
order: the replies sent, the check-in (with the time it promises) before every
read, ``stopping()`` asked before every wait outside a transaction.  A real-socket test checks
that the common round really is taken, and what it does on the wire.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_esmtp import ESMTPHandler
from prefork_esmtp import replies as R
from prefork_esmtp.reader import Reader
from prefork_esmtp.reporter import Reporter
from prefork_esmtp.session import Session
from prefork_esmtp.settings import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import engine_micro  # noqa: E402

PEER = ("192.0.2.1", 4321)
#: ``recv`` raises BlockingIOError here, as a read whose SO_RCVTIMEO ran out early does.
WAKE = object()
COMMON = {"hostname": "mx.test.example", "error_sleep": "0", "max_junk_commands": "1000", "max_errors": "1000"}
FAST = resolve({}, COMMON, source="fast")
#: The session's end within an idle timeout: every read takes the long way.
SLOW = resolve({}, {**COMMON, "timeout": "300", "max_session_time": "200"}, source="slow")
#: The same two with command lines ended by a bare LF refused.
FAST_LF = resolve({}, {**COMMON, "command_bare_lf": "reject"}, source="fast, bare LF refused")
SLOW_LF = resolve({}, {**COMMON, "command_bare_lf": "reject", "timeout": "300", "max_session_time": "200"},
                  source="slow, bare LF refused")


class Wake:
    """A scripted read that wakes early (BlockingIOError) after ``seconds`` on the test's clock."""

    def __init__(self, clock: list[float], seconds: float) -> None:
        self.clock, self.seconds = clock, seconds


class ScriptedSocket(engine_micro.ScriptedSocket):
    """The engine microbenchmark's scripted socket, logging what the session does and waking early on cue.

    ``send_mode``: "all" (a send takes everything), "partial" (a non-blocking
    send takes 3 octets), "eagain" (a non-blocking send finds the window full).
    """

    def __init__(self, pieces: list[Any], send_mode: str = "all") -> None:
        super().__init__(pieces)
        self.send_mode = send_mode
        #: what the session did, in order: ("recv",), ("sent", octets), ("check_in", seconds), ("stopping",)
        self.log: list[tuple[Any, ...]] = []

    def _keep(self, data: Any) -> None:
        super()._keep(data)
        if self.log and self.log[-1][0] == "sent":  # one send or several: the same octets in order
            self.log[-1] = ("sent", self.log[-1][1] + bytes(data))
        else:
            self.log.append(("sent", bytes(data)))

    def _take(self) -> bytes:
        piece = super()._take()
        if piece is WAKE:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        if isinstance(piece, Wake):
            piece.clock[0] += piece.seconds
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return piece

    def recv(self, size: int, flags: int = 0) -> bytes:
        self.log.append(("recv",))
        return super().recv(size, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        if flags & socket.MSG_DONTWAIT and self.send_mode == "eagain":
            raise BlockingIOError(11, "Resource temporarily unavailable")
        if flags & socket.MSG_DONTWAIT and self.send_mode == "partial":
            data = data[:3]
        return super().send(data, flags)


def serve(config: Any, pieces: list[Any], send_mode: str = "all",
          stop_at: int | None = None) -> tuple[bytes, dict[str, Any], int]:
    """Run one session over the script; its output, its state at the end, and how often readline ran.

    ``stop_at``: the server starts stopping at this call of ``stopping()`` (None: never).
    """
    calls = [0]
    sock = ScriptedSocket(pieces, send_mode)

    def stopping() -> bool:
        calls[0] += 1
        sock.log.append(("stopping",))
        return stop_at is not None and calls[0] >= stop_at

    class Recorder(Reporter):
        def check_in(self, expect: float) -> None:
            sock.log.append(("check_in", expect))

    session = Session(sock, PEER, ESMTPHandler, config, stopping, Recorder())  # type: ignore[arg-type]
    readlines = [0]
    readline = session.reader.readline

    def counted(limit: int) -> bytes:
        readlines[0] += 1
        return readline(limit)

    session.reader.readline = counted  # type: ignore[method-assign]
    session.run()
    state = {"received": session.reader.received, "errors": session.errors, "junk": session.junk,
             "end": session.end, "quit": session.quit, "stopping calls": calls[0],
             "accepted": session.transaction.messages_accepted, "last": session.last_reply,
             "log": sock.log}
    return b"".join(sock.sent), state, readlines[0]


MESSAGE = [b"Subject: round", b"", b"body", b"..dot", b"."]
LINES = st.sampled_from([
    b"EHLO client.example", b"ehlo client.example", b"HELO client.example", b"EHLO", b"LHLO x",
    b"MAIL FROM:<a@example.org>", b"mail from:<a@example.org> SIZE=100", b"MAIL FROM:<>",
    b"RCPT TO:<b@example.net>", b"RCPT TO:<c@example.net> NOTIFY=NEVER", b"rcpt to:<bad",
    b"DATA", b"DATA x", b"RSET", b"NOOP", b"noop", b"VRFY b", b"EXPN", b"HELP", b"STARTTLS", b"AUTH PLAIN",
    b"QUIT x", b"FOO bar", b"", b"  ", b"MAIL FROM:<\xc3\xa9@example.org> SMTPUTF8", b"NOOP\x00",
    b"NOOP\rx", b"\xff\xfe", b"X" * 600, b"BDAT 4 LAST", *MESSAGE,
    # spaces and tabs around a verb the loop may call itself, and what must not reach it
    b"DATA \t", b"DATA\t", b"QUIT ", b"MAIL\tFROM:<a@example.org>", b"RCPT TO:<b@example.net> \t",
    b"RCPT  TO:<b@example.net>", b"MAIL FROM:<a\x00@example.org>", b"RCPT TO:<b\r@example.net>", b"Mail FROM:<>",
])
ENDINGS = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n"])
#: One read's worth: one or more lines (each with its ending), a BDAT chunk, a whole message.
PIECE = st.one_of(
    st.lists(st.tuples(LINES, ENDINGS).map(b"".join), min_size=1, max_size=3).map(b"".join),
    st.just(b"abcd"),
    st.just(b"".join(line + b"\r\n" for line in [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>",
                                                  b"DATA", *MESSAGE])),
)


@st.composite
def scripts(draw: Any) -> list[Any]:
    """A client's reads: pieces, some cut in two, some reads woken early; often QUIT at the end."""
    out: list[Any] = [b"EHLO client.example\r\n"] if draw(st.booleans()) else []
    for piece in draw(st.lists(PIECE, max_size=12)):
        if draw(st.integers(0, 5)) == 0:
            out.append(WAKE)
        if len(piece) > 1 and draw(st.integers(0, 4)) == 0:
            cut = draw(st.integers(1, len(piece) - 1))
            out += [piece[:cut], piece[cut:]]
        else:
            out.append(piece)
    if draw(st.booleans()):
        out.append(b"QUIT\r\n")
    return out


@settings(max_examples=400, deadline=None)
@given(script=scripts(), send_mode=st.sampled_from(["all", "partial", "eagain"]),
       stop_at=st.one_of(st.none(), st.integers(1, 12)), bare_lf_refused=st.booleans())
def test_the_common_round_and_the_long_way_say_the_same(script: list[Any], send_mode: str,
                                                        stop_at: int | None, bare_lf_refused: bool) -> None:
    fast_config, slow_config = (FAST_LF, SLOW_LF) if bare_lf_refused else (FAST, SLOW)
    fast, fast_state, _ = serve(fast_config, script, send_mode, stop_at)
    slow, slow_state, _ = serve(slow_config, script, send_mode, stop_at)
    assert fast == slow
    assert fast_state == slow_state


@pytest.mark.parametrize("length, reply", [(512, b"500 5.5.2 Command unrecognized: "),
                                           (513, b"500 5.5.2 Error: command line too long\r\n")])
def test_the_line_limit_holds_on_the_common_round(length: int, reply: bytes) -> None:
    """A read that is one whole line: within max_line_length (CRLF counted) a command, one octet more too long."""
    script = [b"EHLO client.example\r\n", b"X" * (length - 2) + b"\r\n", b"QUIT\r\n"]
    fast, _, fast_readlines = serve(FAST, script)
    slow, _, _ = serve(SLOW, script)
    assert fast == slow
    assert fast.split(b"250 BINARYMIME\r\n")[1].startswith(reply)
    assert fast_readlines == (length > 512)  # the line within the limit is the loop's own


def test_a_bare_lf_refused_after_the_common_round() -> None:
    """command_bare_lf = reject: a CRLF line read by the loop clears the bare-LF mark of the line before."""
    script = [b"EHLO client.example\r\n", b"NOOP\n", b"NOOP\r\n", b"QUIT\r\n"]
    fast, _, _ = serve(FAST_LF, script)
    slow, _, _ = serve(SLOW_LF, script)
    assert fast == slow
    assert fast.endswith(b"250 BINARYMIME\r\n500 5.5.2 Error: bare LF in command; lines must end with CRLF\r\n"
                         b"250 2.0.0 OK\r\n221 2.0.0 Closing connection\r\n")


@pytest.mark.parametrize("config", [FAST, SLOW], ids=["common round", "long way"])
def test_an_early_wake_keeps_the_idle_timeout_from_when_the_wait_began(monkeypatch: pytest.MonkeyPatch,
                                                                       config: Any) -> None:
    """Reads woken early (SO_RCVTIMEO) wait on, but the idle timeout counts from the wait's start."""
    import time

    import prefork_esmtp.reader
    import prefork_esmtp.session
    clock = [time.monotonic()]
    monkeypatch.setattr(prefork_esmtp.reader, "_monotonic", lambda: clock[0])
    monkeypatch.setattr(prefork_esmtp.session, "_monotonic", lambda: clock[0])
    config = resolve({}, {**COMMON, "timeout": "10", "max_session_time": "200" if config is SLOW else "3600"})
    # 6 s asleep: the read goes on; 6 s more: 12 s since the wait began, past the 10 s timeout
    ok = [b"EHLO client.example\r\n", Wake(clock, 6), b"NOOP\r\n", b"QUIT\r\n"]
    late = [b"EHLO client.example\r\n", Wake(clock, 6), Wake(clock, 6), b"NOOP\r\n"]
    out, _, _ = serve(config, ok)
    assert out.endswith(b"250 BINARYMIME\r\n250 2.0.0 OK\r\n221 2.0.0 Closing connection\r\n")
    out, state, _ = serve(config, late)
    assert out.endswith(b"250 BINARYMIME\r\n421 4.4.2 mx.test.example Error: timeout exceeded\r\n")
    assert state["end"] == "timeout"


def test_single_line_reads_take_the_common_round() -> None:
    """One whole CRLF line per read: no command goes through readline, the first one included."""
    script = [b"EHLO client.example\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n",
              b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"NOOP\r\n", b"QUIT\r\n"]
    fast, _, fast_readlines = serve(FAST, script)
    slow, _, slow_readlines = serve(SLOW, script)
    assert fast == slow
    assert fast.endswith(b"250 BINARYMIME\r\n250 2.1.0 <a@example.org>, sender ok\r\n"
                         b"250 2.1.5 <b@example.net>, recipient ok\r\n"
                         b"354 Enter mail, end with \".\" on a line by itself\r\n"
                         b"250 2.0.0 Message accepted for delivery\r\n250 2.0.0 OK\r\n"
                         b"221 2.0.0 Closing connection\r\n")
    assert slow_readlines == 6  # every command
    assert fast_readlines == 0


_ROUND_COMMANDS = [b"EHLO client.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>", b"DATA",
                   b"NOOP", b"rset", b"STARTTLS", b"FOO", b"QUIT"]


@pytest.mark.parametrize("settings_, dispatched", [
    ({}, [b"NOOP", b"rset", b"STARTTLS", b"FOO"]),  # junk, lower case, STARTTLS, unknown
    # every command checked first (MAIL refused before TLS: the message's lines are commands too)
    ({"require_tls": "true"}, _ROUND_COMMANDS[:4] + [b"Subject: x", b"", b"body", b"."] + _ROUND_COMMANDS[4:]),
    ({"forbid_unauth_pipelining": "true"}, _ROUND_COMMANDS),
], ids=["plain", "require_tls", "forbid_unauth_pipelining"])
def test_the_round_calls_plain_verbs_itself(settings_: dict[str, str], dispatched: list[bytes]) -> None:
    """A plain verb read by the common round is called by the loop; every other line goes through _dispatch."""
    script = [b"EHLO client.example\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n",
              b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"NOOP\r\n", b"rset\r\n", b"STARTTLS\r\n",
              b"FOO\r\n", b"QUIT\r\n"]
    session = Session(ScriptedSocket(script), PEER, ESMTPHandler,  # type: ignore[arg-type]
                      resolve({}, {**COMMON, **settings_}))
    lines: list[bytes] = []
    dispatch = session._dispatch

    def counted(line: bytes) -> None:
        lines.append(line)
        dispatch(line)

    session._dispatch = counted  # type: ignore[method-assign]
    session.run()
    assert lines == dispatched
    assert session.quit and session.transaction.messages_accepted == (0 if "require_tls" in settings_ else 1)


def test_pipelined_and_partial_reads_go_the_long_way() -> None:
    """Two lines in one read, half a line, a bare LF: the cut is readline's, from the same buffer."""
    script = [b"EHLO client.example\r\n", b"NOOP\r\nNOOP\r\n", b"NO", b"OP\r\n", b"NOOP\n", b"QUIT\r\n"]
    fast, _, fast_readlines = serve(FAST, script)
    slow, _, _ = serve(SLOW, script)
    assert fast == slow
    assert fast.endswith(b"250 BINARYMIME\r\n" + b"250 2.0.0 OK\r\n" * 4 + b"221 2.0.0 Closing connection\r\n")
    assert fast_readlines == 4  # the two pipelined NOOPs, the cut one, the bare-LF one


def test_a_stop_before_the_wait_ends_an_idle_session() -> None:
    """stopping() turns true just before the read (the signal came before the wait): 421, not a wait for the client."""
    script = [b"EHLO client.example\r\n", b"NOOP\r\n", b"NOOP\r\n"]
    out, state, _ = serve(FAST, script, stop_at=2)  # 1: before EHLO's read; 2: before the NOOP's
    assert state["end"] == "stopping"
    # EHLO's reply, then 421: the NOOP was never read
    assert out.endswith(b"250 BINARYMIME\r\n421 4.3.2 mx.test.example Service shutting down, closing connection\r\n")
    assert state["received"] == len(script[0])


@pytest.mark.parametrize("config", [FAST, SLOW], ids=["common round", "long way"])
def test_a_stop_ends_an_idle_session_before_a_buffered_command(config: Any) -> None:
    """A command read with the one before (pipelined) waits for no read: the stop is looked at before it."""
    script = [b"EHLO client.example\r\n", b"NOOP\r\nNOOP\r\n", b"NOOP\r\n"]
    # 1: before EHLO's read; 2: before the two NOOPs' read; 3: before the second NOOP, buffered
    out, state, _ = serve(config, script, stop_at=3)
    assert state["end"] == "stopping"
    assert state["stopping calls"] == 3
    assert out.endswith(b"250 BINARYMIME\r\n250 2.0.0 OK\r\n"
                       b"421 4.3.2 mx.test.example Service shutting down, closing connection\r\n")
    assert state["received"] == len(script[0]) + len(script[1])


def test_the_common_round_over_a_real_socket() -> None:
    """Over a socketpair, a non-pipelining client: the replies are right and arrive one send each."""
    ours, theirs = socket.socketpair()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            Session(ours, PEER, ESMTPHandler, FAST).run()
        except BaseException as exc:  # a session must never raise
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    theirs.settimeout(10)
    buf = b""

    def reply() -> bytes:
        nonlocal buf
        while True:
            lines = buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    whole = b"\r\n".join(lines[:i + 1]) + b"\r\n"
                    buf = buf[len(whole):]
                    return whole
            data = theirs.recv(65536)
            assert data, "the server closed early"
            buf += data

    try:
        assert reply().startswith(b"220 mx.test.example ")
        for command, expected in ((b"EHLO client.example", b"250 BINARYMIME\r\n"),
                                  (b"MAIL FROM:<a@example.org>", b"250 2.1.0 <a@example.org>, sender ok\r\n"),
                                  (b"RCPT TO:<b@example.net>", b"250 2.1.5 <b@example.net>, recipient ok\r\n"),
                                  (b"rset", b"250 2.0.0 OK\r\n"),
                                  (b"NOOP", b"250 2.0.0 OK\r\n"),
                                  (b"FOO", b"500 5.5.2 Command unrecognized: FOO\r\n"),
                                  (b"QUIT", b"221 2.0.0 Closing connection\r\n")):
            theirs.sendall(command + b"\r\n")
            assert reply().endswith(expected), command
        assert theirs.recv(1) == b""
    finally:
        theirs.close()
        thread.join(10)
    assert not thread.is_alive()
    assert not failure, failure


@pytest.mark.parametrize("send_mode", ["partial", "eagain"])
def test_a_full_window_sends_the_rest_the_long_way(send_mode: str) -> None:
    """The first non-blocking send takes part or nothing: the rest follows, in order, nothing twice."""
    script = [b"EHLO client.example\r\n", b"NOOP\r\n", b"MAIL FROM:<a@example.org>\r\n", b"QUIT\r\n"]
    full, _, _ = serve(FAST, script)
    cut, _, _ = serve(FAST, script, send_mode)
    assert cut == full
    assert full.endswith(b"250 BINARYMIME\r\n250 2.0.0 OK\r\n250 2.1.0 <a@example.org>, sender ok\r\n"
                         b"221 2.0.0 Closing connection\r\n")


def test_reader_keeps_its_counts_on_the_common_round() -> None:
    """What the loop reads itself counts in Reader.received, and leaves nothing pending."""
    script = [b"EHLO client.example\r\n", b"NOOP\r\n", b"QUIT\r\n"]
    sock = ScriptedSocket(script)
    session = Session(sock, PEER, ESMTPHandler, FAST)  # type: ignore[arg-type]
    session.run()
    assert session.reader.received == sum(len(piece) for piece in script)
    assert isinstance(session.reader, Reader) and not session.reader.pending()
    assert session.reader.bare_lf is False


def rcvtimeo(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)


@pytest.mark.parametrize("settings_", [
    {},  # the data rate's grace (10 s) is the first read's timeout
    {"min_data_rate": "0"},  # the idle timeout, whole seconds
    {"min_data_rate": "0", "timeout": "1.5"},  # under 2 s: as it is
    {"min_data_rate": "0", "timeout": "7.9"},
], ids=["grace", "idle timeout", "short", "rounded down"])
def test_ready_sets_the_timeout_the_first_read_would(settings_: dict[str, str]) -> None:
    """Reader.ready before the first command: the socket's SO_RCVTIMEO is what the first read sets."""
    from prefork_esmtp.connection import Connection

    config = resolve({}, {**COMMON, **settings_})
    results = []
    for ready in (True, False):
        ours, theirs = socket.socketpair()
        conn = Connection(ours, PEER, config)
        try:
            before = rcvtimeo(ours)
            if ready:
                conn.reader.ready()
            else:
                theirs.sendall(b"NOOP\r\n")
                assert conn.reader.readline(512) == b"NOOP"
            results.append(rcvtimeo(ours))
        finally:
            conn.close()
            theirs.close()
    assert results[0] == results[1] != before


def test_ready_leaves_the_first_read_alone_when_a_deadline_is_near() -> None:
    """The session's end within an idle timeout, or a timeout set already: ready() sets nothing."""
    from prefork_esmtp.connection import Connection

    for settings_, set_before in (({"timeout": "300", "max_session_time": "200"}, None), ({}, 5.0)):
        ours, theirs = socket.socketpair()
        conn = Connection(ours, PEER, resolve({}, {**COMMON, **settings_}))
        try:
            if set_before is not None:  # as the PROXY header's read leaves it
                conn.settimeout(set_before)
                conn.reader.timeout_set(set_before)
            before = rcvtimeo(ours)
            conn.reader.ready()
            assert rcvtimeo(ours) == before
        finally:
            conn.close()
            theirs.close()


@settings(max_examples=300, deadline=None)
@given(reply=st.one_of(
    st.builds(lambda code, line: R.HookReply(code, [line]), st.integers(200, 599), st.one_of(
        st.text(max_size=12), st.sampled_from(["", "2.1.0", "2.1.0 x", "5.5.2x", "x.y", "2.", "<a@b>, sender ok"]),
        st.tuples(st.sampled_from(["2.0.0", "5.1.1"]), st.text(max_size=6)).map(" ".join))),
    st.builds(lambda code, lines: R.HookReply(code, lines), st.integers(200, 599), st.lists(st.text(max_size=6))),
    st.sampled_from(sorted(R._CONSTANTS, key=repr)),
    st.builds(lambda code, text: R.Reply(code, "", text), st.integers(200, 599), st.text(max_size=8))),
    verb=st.sampled_from(["", "CONNECT", "HELO", "EHLO", "MAIL", "RCPT", "DATA", "EOM", "VRFY", "AUTH", "UNKNOWN"]))
def test_answer_queues_the_bytes_wire_frames(reply: Any, verb: str) -> None:
    """_answer frames the commonest replies from wire's tables: the same bytes as wire, first time and after."""
    session = Session(ScriptedSocket([]), PEER, ESMTPHandler, FAST)  # type: ignore[arg-type]
    for _ in range(2):
        session.conn.pending.clear()
        session._answer(reply, verb)
        assert session.conn.pending == [R.wire(reply, verb)]
        assert session.last_reply == (reply, verb)


def test_answer_queues_a_framed_reply_as_it_is_and_counts_rcpt() -> None:
    """The base MAIL and RCPT replies come made with their bytes: _answer queues those bytes, keeps the
    reply as the last one and counts RCPT's outcome, as for the reply they stand for."""
    from prefork_esmtp import counters

    session = Session(ScriptedSocket([]), PEER, ESMTPHandler, FAST)  # type: ignore[arg-type]
    ok, refused = counters.BY_VERB["RCPT"][2], counters.BY_VERB["RCPT"][5]
    for verb, line in (("MAIL", "<a@b.example>, sender ok"), ("RCPT", "<c@d.example>, recipient ok")):
        data = R.wire(R.HookReply(250, [line]), verb)
        reply = tuple.__new__(R.FramedReply, (250, data, len(data) - len(line) - 2))
        assert reply.lines == [line]
        before = session.counts[ok], session.counts[refused], session.errors
        session.conn.pending.clear()
        session._answer(reply, verb)
        assert session.conn.pending == [data]
        assert session.conn.pending[0] is data  # queued as it is, not framed again
        assert session.last_reply == (reply, verb)
        assert (session.counts[ok], session.counts[refused], session.errors) == \
            (before[0] + (verb == "RCPT"), before[1], before[2])
        assert not session.closing
