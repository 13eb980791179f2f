"""What the handler sees, proved by the recording handler (tests/recorder.py):
hook order, unfolded headers, EOH placement, the unstuffed body, chunk and
line mode, failing and malformed hooks, ``disconnect``, multi-line replies,
clients that vanish, and which recipients reach EOM.
"""

from __future__ import annotations

import random
import smtplib
import socket
import struct

import pytest

from conftest import wait_for
from protocol_support import (module_server, local_port, nothing_arrives, raw_reply, session_hooks,
                              session_messages, session_records, stuff)

CHUNKSIZE = 100


srv = module_server("hooks")


small_chunks = module_server("hooks-chunks", env={"PREFORK_TEST_CHUNKSIZE": str(CHUNKSIZE)})


def ehlo(client_for, server):
    c = client_for(server)
    local_port(c)
    assert c.cmd("EHLO client.example")[0] == 250
    return c


def open_data(c, sender="alice@example.org", recipients=("bob@example.net",)):
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    for r in recipients:
        assert c.cmd(f"RCPT TO:<{r}>")[0] == 250
    assert c.cmd("DATA")[0] == 354


def send_message(c, data: bytes, **kw) -> tuple[int, list[str]]:
    open_data(c, **kw)
    c.send(data + b".\r\n")
    return c.reply()


def log_since(srv, mark: int) -> str:
    return srv.log()[mark:]


def wait_for_log(srv, mark: int, *texts: str) -> str:
    return wait_for(lambda: all(t in log_since(srv, mark) for t in texts) and log_since(srv, mark),
                    5, message=f"log lines {texts}")


# --- order ---------------------------------------------------------------------------


def test_hook_order_for_a_full_session(srv, client_for):
    c = client_for(srv)
    local_port(c)
    c.send(b"EHLO client.example\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert [c.cmd(f"RCPT TO:<{r}>")[0] for r in ("bob@example.net", "reject@example.net",
                                                 "carol@example.net")] == [250, 550, 250]
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: order\r\nFrom: alice@example.org\r\n\r\nbody line\r\n.\r\n")
    assert c.reply()[0] == 250
    for line in ("NOOP", "VRFY bob", "EXPN list", "HELP", "RSET", "FOO"):
        c.cmd(line)
    assert c.cmd("QUIT")[0] == 221
    assert c.closed()
    c.close()
    wait_for(lambda: "DISCONNECT" in session_hooks(srv, c), 5, message="DISCONNECT")
    records = session_records(srv, c)
    assert [r["hook"] for r in records] == [
        "CONNECT", "EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "HEADER", "HEADER", "EOH", "BODY",
        "EOM", "NOOP", "VRFY", "EXPN", "HELP", "RSET", "UNKNOWN", "QUIT", "DISCONNECT"]
    connect = records[0]
    assert connect["args"][0] == ["127.0.0.1", local_port(c)]
    assert connect["args"][1][0] == "127.0.0.1" and connect["args"][1][1] == srv.port
    assert [r["args"] for r in records if r["hook"] == "HEADER"] == [["Subject", "order"],
                                                                     ["From", "alice@example.org"]]


def test_hook_order_with_smtplib(srv):
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.ehlo("smtplib.example")
        smtp.sendmail("alice@example.org", ["bob@example.net", "carol@example.net"],
                      b"Subject: via smtplib\r\n\r\nHello\r\n")
    wait_for(lambda: srv.hooks()[-1:] == ["DISCONNECT"], 5, message="DISCONNECT")
    by_sid = srv.sessions()
    (records,) = [rs for rs in by_sid.values()
                  if any(r["hook"] == "EHLO" and r["args"] == ["smtplib.example"] for r in rs)]
    assert [r["hook"] for r in records] == [
        "CONNECT", "EHLO", "MAIL", "RCPT", "RCPT", "DATA", "HEADER", "EOH", "BODY", "EOM", "QUIT",
        "DISCONNECT"]


# --- headers and EOH --------------------------------------------------------------------


def test_headers_are_unfolded_keeping_the_whitespace(srv, client_for):
    c = ehlo(client_for, srv)
    data = (b"Subject: a folded\r\n subject\r\n\tline\r\n"
            b"To: bob@example.net,\r\n    carol@example.net\r\n"
            b"X-Empty:\r\n"
            b"X-Spaces:    value  \r\n"
            b"\r\nbody\r\n")
    assert send_message(c, data)[0] == 250
    (message,) = session_messages(srv, c)
    assert message["headers"] == [
        ("Subject", "a folded subject\tline"),
        ("To", "bob@example.net,    carol@example.net"),
        ("X-Empty", ""),
        ("X-Spaces", "value  "),
    ]
    assert message["body"] == b"body\r\n"


