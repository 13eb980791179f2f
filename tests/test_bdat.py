"""CHUNKING and BINARYMIME (RFC 3030) by raw socket: exact octet counts,
no dot handling, 250 per chunk, pipelined chunks, limits across chunks, and the
handler seeing the same HEADER/EOH/BODY/EOM as with DATA.
"""

from __future__ import annotations

import pytest

from conftest import Client
from protocol_support import module_server, launch
from tls_support import ehlo_keywords, messages_of, records_of

MAX_SIZE = 4096
ACCEPTED = (250, ["2.0.0 Message accepted for delivery"])
MESSAGE = (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: chunked\r\n"
           b"X-Long: folded\r\n continued\r\n\r\n"
           b"First line.\r\n.leading dot\r\n..two dots\r\n\r\nLast line.\r\n")


srv = module_server("bdat", "--max-message-size", str(MAX_SIZE),
                    "--error-sleep", "0")


@pytest.fixture
def c(srv):
    client = Client(srv.connect())
    assert client.reply()[0] == 220
    code, lines = client.cmd("EHLO client.example")
    assert code == 250
    yield client
    client.close()


def envelope(c: Client, sender: str = "alice@example.org", params: str = "") -> None:
    assert c.cmd(f"MAIL FROM:<{sender}>{params}")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250


def bdat(c: Client, data: bytes, last: bool = False) -> tuple[int, list[str]]:
    c.send(f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data)
    return c.reply()


def chunk_ok(n: int) -> tuple[int, list[str]]:
    return (250, [f"2.0.0 {n} octets received"])


def test_chunking_and_binarymime_advertised(srv):
    c = Client(srv.connect())
    try:
        assert c.reply()[0] == 220
        code, lines = c.cmd("EHLO client.example")
        assert {"CHUNKING", "BINARYMIME", "PIPELINING"} <= ehlo_keywords(lines)
    finally:
        c.close()


def test_one_chunk(srv, c):
    envelope(c)
    assert bdat(c, MESSAGE, last=True) == ACCEPTED
    [message] = messages_of(srv, c)
    assert message["headers"] == [("From", "alice@example.org"), ("To", "bob@example.net"),
                                  ("Subject", "chunked"), ("X-Long", "folded continued")]
    assert message["body"] == b"First line.\r\n.leading dot\r\n..two dots\r\n\r\nLast line.\r\n", \
        "no dot-unstuffing in BDAT"
    assert message["recipients"] == ["bob@example.net"]


def test_several_chunks_split_anywhere(srv, c):
    envelope(c)
    cuts = [0, 5, 6, 44, 45, 46, 90, 91, len(MESSAGE)]  # inside a header name, between CR and LF, ...
    pieces = [MESSAGE[a:b] for a, b in zip(cuts, cuts[1:])]
    for piece in pieces:
        assert bdat(c, piece) == chunk_ok(len(piece))
    assert bdat(c, b"", last=True) == ACCEPTED
    [message] = messages_of(srv, c)
    assert len(message["headers"]) == 4
    assert message["body"] == MESSAGE[MESSAGE.index(b"\r\n\r\n") + 4:]


def test_pipelined_chunks_with_their_bytes_in_one_send(srv, c):
    one, two, three = MESSAGE[:30], MESSAGE[30:100], MESSAGE[100:]
    c.send(b"MAIL FROM:<pipe@example.org>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\n"
           + b"BDAT %d\r\n" % len(one) + one
           + b"BDAT %d\r\n" % len(two) + two
           + b"BDAT %d LAST\r\n" % len(three) + three
           + b"QUIT\r\n")
    replies = c.replies(7)
    assert [code for code, _ in replies] == [250, 250, 250, 250, 250, 250, 221]
    assert replies[3:6] == [chunk_ok(len(one)), chunk_ok(len(two)), ACCEPTED]
    assert c.closed()
    [message] = messages_of(srv, c)
    assert message["sender"] == "pipe@example.org"
    assert message["recipients"] == ["bob@example.net", "carol@example.net"]
    assert message["body"] == MESSAGE[MESSAGE.index(b"\r\n\r\n") + 4:]


def test_binary_chunk_with_end_of_data_inside_is_byte_identical(srv, c):
    body = (bytes(range(256)) + b"\r\n.\r\n" + b"MAIL FROM:<smuggled@example.org>\r\n"
            + b"\r\n.\r\nQUIT\r\n" + b"\n.\n" + b"\r.\r" + b".\r\n" + b"\x00\xff" * 40 + b"\r\n.")
    envelope(c, params=" BODY=BINARYMIME")
    header = b"Subject: binary\r\nContent-Type: application/octet-stream\r\n\r\n"
    assert bdat(c, header + body[:300]) == chunk_ok(len(header) + 300)
    assert bdat(c, body[300:]) == chunk_ok(len(body) - 300)
    assert bdat(c, b"", last=True) == ACCEPTED, "nothing inside a chunk ends anything"
    assert c.cmd("NOOP")[0] == 250, "and nothing inside was taken as a command"
    [message] = messages_of(srv, c)
    assert message["body"] == body
    assert message["record"]["mail_params"] == {"BODY": "BINARYMIME"}
    hooks = [r["hook"] for r in records_of(srv, c)]
    assert "NOOP" in hooks and hooks.count("MAIL") == 1 and "QUIT" not in hooks


