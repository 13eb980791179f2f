"""PIPELINING (RFC 2920) over a real socket: replies strictly in order, written
together once the input runs dry, and nothing in the input buffer lost.
"""

from __future__ import annotations

import re
import socket

import pytest

from protocol_support import module_server, session_hooks, session_messages

REPLY_LINE = re.compile(rb"(\d{3})([ -])([^\r\n]*)\r\n")


# Batches of hundreds of NOOP/VRFY/HELP: lift the junk-command limit (tested in test_abuse).
srv = module_server("pipelining", "--max-junk-commands", "100000")


@pytest.fixture
def c(srv, client_for):
    client = client_for(srv)
    assert client.cmd("EHLO client.example")[0] == 250
    return client


def parse_replies(data: bytes) -> list[tuple[int, str]]:
    """Split a byte string into complete replies: (code, text of the last line)."""
    out = []
    pos = 0
    while pos < len(data):
        m = REPLY_LINE.match(data, pos)
        assert m, f"not a reply line at {pos}: {data[pos:pos + 80]!r}"
        pos = m.end()
        if m.group(2) == b" ":
            out.append((int(m.group(1)), m.group(3).decode()))
    return out


def one_recv(client, timeout: float = 10.0) -> bytes:
    """Exactly one recv(): what the server wrote in its (single) send."""
    assert client.buf == b""
    client.sock.settimeout(timeout)
    return client.sock.recv(1 << 20)


def transaction(sender: str, recipients: list[str], body: bytes) -> bytes:
    return (f"MAIL FROM:<{sender}>\r\n".encode()
            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients)
            + b"DATA\r\n" + body + b".\r\n")


def test_whole_transaction_in_one_send_gets_all_replies_in_one_recv(srv, c):
    c.send(transaction("alice@example.org", ["bob@example.net", "carol@example.net"],
                       b"Subject: pipelined\r\n\r\nHello.\r\n") + b"QUIT\r\n")
    data = one_recv(c)
    assert parse_replies(data) == [
        (250, "2.1.0 <alice@example.org>, sender ok"),
        (250, "2.1.5 <bob@example.net>, recipient ok"),
        (250, "2.1.5 <carol@example.net>, recipient ok"),
        (354, 'Enter mail, end with "." on a line by itself'),
        (250, "2.0.0 Message accepted for delivery"),
        (221, "2.0.0 Closing connection"),
    ]
    assert c.closed(5)
    (message,) = session_messages(srv, c)
    assert message["recipients"] == ["bob@example.net", "carol@example.net"]
    assert message["body"] == b"Hello.\r\n"


def test_envelope_batch_then_message_rfc2920_style(srv, c):
    """The usual client: MAIL, RCPTs and DATA in one send, the message after 354."""
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
           b"RCPT TO:<reject@example.net>\r\nRCPT TO:<dave@example.net>\r\nDATA\r\n")
    data = one_recv(c)
    assert [code for code, _ in parse_replies(data)] == [250, 250, 550, 250, 354]
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["recipients"] == ["bob@example.net", "dave@example.net"]


def test_errors_in_a_batch_keep_their_place(srv, c):
    c.send(b"MAIL FROM:<alice@example.org>\r\n"
           b"RCPT TO:<reject@example.net>\r\n"
           b"FOO\r\n"
           b"RCPT TO:<>\r\n"
           b"RCPT TO:<bob@example.net>\r\n"
           b"MAIL FROM:<carol@example.org>\r\n"
           b"VRFY bob\r\n"
           b"NOOP\r\n")
    data = one_recv(c)
    assert [code for code, _ in parse_replies(data)] == [250, 550, 500, 501, 250, 503, 252, 250]