def test_non_ascii_and_invalid_utf8_headers_round_trip(srv, client_for):
    c = ehlo(client_for, srv)
    raw = [
        (b"Subject", "caf\u00e9 \u2603 \U0001f600".encode()),
        (b"X-Latin1", b"na\xefve \xe9t\xe9"),  # not UTF-8
        (b"X-Junk", b"\xff\xfe\x80 end"),
    ]
    data = b"".join(name + b": " + value + b"\r\n" for name, value in raw) + b"\r\nbody\r\n"
    assert send_message(c, data)[0] == 250
    (message,) = session_messages(srv, c)
    assert message["headers"][0] == ("Subject", "caf\u00e9 \u2603 \U0001f600")
    got = [(name.encode("ascii"), value.encode("utf-8", "surrogateescape"))
           for name, value in message["headers"]]
    assert got == raw


def test_eoh_at_the_blank_line_which_is_not_body(srv, client_for):
    c = ehlo(client_for, srv)
    assert send_message(c, b"Subject: x\r\n\r\n\r\nsecond blank line is body\r\n")[0] == 250
    records = session_records(srv, c)
    hooks = [r["hook"] for r in records]
    assert hooks[hooks.index("DATA"):hooks.index("EOM")] == ["DATA", "HEADER", "EOH", "BODY"]
    (message,) = session_messages(srv, c)
    assert message["body"] == b"\r\nsecond blank line is body\r\n"


def test_eoh_at_the_first_line_that_is_not_a_header(srv, client_for):
    c = ehlo(client_for, srv)
    data = (b"Subject: no blank line\r\nX-A: 1\r\nThis line is no header\r\n"
            b"X-B: looks like a header but is body\r\n")
    assert send_message(c, data)[0] == 250
    hooks = session_hooks(srv, c)
    assert hooks[hooks.index("DATA"):] == ["DATA", "HEADER", "HEADER", "EOH", "BODY", "EOM"]
    (message,) = session_messages(srv, c)
    assert message["headers"] == [("Subject", "no blank line"), ("X-A", "1")]
    assert message["body"] == b"This line is no header\r\nX-B: looks like a header but is body\r\n"


def test_message_without_headers(srv, client_for):
    c = ehlo(client_for, srv)
    assert send_message(c, b"just a body line\r\n")[0] == 250
    (message,) = session_messages(srv, c)
    assert message["headers"] == [] and message["eoh"]
    assert message["body"] == b"just a body line\r\n"


def test_empty_message_still_gets_eoh_then_eom(srv, client_for):
    c = ehlo(client_for, srv)
    assert send_message(c, b"")[0] == 250
    hooks = session_hooks(srv, c)
    assert hooks[hooks.index("DATA"):] == ["DATA", "EOH", "EOM"]


# --- body ---------------------------------------------------------------------------------


def test_body_is_byte_identical_after_dot_unstuffing(srv, client_for):
    c = ehlo(client_for, srv)
    body = (b".leading dot\r\n..two dots\r\n...\r\n.\r\n..\r\n"
            b" . not at start\r\nmiddle.\r\n.\r\n\r\n"
            b"8bit \xc3\xa9 \xff\r\nend\r\n")
    data = b"Subject: dots\r\n\r\n" + body
    assert send_message(c, stuff(data))[0] == 250
    (message,) = session_messages(srv, c)
    assert message["body"] == body


def test_dotted_header_line_is_unstuffed_too(srv, client_for):
    c = ehlo(client_for, srv)
    assert send_message(c, stuff(b"Subject: x\r\n.starts the body\r\n"))[0] == 250
    (message,) = session_messages(srv, c)
    assert message["body"] == b".starts the body\r\n"


