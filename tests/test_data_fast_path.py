"""DATA's whole-message way (Reader.read_message, intake.take_message) against the piece-by-piece way.

A whole session runs in this process over a scripted socket (each client write
comes with one read, nothing goes anywhere), once as the engine runs it and once
with ``Reader.read_message`` never taking the message at once, so the message goes
through DotDecoder and MessageIntake as it did before the whole-message way
existed, and MessageParser reading every header section line by line.  For arbitrary DATA streams (dots, bare CRs and LFs, headers, folded
lines, long lines), arbitrary cuts into reads, handlers that take the body in
chunks or lines, and tight limits, both must make the same hook calls with the
same arguments, the same ``header_raw``/``header_section``, and send the same
bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prefork_esmtp import ESMTPHandler
from prefork_esmtp.dotdata import DotDecoder
from prefork_esmtp.message import MessageParser
from prefork_esmtp.reader import Reader
from prefork_esmtp.session import Session
from prefork_esmtp.settings import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from engine_micro import ScriptedSocket  # noqa: E402

PEER = ("192.0.2.1", 40000)


class Recorder(ESMTPHandler):
    """Records EOH, BODY and EOM with what the handler sees at each."""

    calls: list[tuple] = []  # set per run
    line_mode = False  # EOH turns chunk mode off
    fail_eoh = False

    def EOH(self) -> None:
        self.calls.append(("EOH", self.header_raw, self.header_section, self.chunkmode))
        if self.fail_eoh:
            raise RuntimeError("EOH fails")
        if self.line_mode:
            self.chunkmode = False

    def BODY(self, data: bytes) -> None:
        self.calls.append(("BODY", bytes(data), self.chunkmode))

    def EOM(self):  # noqa: ANN201
        self.calls.append(("EOM", self.header_raw, self.header_section, self.chunkmode))
        return super().EOM()


class QuietRecorder(ESMTPHandler):
    """Keeps the base EOH and BODY (which do nothing); records what the handler sees at EOM."""

    calls: list[tuple] = []  # set per run

    def DATA(self):  # noqa: ANN201
        self.chunkmode = True  # the message's end leaves line mode whatever came before
        return super().DATA()

    def EOM(self):  # noqa: ANN201
        self.calls.append(("EOM", self.header_raw, self.header_section, self.chunkmode))
        return super().EOM()


class HeaderRecorder(Recorder):
    """Takes HEADER calls too (so the message never goes the whole-message way)."""

    def HEADER(self, name: str, value: str) -> None:
        self.calls.append(("HEADER", name, value, self.header_raw))


def run(stream_pieces: list[bytes], handler_class: type, config, general: bool) -> tuple[list[tuple], bytes]:  # noqa: ANN001
    """One session: two messages with this DATA stream (in these reads), then QUIT."""
    writes = [b"EHLO client.example\r\n"]
    for _ in range(2):
        writes += [b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n"]
        writes += stream_pieces
    writes.append(b"QUIT\r\n")
    handler_class.calls = calls = []
    sock = ScriptedSocket(writes)
    with pytest.MonkeyPatch.context() as m:
        if general:
            def read_message(self: Reader, octets_per_second: int, grace: float) -> None:
                self.start_rate(octets_per_second, grace)
                return None
            m.setattr(Reader, "read_message", read_message)
            m.setattr(MessageParser, "_whole_section", lambda self, data: False)  # line by line only
        Session(sock, PEER, handler_class, config).run()
    return calls, b"".join(sock.sent)


junk = st.sampled_from([
    b"\r\n", b"\r", b"\n", b".", b"..", b":", b" ", b"\t", b"\xc3\xa9\xff", b"no colon", b"\r\n.\r\n", b"\r\n\r\n",
])
header_lines = st.sampled_from([
    b"Subject: hi\r\n", b"From: a@b\r\n", b"X-A:b\r\n", b" folded\r\n", b"\tx\r\n", b"To :c\r\n",
    b"Long: " + b"v" * 120 + b"\r\n", b"Huge: " + b"v" * 1100 + b"\r\n", b"Bare-LF: x\n", b"Bare-CR: x\ry\r\n", b"Empty:\r\n",
])
body_lines = st.tuples(st.sampled_from([b"", b"", b".", b"..", b"\r", b"\n", b" "]),
                       st.sampled_from([b"body text", b"x", b".", b"\xff\xfe", b"a\rb", b"a\nb", b"w" * 90]),
                       st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b""])).map(b"".join)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A DATA stream (ends with its end-of-data line, may hold one before: then the rest are
    commands) and its cuts into client writes."""
    parts = draw(st.lists(header_lines, max_size=4))
    parts.append(draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"", b"\n"])))
    parts += draw(st.lists(body_lines, max_size=8))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        parts.insert(draw(st.integers(min_value=0, max_value=len(parts))), draw(junk))
    body = b"".join(parts)
    stream = body + (b".\r\n" if body.endswith(b"\r\n") and draw(st.booleans()) else b"\r\n.\r\n")
    cuts = sorted(set(draw(st.lists(st.integers(min_value=1, max_value=max(1, len(stream) - 1)), max_size=4))))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if stream[a:b]]
    return stream, pieces