def test_several_transactions_in_one_batch(srv, c):
    batch = (transaction("a1@example.org", ["b1@example.net"], b"Subject: one\r\n\r\nfirst\r\n")
             + b"RSET\r\n"
             + transaction("a2@example.org", ["b2@example.net", "b3@example.net"],
                           b"Subject: two\r\n\r\nsecond\r\n")
             + transaction("a3@example.org", ["b4@example.net"], b"Subject: three\r\n\r\nthird\r\n")
             + b"NOOP\r\n")
    c.send(batch)
    data = one_recv(c)
    assert [code for code, _ in parse_replies(data)] == [
        250, 250, 354, 250,
        250,
        250, 250, 250, 354, 250,
        250, 250, 354, 250,
        250,
    ]
    messages = session_messages(srv, c)
    assert [(m["sender"], m["recipients"], m["body"]) for m in messages] == [
        ("a1@example.org", ["b1@example.net"], b"first\r\n"),
        ("a2@example.org", ["b2@example.net", "b3@example.net"], b"second\r\n"),
        ("a3@example.org", ["b4@example.net"], b"third\r\n"),
    ]


def test_commands_after_end_of_data_in_the_same_send_are_not_lost(srv, c):
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: first\r\n\r\nfirst body\r\n.\r\n"
           b"MAIL FROM:<carol@example.org>\r\nRCPT TO:<dave@example.net>\r\nDATA\r\n")
    data = one_recv(c)
    assert [code for code, _ in parse_replies(data)] == [250, 250, 250, 354]
    c.send(b"Subject: second\r\n\r\nsecond body\r\n.\r\nQUIT\r\n")
    data = one_recv(c)
    assert [code for code, _ in parse_replies(data)] == [250, 221]
    messages = session_messages(srv, c)
    assert [(m["sender"], m["body"]) for m in messages] == [
        ("alice@example.org", b"first body\r\n"), ("carol@example.org", b"second body\r\n")]


def test_many_commands_in_one_batch_in_order(srv, c):
    count = 300
    c.send(b"".join(b"VRFY user%d\r\nNOOP\r\n" % i for i in range(count)))
    replies = c.replies(2 * count)
    assert [code for code, _ in replies] == [252, 250] * count
    vrfys = [h for h in session_hooks(srv, c) if h == "VRFY"]
    assert len(vrfys) == count


def test_batch_larger_than_one_read_is_served_completely(srv, c):
    """A batch of ~200 KB crosses several server reads; every command is answered in order."""
    count = 2000
    c.send(b"".join(b"HELP topic-%05d-%s\r\n" % (i, b"p" * 70) for i in range(count)) + b"NOOP\r\n")
    replies = c.replies(count + 1)
    assert [code for code, _ in replies] == [214] * count + [250]


def test_byte_at_a_time_transaction(srv, c):
    """The same transaction trickled one byte per send gives the same replies."""
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = transaction("alice@example.org", ["bob@example.net"],
                       b"Subject: trickle\r\n\r\n.dot line\r\nlast\r\n") + b"NOOP\r\n"
    wire = data.replace(b"\r\n.dot", b"\r\n..dot")
    for i in range(len(wire)):
        c.send(wire[i:i + 1])
    assert [code for code, _ in c.replies(5)] == [250, 250, 354, 250, 250]
    (message,) = session_messages(srv, c)
    assert message["body"] == b".dot line\r\nlast\r\n"



def test_commands_before_a_half_close_are_all_answered(srv, c):
    """A client that sends its last commands and shuts down its side still gets every reply."""
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nNOOP\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    assert [code for code, _ in c.replies(3)] == [250, 250, 250]
    assert c.closed(5)
    assert c.buf == b""


def test_nothing_is_answered_after_quit(srv, c):
    c.send(b"NOOP\r\nQUIT\r\nNOOP\r\nMAIL FROM:<alice@example.org>\r\n")
    data = one_recv(c)
    assert c.closed(5)
    assert parse_replies(data + c.buf) == [
        (250, "2.0.0 OK"), (221, "2.0.0 Closing connection")]
    hooks = session_hooks(srv, c)
    assert hooks[hooks.index("QUIT") - 1:] in (["NOOP", "QUIT"], ["NOOP", "QUIT", "DISCONNECT"])