def ten_kib_body(seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    while sum(map(len, lines)) < 10 * 1024:
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(b"." * rng.randrange(1, 4) + b"dotted\r\n")
        elif kind == 1:
            lines.append(b"\r\n")
        else:
            lines.append(bytes(rng.randrange(33, 127) for _ in range(rng.randrange(0, 250))) + b"\r\n")
    return b"".join(lines)


def test_chunks_are_at_most_chunksize(small_chunks, client_for):
    c = ehlo(client_for, small_chunks)
    body = ten_kib_body(1)
    assert send_message(c, stuff(b"Subject: chunks\r\n\r\n" + body))[0] == 250
    (message,) = session_messages(small_chunks, c)
    assert message["body"] == body
    sizes = [len(chunk) for chunk, _ in message["chunks"]]
    assert max(sizes) <= CHUNKSIZE
    assert min(sizes) > 0
    assert all(mode for _, mode in message["chunks"]), "chunk mode is on after EOH"
    assert len(sizes) >= len(body) // CHUNKSIZE


def test_default_chunks_are_not_cut_per_line(srv, client_for):
    """With the default chunksize (64 KiB) a 10 KiB body sent at once is not handed over per line."""
    c = ehlo(client_for, srv)
    body = ten_kib_body(2).replace(b"\r\n.", b"\r\nx")
    body = b"x" + body[1:] if body.startswith(b".") else body
    assert send_message(c, b"Subject: chunks\r\n\r\n" + body)[0] == 250
    (message,) = session_messages(srv, c)
    assert message["body"] == body
    assert body.count(b"\r\n") > 100
    assert len(message["chunks"]) < 10


def test_line_mode_when_eoh_turns_chunkmode_off(srv, client_for):
    c = ehlo(client_for, srv)
    body = b"first line\r\n\r\n.dotted\r\nwith bare\nlf inside\r\nlast\r\n"
    assert send_message(c, stuff(b"Subject: lines\r\n\r\n" + body), sender="linemode@example.org")[0] == 250
    (message,) = session_messages(srv, c)
    assert message["body"] == body
    assert [chunk for chunk, _ in message["chunks"]] == [
        b"first line\r\n", b"\r\n", b".dotted\r\n", b"with bare\nlf inside\r\n", b"last\r\n"]
    assert not any(mode for _, mode in message["chunks"])


def test_line_mode_line_longer_than_chunksize_comes_in_pieces(small_chunks, client_for):
    c = ehlo(client_for, small_chunks)
    long_line = bytes(range(33, 127)) * 3 + b"\r\n"  # 284 octets
    body = b"short\r\n" + long_line + b"after\r\n"
    assert send_message(c, b"Subject: long\r\n\r\n" + body, sender="linemode@example.org")[0] == 250
    (message,) = session_messages(small_chunks, c)
    chunks = [chunk for chunk, _ in message["chunks"]]
    assert message["body"] == body
    assert chunks[0] == b"short\r\n" and chunks[-1] == b"after\r\n"
    assert all(len(chunk) <= CHUNKSIZE for chunk in chunks)
    assert b"".join(chunks[1:-1]) == long_line


def test_line_mode_with_small_chunks_and_a_large_body(small_chunks, client_for):
    c = ehlo(client_for, small_chunks)
    body = b"".join(b"line %04d %s\r\n" % (i, b"z" * (i % 80)) for i in range(300))
    assert send_message(c, b"Subject: lines\r\n\r\n" + body, sender="linemode@example.org")[0] == 250
    (message,) = session_messages(small_chunks, c)
    chunks = [chunk for chunk, _ in message["chunks"]]
    assert chunks == body.splitlines(keepends=True)


def test_chunkmode_is_off_again_after_eom(srv, client_for):
    c = ehlo(client_for, srv)
    assert send_message(c, b"Subject: one\r\n\r\nfirst\r\n")[0] == 250
    assert send_message(c, b"Subject: two\r\n\r\nsecond\r\n", sender="carol@example.org")[0] == 250
    records = session_records(srv, c)
    mails = [i for i, r in enumerate(records) if r["hook"] == "MAIL"]
    second = records[mails[1]:]
    assert records[mails[1]]["chunkmode"] is False
    assert [(r["hook"], r["chunkmode"]) for r in second] == [
        ("MAIL", False), ("RCPT", False), ("DATA", False), ("HEADER", False), ("EOH", True),
        ("BODY", True), ("EOM", False)]
    first_body = [r for r in records[:mails[1]] if r["hook"] == "BODY"]
    assert first_body and all(r["chunkmode"] for r in first_body)


def test_chunk_mode_again_for_the_message_after_a_line_mode_one(srv, client_for):
    c = ehlo(client_for, srv)
    assert send_message(c, b"Subject: one\r\n\r\na\r\nb\r\n", sender="linemode@example.org")[0] == 250
    assert send_message(c, b"Subject: two\r\n\r\nc\r\nd\r\n")[0] == 250
    first, second = session_messages(srv, c)
    assert [mode for _, mode in first["chunks"]] == [False, False]
    assert [chunk for chunk, _ in second["chunks"]] == [b"c\r\nd\r\n"]
    assert [mode for _, mode in second["chunks"]] == [True]


# --- hooks that raise ----------------------------------------------------------------------


HOOK_FAILED = (451, ["4.3.0 Error: local error in processing; try again later"])


def test_mail_hook_that_raises_gives_451_and_session_goes_on(srv, client_for):
    mark = len(srv.log())
    c = ehlo(client_for, srv)
    assert c.cmd("MAIL FROM:<raise@example.org>") == HOOK_FAILED
    text = wait_for_log(srv, mark, "Traceback (most recent call last)", "RuntimeError: handler raised on purpose")
    assert "MAIL" in text
    # no transaction was started; the next MAIL works
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 503
    assert send_message(c, b"Subject: after\r\n\r\nok\r\n")[0] == 250
    assert srv.proc.poll() is None


def test_rcpt_and_vrfy_hooks_that_raise_give_451(srv, client_for):
    mark = len(srv.log())
    c = ehlo(client_for, srv)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<raise@example.net>") == HOOK_FAILED
    assert c.cmd("DATA")[0] in (503, 554)  # that recipient did not count
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("VRFY raise@example.net") == HOOK_FAILED
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    text = wait_for_log(srv, mark, "Traceback")
    assert text.count("RuntimeError: handler raised on purpose") == 2
    (message,) = session_messages(srv, c)
    assert message["recipients"] == ["bob@example.net"]


@pytest.mark.parametrize("sender, error", [
    ("headerraise@example.org", "RuntimeError: HEADER raised on purpose"),
    ("bodyraise@example.org", "RuntimeError: BODY raised on purpose"),
    ("eomraise@example.org", "RuntimeError: EOM raised on purpose"),
])
def test_message_hook_that_raises_gives_451_after_end_of_data(srv, client_for, sender, error):
    mark = len(srv.log())
    c = ehlo(client_for, srv)
    open_data(c, sender=sender)
    c.send(b"Subject: one\r\nX-Second: two\r\nX-Third: three\r\n\r\nbody\r\nmore body\r\n")
    assert nothing_arrives(c, 0.2), "no reply before the end of data"
    c.send(b".\r\nNOOP\r\n")
    assert c.reply() == HOOK_FAILED
    assert c.reply() == (250, ["2.0.0 OK"])  # the session goes on, in sync
    wait_for_log(srv, mark, "Traceback (most recent call last)", error)
    hooks = session_hooks(srv, c)
    if sender.startswith("eom"):
        assert hooks.count("EOM") == 1
    else:
        assert "EOM" not in hooks
    if sender.startswith("header"):
        assert hooks.count("HEADER") == 2 and "BODY" not in hooks
    if sender.startswith("body"):
        assert hooks.count("BODY") == 1
    # the transaction is over; a new one works on the same connection
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 503
    assert send_message(c, b"Subject: again\r\n\r\nfine\r\n")[0] == 250
    assert srv.proc.poll() is None


def test_eom_refusal_passes_through(srv, client_for):
    c = ehlo(client_for, srv)
    assert send_message(c, b"Subject: x\r\n\r\nx\r\n", sender="eomreject@example.org") == (
        554, ["5.7.1 Message refused by the test handler"])
    assert c.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("command", ["MAIL FROM:<bad@example.org>", "RCPT TO:<bad@example.net>", "VRFY bad"])
def test_malformed_hook_return_gives_451(srv, client_for, command):
    mark = len(srv.log())
    c = ehlo(client_for, srv)
    if command.startswith("RCPT"):
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd(command) == HOOK_FAILED
    wait_for_log(srv, mark, "bad reply", "not a reply")
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])
    if command.startswith("RCPT"):
        assert c.cmd("DATA")[0] in (503, 554)