def test_oversize_across_chunks_552(srv, c):
    envelope(c, sender="big@example.org")
    half = b"Subject: big\r\n\r\n" + b"x" * 2500
    assert bdat(c, half) == chunk_ok(len(half))
    assert bdat(c, b"y" * 2500) == (552, ["5.3.4 Error: message exceeds the fixed size limit; message discarded"])
    # RFC 3030: the transaction has failed; later chunks get 503 (their bytes still read).
    assert bdat(c, b"z" * 10, last=True) == (503, ["5.5.1 Error: need MAIL command"])
    assert c.cmd("NOOP")[0] == 250, "in sync after the refused chunks"
    assert messages_of(srv, c) == [], "EOM never called"
    envelope(c)
    assert bdat(c, b"y" * (MAX_SIZE + 1), last=True)[0] == 552, "one LAST chunk over the limit"
    envelope(c)
    assert bdat(c, b"Subject: fits\r\n\r\n" + b"y" * (MAX_SIZE - 17), last=True) == ACCEPTED, \
        "exactly the limit is fine"


def test_size_parameter_over_limit_552_at_mail(c):
    assert c.cmd(f"MAIL FROM:<a@example.org> SIZE={MAX_SIZE + 1}") == \
        (552, [f"5.3.4 Error: message size exceeds the fixed limit of {MAX_SIZE} octets"])


def test_bdat_after_last_503(srv, c):
    envelope(c)
    assert bdat(c, MESSAGE, last=True) == ACCEPTED
    assert bdat(c, b"more bytes", last=True) == (503, ["5.5.1 Error: need MAIL command"])
    assert bdat(c, b"and more") == (503, ["5.5.1 Error: need MAIL command"])
    assert c.cmd("NOOP")[0] == 250, "the refused chunks' bytes were read, not taken as commands"
    assert len(messages_of(srv, c)) == 1


def test_data_after_bdat_503(srv, c):
    envelope(c)
    assert bdat(c, MESSAGE[:40]) == chunk_ok(40)
    assert c.cmd("DATA") == (503, ["5.5.1 Error: DATA after BDAT in one transaction"])
    assert bdat(c, MESSAGE[40:], last=True) == ACCEPTED, "the BDAT transaction goes on"
    [message] = messages_of(srv, c)
    assert message["body"] == MESSAGE[MESSAGE.index(b"\r\n\r\n") + 4:]


def test_binarymime_needs_bdat(srv, c):
    envelope(c, params=" BODY=BINARYMIME")
    assert c.cmd("DATA") == (503, ["5.5.1 Error: BODY=BINARYMIME needs BDAT, not DATA"])
    assert bdat(c, MESSAGE, last=True) == ACCEPTED
    assert c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME")[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org> BODY=BINARY")[0] == 501


def test_bdat_without_transaction_discards_and_stays_in_sync(srv, c):
    assert bdat(c, b"QUIT\r\n") == (503, ["5.5.1 Error: need MAIL command"])
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert bdat(c, b"RSET\r\n", last=True) == (554, ["5.5.1 Error: no valid recipients"])
    assert c.cmd("NOOP")[0] == 250
    hooks = [r["hook"] for r in records_of(srv, c)]
    assert "QUIT" not in hooks and "RSET" not in hooks and "DATA" not in hooks


@pytest.mark.parametrize("line", ["BDAT", "BDAT x", "BDAT 10 NOTLAST", "BDAT -1", "BDAT 1 LAST extra"])
def test_bad_bdat_syntax_501_and_close(srv, line):
    c = Client(srv.connect())
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd(line) == (501, ["5.5.4 Syntax: BDAT size [LAST]"])
        assert c.closed(), "the chunk size is unknown: the server cannot stay in sync"
    finally:
        c.close()


def test_empty_message_in_one_last_chunk(srv, c):
    envelope(c)
    assert bdat(c, b"", last=True) == ACCEPTED
    [message] = messages_of(srv, c)
    assert message["headers"] == [] and message["body"] == b""


def message_hooks(srv, c) -> list[tuple]:
    """The hooks of the session's message: (hook, args, chunkmode), consecutive BODYs merged."""
    out: list[tuple] = []
    inside = False
    for r in records_of(srv, c):
        if r["hook"] == "DATA":
            inside = True
        if not inside:
            continue
        if r["hook"] == "BODY" and out and out[-1][0] == "BODY":
            out[-1] = ("BODY", out[-1][1] + r["bytes"], r["chunkmode"])
        else:
            out.append((r["hook"], r.get("bytes", r["args"]), r["chunkmode"]))
        if r["hook"] == "EOM":
            break
    return out


def test_handler_sees_the_same_hooks_as_with_data(srv):
    """The same message sent with DATA and with BDAT: identical HEADER/EOH/BODY/EOM."""
    seen = []
    for way in ("DATA", "BDAT"):
        c = Client(srv.connect())
        try:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO client.example")[0] == 250
            envelope(c)
            if way == "DATA":
                stuffed = MESSAGE.replace(b"\r\n.", b"\r\n..")
                assert c.cmd("DATA")[0] == 354
                assert c.cmd(stuffed + b".") == ACCEPTED
            else:
                assert bdat(c, MESSAGE[:50]) == chunk_ok(50)
                assert bdat(c, MESSAGE[50:], last=True) == ACCEPTED
            seen.append(message_hooks(srv, c))
        finally:
            c.close()
    via_data, via_bdat = seen
    assert [h[0] for h in via_data][:2] == ["DATA", "HEADER"] and via_data[-1][0] == "EOM"
    assert via_bdat == via_data


def test_bdat_refused_before_tls_is_read_and_dropped_not_run_as_commands(tmp_path, client_for):
    """With --require-tls a pipelined BDAT gets 530, and its chunk must not be taken as commands."""
    srv = launch(tmp_path / "srv", "--require-tls", "--error-sleep", "0")
    try:
        c = client_for(srv)
        chunk = b"STARTTLS\r\nQUIT\r\n"  # third-party content that looks like commands
        c.send(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
               + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
        codes = [code for code, _ in c.replies(5)]
        assert codes == [250, 530, 530, 530, 250]
    finally:
        srv.stop()
