"""LMTP server mode (--protocol lmtp, RFC 2033): LHLO, and one reply per recipient after the message."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import Client

PER_RECIPIENT = "lmtp_handlers:PerRecipient"


def lmtp_client(srv) -> Client:
    c = Client(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
    assert c.reply()[0] == 220
    return c


def envelope(c: Client, recipients: list[str]) -> None:
    code, lines = c.cmd("LHLO client.example")
    assert code == 250 and lines[0].startswith("mx.test.example"), lines
    assert "PIPELINING" in lines and "ENHANCEDSTATUSCODES" in lines
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    for r in recipients:
        c.cmd(f"RCPT TO:<{r}>")


def test_one_reply_per_accepted_recipient_in_order(start_server):
    srv = start_server("--protocol", "lmtp", handler=PER_RECIPIENT)
    c = lmtp_client(srv)
    envelope(c, ["bob@example.org", "nobody@example.org", "full@example.org", "gone@example.org"])
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    replies = c.replies(3)  # nobody@ was refused at RCPT: no reply for it
    assert replies == [(250, ["2.0.0 <bob@example.org> delivered"]),
                       (452, ["4.2.2 <full@example.org> mailbox full"]),
                       (550, ["5.2.1 <gone@example.org> mailbox disabled"])]
    assert c.cmd("QUIT")[0] == 221
    c.close()


def test_the_seeds_single_eom_reply_is_repeated_for_each_recipient(start_server):
    srv = start_server("--protocol", "lmtp")
    c = lmtp_client(srv)
    envelope(c, ["a@example.org", "b@example.org"])
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert c.replies(2) == [(250, ["2.0.0 Message accepted for delivery"])] * 2
    c.close()


def test_a_refused_message_is_refused_for_each_recipient(start_server):
    srv = start_server("--protocol", "lmtp", "--max-message-size", "1K")
    c = lmtp_client(srv)
    envelope(c, ["a@example.org", "b@example.org"])
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n.\r\n")
    replies = c.replies(2)
    assert [code for code, _ in replies] == [552, 552]
    assert c.cmd("NOOP")[0] == 250, "in sync after the per-recipient replies"
    c.close()


def test_bdat_last_gets_per_recipient_replies(start_server):
    srv = start_server("--protocol", "lmtp", handler=PER_RECIPIENT)
    c = lmtp_client(srv)
    envelope(c, ["bob@example.org", "gone@example.org"])
    body = b"Subject: chunked\r\n\r\nhello\r\n"
    c.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
    assert [code for code, _ in c.replies(2)] == [250, 550]
    c.close()


def test_a_failed_chunk_before_the_last_gets_one_reply(start_server):
    """Only the message's end (DATA's dot, BDAT LAST) gets one reply per recipient (RFC 2033 4.2);
    a BDAT chunk that is not the last gets one reply, also when it ends the transaction."""
    srv = start_server("--protocol", "lmtp", "--max-message-size", "1K")
    c = lmtp_client(srv)
    envelope(c, ["a@example.org", "b@example.org"])
    # pipelined: a chunk over the size limit, the last chunk, then NOOP
    c.send(b"BDAT 2000\r\n" + b"x" * 2000 + b"BDAT 3 LAST\r\nabc" + b"NOOP\r\n")
    chunk, last, noop = c.replies(3)
    assert chunk[0] == 552 and chunk[1][0].startswith("5.3.4 "), chunk
    assert last[0] == 503, last  # the transaction ended with the failed chunk
    assert noop == (250, ["2.0.0 OK"]), "one reply per command: in sync"
    assert c.cmd("QUIT")[0] == 221
    c.close()


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_helo_and_ehlo_are_refused_in_lmtp(start_server, verb):
    srv = start_server("--protocol", "lmtp")
    c = lmtp_client(srv)
    code, lines = c.cmd(f"{verb} client.example")
    assert code == 500 and lines[0].startswith("5.5.1 ") and "LHLO" in lines[0]
    c.close()


def test_lhlo_is_unknown_in_smtp(start_server):
    srv = start_server()
    c = lmtp_client(srv)
    assert c.cmd("LHLO client.example")[0] == 500
    c.close()


@pytest.mark.parametrize("recipients, expected", [
    (["bob@example.org", "carol@example.org"], 250),
    (["gone@example.org", "gone2@example.org"], 550),
    (["bob@example.org", "gone@example.org"], 451),  # mixed: the client retries, nobody loses it
])
def test_per_recipient_eom_in_smtp_gives_one_reply(start_server, recipients, expected):
    srv = start_server(handler=PER_RECIPIENT)
    c = lmtp_client(srv)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    for r in recipients:
        assert c.cmd(f"RCPT TO:<{r}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    code, lines = c.reply()
    assert code == expected, (code, lines)
    assert c.cmd("NOOP")[0] == 250
    c.close()


@pytest.mark.parametrize("listen", [["--listen", "127.0.0.1:25"], ["--listen", "127.0.0.1:2525", "--listen", "0.0.0.0:25"]])
def test_lmtp_on_port_25_is_refused_at_start(listen):
    result = subprocess.run([sys.executable, "-m", "prefork_esmtp", "configtest", "--protocol", "lmtp", *listen],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "port 25" in lines[0], lines


@pytest.mark.parametrize("protocol, recipients, replies", [
    ("lmtp", ["a@example.org", "drop1@example.org", "b@example.org"], 3),
    ("lmtp", ["drop1@example.org", "drop2@example.org"], 2),
    ("smtp", ["drop1@example.org", "drop2@example.org"], 1),
])
def test_replies_follow_the_accepted_rcpts_whatever_the_handler_does_to_its_list(
        start_server, protocol, recipients, replies):
    """One reply per RCPT the engine accepted (LMTP) or one in all (SMTP), in sync, even when a
    handler edits the list behind env_recipients (here emptied or shortened in DATA)."""
    srv = start_server("--protocol", protocol, handler="lmtp_handlers:DropsRecipients")
    c = lmtp_client(srv)
    assert c.cmd(f"{'LHLO' if protocol == 'lmtp' else 'EHLO'} client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    for r in recipients:
        assert c.cmd(f"RCPT TO:<{r}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\nNOOP\r\n")
    got = c.replies(replies + 1)
    assert [code for code, _ in got] == [250] * replies + [250], got
    assert got[-1] == (250, ["2.0.0 OK"]), "the NOOP's reply comes last: in sync"
    assert "Traceback" not in srv.log(), srv.log()
    assert c.cmd("QUIT")[0] == 221


def test_lmtp_mode_answers_a_refused_chunk_once(start_server):
    """In LMTP only the message's end gets one reply per recipient; a BDAT chunk refused midway gets one."""
    srv = start_server("--protocol", "lmtp", "--max-message-size", "1K")
    c = lmtp_client(srv)
    assert c.cmd("LHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
    c.send(b"BDAT 2000\r\n" + b"x" * 2000)
    assert c.reply()[0] == 552
    assert c.cmd("NOOP")[0] == 250
    c.close()


@pytest.mark.parametrize("handler", ["lmtp_handlers:WrongCount", "lmtp_handlers:Raising"])
def test_a_broken_eom_gives_each_recipient_a_transient_refusal_in_step(start_server, handler):
    """EOM with a reply too many, or raising: one 451 per recipient, and a pipelined NOOP's own reply after."""
    srv = start_server("--protocol", "lmtp", handler=handler)
    c = lmtp_client(srv)
    envelope(c, ["a@example.org", "b@example.org"])
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\nNOOP\r\n")
    replies = c.replies(3)
    assert [code for code, _ in replies] == [451, 451, 250], replies
    assert replies[0][1][0].startswith("4.3.0 ")
    c.close()
