"""The real mail servers the relay and LMTP tests depend on, proved with smtplib and raw sockets only.

Each fixture of tests/mailservers.py is checked here against the software
itself, so that a later failure in a relay test points at our code, not at
the test instance: Postfix stores exactly what it was sent, logs XFORWARD,
refuses unknown users at RCPT, stops completely; Dovecot delivers per
recipient and refuses unknown users; smtp-sink dumps what it received.
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest

import mailservers
from conftest import Client
from mailservers import (DOVECOT_UNKNOWN_USER, POSTFIX_UNKNOWN_USER, MailServerError, alive,  # noqa: F401
                         crlf_to_lf, dovecot_lmtp, postfix_instance, running_smtp_sink, smtp_sink, split_trace)

MESSAGE = (b"From: Sender <sender@example.org>\r\n"
           b"To: alice@mail.test.example\r\n"
           b"Subject: exact bytes\r\n"
           b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
           b"Message-ID: <exact@example.org>\r\n"
           b"X-Folded: first\r\n\tsecond\r\n"
           b"\r\n"
           b"line one\r\n"
           b".a line that starts with a dot\r\n"
           b"\r\n"
           b"  indented, trailing space \r\n"
           b"last line\r\n")


def names(fields: list[bytes]) -> list[str]:
    return [f.split(b":", 1)[0].decode() for f in fields]


def lmtp_session(sock: socket.socket, sender: str, recipients: list[str], message: bytes
                 ) -> tuple[list[tuple[int, list[str]]], list[tuple[int, list[str]]]]:
    """A raw LMTP transaction: (RCPT replies, one end-of-data reply per accepted recipient)."""
    c = Client(sock)
    assert c.reply()[0] == 220
    assert c.cmd("LHLO client.test.example")[0] == 250
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    rcpt = [c.cmd(f"RCPT TO:<{r}>") for r in recipients]
    accepted = sum(1 for code, _ in rcpt if code == 250)
    assert c.cmd("DATA")[0] == 354
    c.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    final = c.replies(accepted)
    assert c.cmd("QUIT")[0] == 221
    return rcpt, final


# ---------------------------------------------------------------- Postfix


def test_postfix_stores_the_message_byte_identical_after_its_own_headers(postfix_instance):
    pf = postfix_instance()
    with smtplib.SMTP(*pf.address, timeout=10) as s:
        assert s.ehlo()[0] == 250
        assert s.mail("sender@example.org")[0] == 250
        assert s.rcpt("alice@mail.test.example")[0] == 250
        code, text = s.rcpt("nobody@mail.test.example")
        assert (code, text.split()[0]) == (550, b"5.1.1"), text
        assert POSTFIX_UNKNOWN_USER.encode() in text
        code, text = s.rcpt("someone@example.net")
        assert (code, text.split()[0]) == (554, b"5.7.1") and b"Relay access denied" in text, text
        code, text = s.data(MESSAGE)
        assert code == 250, text

    [stored] = pf.wait_messages("alice")
    added, rest = split_trace(stored)
    assert names(added) == ["Return-Path", "X-Original-To", "Delivered-To", "Received"]
    assert added[0] == b"Return-Path: <sender@example.org>\n"
    assert b"by postfix.test.example (Postfix) with ESMTP" in added[3]
    assert rest == crlf_to_lf(MESSAGE)
    assert pf.messages("bob") == []
    assert not pf.maildir("nobody").exists()
    pf.wait_log(r"\w+: reject: RCPT from \S+: 550 5\.1\.1 <nobody@mail\.test\.example>")


def test_postfix_logs_the_client_named_by_xforward(postfix_instance):
    pf = postfix_instance()
    c = Client(socket.create_connection(pf.address, timeout=10))
    try:
        code, banner = c.reply()
        assert code == 220 and pf.banner_token in banner[0]
        code, keywords = c.cmd("EHLO relay.test.example")
        assert code == 250 and any(k.startswith("XFORWARD ") for k in keywords), keywords
        assert c.cmd("XFORWARD NAME=client.example ADDR=192.0.2.7 PROTO=ESMTP HELO=helo.client.example")[0] == 250
        assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@mail.test.example>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        code, text = c.reply()
        assert code == 250, text
        queue_id = text[0].rsplit(" ", 1)[-1]
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    pf.wait_log(rf"{queue_id}: client=localhost\[127\.0\.0\.1\], orig_client=client\.example\[192\.0\.2\.7\]")
    pf.wait_messages("bob")


def test_postfix_stops_completely_and_a_crash_mid_message_delivers_nothing(postfix_instance):
    pf = postfix_instance()
    s = smtplib.SMTP(*pf.address, timeout=10)
    s.ehlo()
    s.mail("sender@example.org")
    s.rcpt("alice@mail.test.example")
    assert s.docmd("DATA")[0] == 354
    s.send(b"Subject: half\r\n\r\nthe first half of a message\r\n")
    assert pf.smtpd_pids(), "an smtpd serves the session"
    pids = pf.processes()
    assert pf.pid in pids and len(pids) >= 3  # master, qmgr, smtpd at least

    pf.crash()
    assert not any(alive(p) for p in pids)
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        s.send(b".\r\n")
        s.getreply()
    s.close()

    pf.start()  # same port, same queue: the half message must not come back
    with smtplib.SMTP(*pf.address, timeout=10) as s:
        s.sendmail("sender@example.org", ["bob@mail.test.example"], MESSAGE)
    pf.wait_messages("bob")
    assert pf.messages("alice") == []
    assert pf.queue() == []

    pids = pf.processes()
    pf.stop()
    assert pf.processes() == []
    assert not any(alive(p) for p in pids)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(pf.address, timeout=5).close()


def test_postfix_delivers_through_lmtp_with_an_outcome_per_recipient(postfix_instance, dovecot_lmtp):
    dv = dovecot_lmtp(users=("alice",))
    pf = postfix_instance(domain=dv.domain, lmtp=f"127.0.0.1:{dv.port}")
    with smtplib.SMTP(*pf.address, timeout=10) as s:
        # Postfix accepts both (the LMTP server decides); Dovecot knows only alice.
        refused = s.sendmail("sender@example.org", [dv.address_of("alice"), dv.address_of("nobody")], MESSAGE)
        assert refused == {}
    [stored] = dv.wait_messages("alice")
    added, rest = split_trace(stored, received=2)  # Dovecot's Received, then Postfix's
    assert names(added) == ["Return-Path", "Delivered-To", "Received", "Received"], added
    assert rest == crlf_to_lf(MESSAGE)
    pf.wait_log(rf"to=<alice@{dv.domain}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{dv.port},.* status=sent \(250 2\.0\.0 ")
    pf.wait_log(rf"to=<nobody@{dv.domain}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{dv.port},.* status=bounced "
                rf"\(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 550 5\.1\.1 <nobody@{dv.domain}> {DOVECOT_UNKNOWN_USER}")


def test_postfix_keeps_mail_an_lmtp_server_deferred_in_its_queue(postfix_instance, smtp_sink):
    sink = smtp_sink(lmtp=True, dump=False, args=("-r", "RCPT"))  # 450 4.3.0 to every RCPT
    pf = postfix_instance(lmtp=f"127.0.0.1:{sink.port}")
    with smtplib.SMTP(*pf.address, timeout=10) as s:
        s.sendmail("sender@example.org", ["alice@mail.test.example"], MESSAGE)
    pf.wait_log(r"to=<alice@mail\.test\.example>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+,.* status=deferred "
                r"\(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 450 4\.3\.0 ")
    [queued] = pf.queue()
    assert queued["queue_name"] == "deferred"
    [recipient] = queued["recipients"]
    assert recipient["address"] == "alice@mail.test.example"
    assert "450 4.3.0" in recipient["delay_reason"], recipient


# ---------------------------------------------------------------- Dovecot


def test_dovecot_delivers_to_known_users_and_refuses_unknown_ones_at_rcpt(dovecot_lmtp):
    dv = dovecot_lmtp()
    sock = socket.create_connection(dv.address, timeout=10)
    try:
        rcpt, final = lmtp_session(sock, "sender@example.org",
                                   [dv.address_of("alice"), dv.address_of("nobody"), dv.address_of("bob")],
                                   MESSAGE)
    finally:
        sock.close()
    assert [code for code, _ in rcpt] == [250, 550, 250]
    assert rcpt[1][1] == [f"5.1.1 <nobody@{dv.domain}> {DOVECOT_UNKNOWN_USER}: nobody@{dv.domain}"]
    assert [code for code, _ in final] == [250, 250]
    assert f"<alice@{dv.domain}>" in final[0][1][0] and f"<bob@{dv.domain}>" in final[1][1][0]
    for user in ("alice", "bob"):
        [stored] = dv.wait_messages(user)
        added, rest = split_trace(stored)
        # Dovecot adds Delivered-To only when the transaction has a single recipient.
        assert names(added) == ["Return-Path", "Received"], added
        assert b"by dovecot.test.example with LMTP" in added[1]
        assert rest == crlf_to_lf(MESSAGE)
    assert not dv.maildir("nobody").exists()
    assert "Error:" not in dv.log(), dv.log()


def test_dovecot_lmtp_unix_socket(dovecot_lmtp):
    dv = dovecot_lmtp(users=("carol",))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(dv.unix_path))
        rcpt, final = lmtp_session(sock, "", [dv.address_of("carol")], MESSAGE)
    finally:
        sock.close()
    assert [code for code, _ in rcpt + final] == [250, 250]
    [stored] = dv.wait_messages("carol")
    assert stored.startswith(b"Return-Path: <>\n")


# ---------------------------------------------------------------- smtp-sink


def test_smtp_sink_dumps_the_envelope_and_the_message(smtp_sink):
    sink = smtp_sink()
    with smtplib.SMTP(*sink.address, timeout=10) as s:
        s.ehlo("client.test.example")
        s.sendmail("sender@example.org", ["x@example.net", "y@example.net"], MESSAGE)
    [dumped] = sink.wait_messages()
    assert dumped.client_addr == "127.0.0.1" and dumped.proto == "ESMTP"
    assert dumped.helo == "client.test.example"
    assert dumped.mail_args.startswith("<sender@example.org>")
    assert [r.split()[0] for r in dumped.rcpt_args] == ["<x@example.net>", "<y@example.net>"]
    assert dumped.data == crlf_to_lf(MESSAGE)


def test_smtp_sink_options_pass_through(smtp_sink):
    sink = smtp_sink(dump=False, args=("-f", "RCPT"))
    with smtplib.SMTP(*sink.address, timeout=10) as s:
        s.ehlo()
        s.mail("sender@example.org")
        code, text = s.rcpt("x@example.net")
    assert code == 500 and text.startswith(b"5.3.0"), (code, text)


def test_a_taken_port_is_retried_once_on_another(tmp_path, monkeypatch):
    if not Path(mailservers.SMTP_SINK).exists():
        pytest.skip("smtp-sink not installed")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = mailservers.free_port
    monkeypatch.setattr(mailservers, "free_port", lambda: next(ports, None) or real())
    try:
        with running_smtp_sink(tmp_path, dump=False) as sink:
            assert sink.port != taken.getsockname()[1]
            with smtplib.SMTP(*sink.address, timeout=10) as s:
                assert s.noop()[0] == 250
    finally:
        taken.close()


def test_an_instance_that_cannot_start_says_why_in_one_line(tmp_path):
    if not Path(mailservers.POSTFIX_MASTER).exists():
        pytest.skip("Postfix not installed")
    with pytest.raises(MailServerError) as caught:
        with mailservers.running_postfix(tmp_path, settings={"mail_owner": "no-such-user"}):
            pass
    assert "\n" not in str(caught.value) and str(caught.value)
    assert "no-such-user" in str(caught.value), caught.value


def test_a_missing_program_skips_but_fails_in_ci(tmp_path, monkeypatch):
    monkeypatch.setattr(mailservers, "DOVECOT", str(tmp_path / "no-dovecot"))
    monkeypatch.delenv("PREFORK_ESMTP_REQUIRE_TOOLS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-dovecot not installed"):
        mailservers._enter([], mailservers.running_dovecot(tmp_path), "Dovecot")
    monkeypatch.setenv("PREFORK_ESMTP_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="required in CI"):
        mailservers._enter([], mailservers.running_dovecot(tmp_path), "Dovecot")