# --- disconnect ----------------------------------------------------------------------------


def test_disconnect_in_mail_closes_right_after_the_reply(srv, client_for):
    c = ehlo(client_for, srv)
    c.send(b"MAIL FROM:<disconnect@example.org>\r\nRCPT TO:<bob@example.net>\r\nNOOP\r\n")
    assert c.reply() == (250, ["2.1.0 <disconnect@example.org>, sender ok"])
    assert c.closed(5)
    assert c.buf == b"", "no reply after the one that set disconnect"
    c.close()
    wait_for(lambda: "DISCONNECT" in session_hooks(srv, c), 5, message="DISCONNECT")
    assert session_hooks(srv, c)[-2:] == ["MAIL", "DISCONNECT"]


def test_disconnect_in_rcpt_closes_right_after_the_reply(srv, client_for):
    c = ehlo(client_for, srv)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    c.send(b"RCPT TO:<disconnect@example.net>\r\nDATA\r\n")
    assert c.reply() == (250, ["2.1.5 <disconnect@example.net>, recipient ok"])
    assert c.closed(5)
    assert c.buf == b""
    c.close()
    wait_for(lambda: "DISCONNECT" in session_hooks(srv, c), 5, message="DISCONNECT")
    assert "DATA" not in session_hooks(srv, c)


