"""SMTP smuggling: only <CRLF>.<CRLF> ends a message.

Every bare-LF / bare-CR look-alike of the end-of-data line is sent inside a
message, followed by a whole second transaction.  The server must take exactly
one message whose body holds the smuggled commands verbatim (dot-unstuffed by
the RFC 5321 rule, with CRLF as the only line end), and the command after the
real end of data must be answered as the next reply.  With ``--bare-newline
reject`` such a message gets a 5xx after its end of data and EOM is never
called; with ``keep`` the bytes reach the handler as they came.
"""

from __future__ import annotations

import socket

import pytest

from protocol_support import module_server, nothing_arrives, session_hooks, session_messages, unstuff

HEAD = b"Subject: smuggle\r\n\r\n"
SMUGGLED = (b"MAIL FROM:<evil@attacker.example>\r\n"
            b"RCPT TO:<victim@example.net>\r\n"
            b"DATA\r\n"
            b"Subject: smuggled\r\n"
            b"\r\n"
            b"smuggled body\r\n")

# Fake end-of-data lines: what comes between "before" and the smuggled commands.
VARIANTS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CR.LF": b"\r.\n",
    "CRLF.CR": b"\r\n.\r",
    "LF.CR": b"\n.\r",
    "CR.CR": b"\r.\r",
    "LFCR.CRLF": b"\n\r.\r\n",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
    "CRLFLF.CRLF": b"\r\n\n.\r\n",
    "CRLF.LFCRLF": b"\r\n.\n\r\n",
    "CRLF.NULCRLF": b"\r\n.\x00\r\n",
    "CRLF SP.CRLF": b"\r\n .\r\n",
}


keep = module_server("smuggle-keep")


reject = module_server("smuggle-reject", "--bare-newline", "reject")


def open_data(client_for, srv):
    c = client_for(srv)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    return c


def send(c, data: bytes, bytewise: bool) -> None:
    if not bytewise:
        c.send(data)
        return
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(data)):
        c.send(data[i:i + 1])


def assert_one_message_with_smuggled_text(srv, c, data: bytes) -> None:
    """The reply after end of data is 250, the next is the NOOP's; one message, body verbatim."""
    assert c.reply() == (250, ["2.0.0 Message accepted for delivery"])
    assert c.reply() == (250, ["2.0.0 OK"]), "the smuggled MAIL FROM was run as a command"
    messages = session_messages(srv, c)
    assert len(messages) == 1
    (message,) = messages
    assert (message["sender"], message["recipients"]) == ("alice@example.org", ["bob@example.net"])
    assert message["headers"] == [("Subject", "smuggle")]
    assert SMUGGLED in message["body"]
    assert message["body"] == unstuff(data)[len(HEAD):]
    hooks = session_hooks(srv, c)
    assert hooks.count("MAIL") == 1 and hooks.count("DATA") == 1 and hooks.count("EOM") == 1


@pytest.mark.parametrize("bytewise", [False, True], ids=["one-send", "byte-at-a-time"])
@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_fake_end_of_data_does_not_end_the_message(keep, client_for, variant, bytewise):
    c = open_data(client_for, keep)
    data = HEAD + b"before" + variant + SMUGGLED
    send(c, data + b".\r\nNOOP\r\n", bytewise)
    assert_one_message_with_smuggled_text(keep, c, data)


@pytest.mark.parametrize("start", [b".\n", b".\r", b".\r\r\n", b"\n.\n", b"\r.\r\n"],
                         ids=["dot-LF", "dot-CR", "dot-CRCRLF", "LF-dot-LF", "CR-dot-CRLF"])
def test_fake_end_of_data_at_start_of_body(keep, client_for, start):
    """Right after the header section, a line start: '.\\n' and the like still do not end it."""
    c = open_data(client_for, keep)
    data = HEAD + start + SMUGGLED
    c.send(data + b".\r\nNOOP\r\n")
    assert_one_message_with_smuggled_text(keep, c, data)


