"""The upstream client of the relay and LMTP handlers: dot-stuffing, replies, failures.

The stuffer is checked against the engine's own DATA decoder (what we send must
decode to the message with CRLF line ends) at random split points; the client
talks to a real prefork-esmtp server and to sockets that misbehave on purpose.
"""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import messages_from
from prefork_esmtp.dotdata import DotDecoder
from prefork_esmtp.smtpclient import DotStuffer, SMTPClient, UpstreamError, parse_address, xtext


def _stuff(pieces: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.stuff(p) for p in pieces) + stuffer.end()


def _decode(wire: bytes) -> tuple[bytes, int]:
    """The message the engine's decoder reads from ``wire``, and where end-of-data was."""
    pieces, pos, ended = DotDecoder().decode(wire, 0)
    assert ended, "no end-of-data line"
    return b"".join(pieces), pos


def _crlf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


@pytest.mark.parametrize("message, wire", [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".hidden\r\n.\r\n", b"..hidden\r\n..\r\n.\r\n"),
    (b"x\n.\nMAIL FROM:<evil>\n", b"x\r\n..\r\nMAIL FROM:<evil>\r\n.\r\n"),  # smuggling: bare LF made CRLF
    (b"x\r.\ry", b"x\r\n..\r\ny\r\n.\r\n"),
])
def test_stuffing_examples(message, wire):
    assert _stuff([message]) == wire


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.replace(b"a", b".").replace(b"b", b"\r").replace(b"c", b"\n")),
       st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_stuffed_stream_decodes_to_the_message_with_crlf(message, cuts):
    points = sorted({min(c, len(message)) for c in cuts})
    pieces = [message[a:b] for a, b in zip([0, *points], [*points, len(message)])]
    wire = _stuff(pieces)
    decoded, end = _decode(wire)
    assert end == len(wire), "end-of-data only at the very end"
    expected = _crlf(message)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert decoded == expected


def test_xtext_and_addresses():
    assert xtext("mail.example.org") == "mail.example.org"
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert parse_address("127.0.0.1:25") == ("127.0.0.1", 25)
    assert parse_address("[::1]:2525") == ("::1", 2525)
    assert parse_address("unix:/run/lmtp") == "/run/lmtp"
    for bad in ("nohost", "host:0", "host:99999", "unix:", ":25"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_relays_a_message_to_a_real_server(start_server):
    srv = start_server()
    client = SMTPClient(("127.0.0.1", srv.port), timeout=10)
    assert client.connect().code == 220
    reply = client.ehlo("relay.test.example")
    assert reply.code == 250 and client.has("PIPELINING") and client.has("SIZE")
    assert client.extensions["SIZE"].isdigit()
    mail, rcpt = client.pipeline(["MAIL FROM:<a@example.org>", "RCPT TO:<reject@example.org>"])
    assert mail.code == 250 and rcpt.code == 550 and rcpt.lines[0].startswith("5.7.1")
    assert client.command("RCPT TO:<b@example.org>").code == 250
    assert client.data().code == 354
    for piece in (b"Subject: hi\r\n\r\n.line one\r", b"\n..two\r\nlast"):
        client.data_chunk(piece)
    [done] = client.end_data()
    assert done.code == 250
    client.quit()
    [message] = messages_from(srv.records())
    assert message["body"] == b".line one\r\n..two\r\nlast\r\n"


def _fake_upstream(script) -> tuple[socket.socket, threading.Thread]:
    """A listening socket whose one connection is handled by ``script(conn)``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        listener.settimeout(10)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                script(conn)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("behaviour, enhanced", [
    ("silent", "4.4.2"), ("garbage", "4.3.0"), ("close", "4.4.2"), ("mixed", "4.3.0"), ("glued", "4.3.0"),
])
def test_a_misbehaving_upstream_raises_a_transient_reply(behaviour, enhanced):
    def script(conn: socket.socket) -> None:
        if behaviour == "silent":
            conn.recv(10)  # never answers: the client times out
            threading.Event().wait(3)
        elif behaviour == "garbage":
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        elif behaviour == "mixed":
            conn.sendall(b"220-first\r\n250 second\r\n")
        elif behaviour == "glued":  # a code must be followed by a space, a hyphen or the line end
            conn.sendall(b"2200 not a 220\r\n")
        # "close": closes at once

    listener, thread = _fake_upstream(script)
    client = SMTPClient(listener.getsockname(), timeout=1, name="fake")
    try:
        with pytest.raises(UpstreamError) as info:
            client.connect()
        code, lines = info.value.reply
        assert code == 451 and lines[0].startswith(enhanced + " "), info.value.reply
        assert "fake" in lines[0]
        assert not client.connected
    finally:
        listener.close()
        thread.join(5)


def test_an_upstream_not_listening_is_451_4_4_1():
    probe = socket.create_server(("127.0.0.1", 0))
    address = probe.getsockname()
    probe.close()
    with pytest.raises(UpstreamError) as info:
        SMTPClient(address, timeout=2).connect()
    assert info.value.reply.code == 451 and info.value.reply.lines[0].startswith("4.4.1 ")


def test_reply_lines_are_bounded():
    def script(conn: socket.socket) -> None:
        conn.sendall(b"220 " + b"x" * 20000 + b"\r\n")

    listener, thread = _fake_upstream(script)
    try:
        with pytest.raises(UpstreamError) as info:
            SMTPClient(listener.getsockname(), timeout=2).connect()
        assert info.value.reply.lines[0].startswith("4.3.0 ")
    finally:
        listener.close()
        thread.join(5)