def test_disconnect_in_body_closes_after_the_end_of_data_reply(srv, client_for):
    c = ehlo(client_for, srv)
    open_data(c, sender="bodydisconnect@example.org")
    c.send(b"Subject: bye\r\n\r\nbody\r\n")
    assert nothing_arrives(c, 0.2), "disconnect in BODY waits for the end of data"
    c.send(b".\r\nNOOP\r\n")
    code, lines = c.reply()
    assert code == 250, lines
    assert c.closed(5)
    assert c.buf == b""
    c.close()
    wait_for(lambda: "DISCONNECT" in session_hooks(srv, c), 5, message="DISCONNECT")
    assert "NOOP" not in session_hooks(srv, c)


def test_disconnect_in_vrfy_closes_right_after_the_reply(srv, client_for):
    c = ehlo(client_for, srv)
    c.send(b"VRFY disconnect@example.net\r\nNOOP\r\n")
    assert c.reply()[0] == 252
    assert c.closed(5)
    assert c.buf == b""


def test_server_serves_the_next_client_after_a_disconnect(srv, client_for):
    c = ehlo(client_for, srv)
    assert c.cmd("MAIL FROM:<disconnect@example.org>")[0] == 250
    assert c.closed(5)
    c.close()
    other = ehlo(client_for, srv)
    assert other.cmd("NOOP") == (250, ["2.0.0 OK"])


# --- multi-line replies ---------------------------------------------------------------------


@pytest.mark.parametrize("command, enhanced", [("MAIL FROM:<multi@example.org>", "2.1.0"),
                                               ("RCPT TO:<multi@example.net>", "2.1.5"),
                                               ("VRFY multi", "2.0.0")])
def test_multi_message_return_gives_multi_line_reply(srv, client_for, command, enhanced):
    c = ehlo(client_for, srv)
    if command.startswith("RCPT"):
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    c.send(command.encode() + b"\r\nNOOP\r\n")
    assert raw_reply(c) == (f"250-{enhanced} first line\r\n"
                            f"250-{enhanced} second line\r\n"
                            f"250 {enhanced} third line\r\n").encode()
    assert raw_reply(c) == b"250 2.0.0 OK\r\n"


def test_multi_line_mail_reply_starts_the_transaction(srv, client_for):
    c = ehlo(client_for, srv)
    code, lines = c.cmd("MAIL FROM:<multi@example.org>")
    assert (code, len(lines)) == (250, 3)
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["sender"] == "multi@example.org"


# --- a client that vanishes -----------------------------------------------------------------


@pytest.mark.parametrize("partial", [b"", b"Subject: half\r\n", b"Subject: half\r\n\r\nbody without end\r\n",
                                     b"Subject: x\r\n\r\nbody\r\n.", b"Subject: x\r\n\r\nbody\r\n.\r"])
def test_client_vanishing_mid_data_leaves_no_message(srv, client_for, partial):
    c = ehlo(client_for, srv)
    open_data(c)
    if partial:
        c.send(partial)
    c.close()
    wait_for(lambda: "DISCONNECT" in session_hooks(srv, c), 5, message="DISCONNECT")
    hooks = session_hooks(srv, c)
    assert "EOM" not in hooks
    assert hooks[-1] == "DISCONNECT"
    assert session_messages(srv, c) == []
    other = ehlo(client_for, srv)
    assert send_message(other, b"Subject: next\r\n\r\nnext\r\n")[0] == 250
    assert srv.proc.poll() is None


def test_client_resetting_mid_data_leaves_no_message(srv, client_for):
    c = ehlo(client_for, srv)
    open_data(c)
    c.send(b"Subject: reset\r\n\r\nbody\r\n")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST instead of FIN
    wait_for(lambda: "DISCONNECT" in session_hooks(srv, c), 5, message="DISCONNECT")
    assert "EOM" not in session_hooks(srv, c)
    other = ehlo(client_for, srv)
    assert other.cmd("NOOP")[0] == 250


# --- env_recipients ----------------------------------------------------------------------------


def test_env_recipients_holds_only_accepted_recipients(srv, client_for):
    c = ehlo(client_for, srv)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    replies = [c.cmd(f"RCPT TO:<{r}>")[0] for r in
               ("one@example.net", "reject@example.net", "raise@example.net", "bad@example.net",
                "two@example.net", "one@example.net")]
    assert replies == [250, 550, 451, 451, 250, 250]
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["recipients"] == ["one@example.net", "two@example.net", "one@example.net"]
    assert "reject@example.net" not in message["recipients"]