@pytest.mark.parametrize("start", [b".\n", b".\r", b"\n.\r\n"], ids=["dot-LF", "dot-CR", "LF-dot-CRLF"])
def test_fake_end_of_data_as_first_bytes_of_data(keep, client_for, start):
    """The first bytes after the DATA command line are at a line start too."""
    c = open_data(client_for, keep)
    data = start + SMUGGLED
    c.send(data + b".\r\nNOOP\r\n")
    assert c.reply() == (250, ["2.0.0 Message accepted for delivery"])
    assert c.reply() == (250, ["2.0.0 OK"])
    (message,) = session_messages(keep, c)
    # the first line is not a header: no headers, EOH, and the whole data is the message
    # (a leading bare LF is the empty line that ends an empty header section: bare
    # LFs end header lines under "keep")
    assert message["headers"] == [] and message["eoh"]
    assert message["section"] + message["body"] == unstuff(data)
    assert message["section"] in (b"", b"\n")
    assert SMUGGLED in message["body"]
    assert session_hooks(keep, c).count("MAIL") == 1


def test_real_end_of_data_after_a_bare_lf_line_still_works(keep, client_for):
    c = open_data(client_for, keep)
    data = HEAD + b"text\n.\n\r\n"
    c.send(data + b".\r\nNOOP\r\n")
    assert c.reply()[0] == 250
    assert c.reply() == (250, ["2.0.0 OK"])
    (message,) = session_messages(keep, c)
    assert message["body"] == b"text\n.\n\r\n"


def test_keep_mode_keeps_bare_newlines_as_they_came(keep, client_for):
    c = open_data(client_for, keep)
    body = b"a\nb\rc\r\nd\n\re\r\n\n\r\r\nf\r\r\n"
    c.send(b"Subject: bare\r\n\r\n" + body + b".\r\n")
    assert c.reply() == (250, ["2.0.0 Message accepted for delivery"])
    (message,) = session_messages(keep, c)
    assert message["body"] == body


# --- --bare-newline reject -------------------------------------------------------------


@pytest.mark.parametrize("variant", [v for v in VARIANTS.values() if b"\n" in v.replace(b"\r\n", b"")
                                     or b"\r" in v.replace(b"\r\n", b"")],
                         ids=[k for k, v in VARIANTS.items() if b"\n" in v.replace(b"\r\n", b"")
                              or b"\r" in v.replace(b"\r\n", b"")])
def test_reject_mode_refuses_smuggling_attempts_after_end_of_data(reject, client_for, variant):
    c = open_data(client_for, reject)
    c.send(HEAD + b"before" + variant + SMUGGLED)
    assert nothing_arrives(c, 0.2), "the refusal must come after the end of data"
    c.send(b".\r\nNOOP\r\n")
    code, lines = c.reply()
    assert code // 100 == 5 and lines[0].startswith("5."), (code, lines)
    assert c.reply() == (250, ["2.0.0 OK"])
    hooks = session_hooks(reject, c)
    assert "EOM" not in hooks
    assert hooks.count("MAIL") == 1
    assert session_messages(reject, c) == []


@pytest.mark.parametrize("body", [b"bare\nLF\r\n", b"bare\rCR\r\n", b"ends with CR\r\r\n",
                                  b"ends with LF\n\r\n", b"\n", b"x\r"],
                         ids=["LF", "CR", "CR-before-CRLF", "LF-before-CRLF", "lone-LF", "trailing-CR"])
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-send", "byte-at-a-time"])
def test_reject_mode_refuses_bare_lf_and_bare_cr(reject, client_for, body, bytewise):
    c = open_data(client_for, reject)
    data = b"Subject: bare\r\n\r\n" + body
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    send(c, data + b".\r\nNOOP\r\n", bytewise)
    code, lines = c.reply()
    assert code // 100 == 5 and lines[0].startswith("5."), (code, lines)
    assert c.reply() == (250, ["2.0.0 OK"])
    assert "EOM" not in session_hooks(reject, c)


def test_reject_mode_refuses_bare_lf_in_headers(reject, client_for):
    c = open_data(client_for, reject)
    c.send(b"Subject: one\nX-Two: two\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] // 100 == 5
    assert "EOM" not in session_hooks(reject, c)


def test_reject_mode_accepts_clean_messages_and_session_goes_on(reject, client_for):
    c = open_data(client_for, reject)
    c.send(b"Subject: bad\r\n\r\nbare\nLF\r\n.\r\n")
    assert c.reply()[0] // 100 == 5
    assert c.cmd("MAIL FROM:<carol@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<dave@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: clean\r\n\r\nclean\r\n..dotted\r\n.\r\n")
    assert c.reply() == (250, ["2.0.0 Message accepted for delivery"])
    (message,) = session_messages(reject, c)
    assert (message["sender"], message["body"]) == ("carol@example.org", b"clean\r\n.dotted\r\n")