CONFIGS = {
    "defaults": {},
    "reject": {"bare_newline": "reject"},
    "tight": {"max_message_size": 1100, "max_header_size": 1000, "max_header_lines": 2},
    "no-rate": {"min_data_rate": 0},
}
# error_sleep 0: a stream with an early end-of-data leaves junk commands, each an error
_resolved = {name: resolve({}, dict(values, hostname="mx.test.example", error_sleep=0), source="test")
             for name, values in CONFIGS.items()}


def _case(stream: bytes) -> tuple[bytes, list[bytes]]:
    return stream, [stream]


# The limits' edges (tight: 2 header lines, 1000 octets of header, 1100 of message).
@example(_case(b"X-A:b\r\nX-A:b\r\n\r\nbody\r\n.\r\n"), "tight", "chunks")
@example(_case(b"X-A:b\r\nX-A:b\r\n\tc\r\n\r\nbody\r\n.\r\n"), "tight", "chunks")
@example(_case(b"H: " + b"v" * 996 + b"\r\n\r\nbody\r\n.\r\n"), "tight", "chunks")
@example(_case(b"H: " + b"v" * 997 + b"\r\n\r\nbody\r\n.\r\n"), "tight", "chunks")
@example(_case(b"H: " + b"v" * 1090 + b"\r\n\r\n.\r\n"), "tight", "lines")
@example(_case(b"H: b\r\n\r\n" + b"v" * 1087 + b"\r\n.\r\n"), "tight", "lines")
@example(_case(b"H: b\r\n\r\n" + b"v" * 1086 + b"\r\n.\r\n"), "tight", "small")
@example(_case(b"H: b\rc\r\n\r\nbody\r\n.\r\n"), "defaults", "chunks")
@example(_case(b"H: b\r\n\r\nbo\rdy\r\n.\r\n"), "reject", "chunks")
@example(_case(b"H: b\r\n\r\nbody\r\n..\r\n.\r\n"), "defaults", "lines")
@example(_case(b"H: b\r\n\r\nbody\r\n.\r\n"), "defaults", "quiet")
@settings(max_examples=400, deadline=None)
@given(streams(), st.sampled_from(sorted(CONFIGS)),
       st.sampled_from(["chunks", "lines", "small", "fail", "header", "quiet"]))
def test_whole_message_way_makes_the_same_calls(case, config_name, mode):
    stream, pieces = case
    config = _resolved[config_name]
    attrs = {"line_mode": mode == "lines", "fail_eoh": mode == "fail"}
    if mode == "small":
        attrs["chunksize"] = 7
    base = {"header": HeaderRecorder, "quiet": QuietRecorder}.get(mode, Recorder)
    handler_class = type("H", (base,), {} if mode == "quiet" else attrs)
    fast = run(pieces, handler_class, config, False)
    general = run(pieces, handler_class, config, True)
    assert fast == general


def test_the_common_message_goes_the_whole_message_way(monkeypatch):
    """The property above compares something: a plain message in one read takes the whole-message way."""
    taken = []
    original = Reader.read_message

    def spy(self: Reader, octets_per_second: int, grace: float) -> bytes | None:
        data = original(self, octets_per_second, grace)
        taken.append(data)
        return data

    monkeypatch.setattr(Reader, "read_message", spy)
    message = b"Subject: hi\r\nX: y\r\n\tz\r\n\r\n..dot\r\nbody\r\n.\r\n"
    calls, sent = run([message], Recorder, _resolved["defaults"], False)
    assert taken == [b"Subject: hi\r\nX: y\r\n\tz\r\n\r\n.dot\r\nbody\r\n"] * 2
    assert calls[:3] == [("EOH", b"X: y\r\n\tz\r\n", b"Subject: hi\r\nX: y\r\n\tz\r\n\r\n", True),
                         ("BODY", b".dot\r\nbody\r\n", True),
                         ("EOM", b"X: y\r\n\tz\r\n", b"Subject: hi\r\nX: y\r\n\tz\r\n\r\n", False)]
    assert sent.count(b"\r\n250 2.0.0 Message accepted") == 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r\n", b".", b"\r", b"\n", b"\r\n.", b"\r\n.\r\n", b"x: y"]), max_size=12),
       st.sampled_from(["read", "after command", "buffered"]))
@example([b"\r\n"], "read")
@example([b"\r\n"], "after command")
@example([b"\r\n.", b"\r\n.\r\n"], "after command")
def test_read_message_takes_what_the_decoder_takes(parts, where):
    """A DATA section read at once, buffered after a command line or alone: read_message returns what
    DotDecoder decodes up to the first end-of-data line and leaves the rest (or takes nothing, rate on)."""
    stream = b"".join(parts) + b"\r\n.\r\n"
    buf = (b"DATA\r\n" if where == "after command" else b"") + stream
    reader = Reader(ScriptedSocket([buf]), 60.0)
    if where == "after command":
        assert reader.readline(512) == b"DATA"
    elif where == "buffered":
        reader.buf, reader.pos = buf, 0
    else:  # no deadline before the socket's timeout (within the data rate's grace): read at once
        reader.timeout_set(5.0)
    start = reader.pos
    data = reader.read_message(500, 10.0)
    pieces, pos, ended = DotDecoder().decode(buf, start)
    assert ended
    if data is None:
        assert reader._rate is not None and reader.pos == start
        assert buf[start] == 0x2E  # only a first line that starts with a dot goes the long way
    else:
        assert (data, reader.pos) == (b"".join(pieces), pos)
        assert reader._rate is None
