"""The relay and LMTP handlers against real mail servers started by the tests.

A private Postfix (smtpd, delivering to Maildirs) is the upstream of the relay;
a private Dovecot is the LMTP target of the LMTP handler; and Postfix is the
client of our LMTP server mode.  See tests/mailservers.py for the instances.
"""

from __future__ import annotations

import smtplib
import socket
import time

import dkim
import pytest

from conftest import Client, wait_for
from mailservers import (DOVECOT_UNKNOWN_USER, POSTFIX_UNKNOWN_USER, crlf_to_lf, dovecot_lmtp,  # noqa: F401
                         postfix_instance, split_trace)
from relay_support import start_relay
from test_dkim_maildir import DOMAIN, MESSAGE as SIGNED_MESSAGE, SELECTOR, SIGNED_HEADERS, dkim_key, verify  # noqa: F401

LMTP = "prefork_esmtp.handlers.lmtp:LMTP"

MESSAGE = (b"From: Alice <alice@example.org>\r\n"
           b"To: Bob <bob@example.org>\r\n"
           b"Subject: a folded\r\n  subject line\r\n"
           b"X-Spacing:   kept   as   sent  \r\n"
           b"\r\n"
           b"first line\r\n.starts with a dot\r\nlast line\r\n")


def ours_then_postfix(stored: bytes) -> tuple[list[bytes], bytes]:
    """Postfix's fields and its Received line, then ours, then the message as we got it."""
    fields, rest = split_trace(stored, received=2)
    assert fields[-1].startswith(b"Received: from client.example ([127.0.0.1])"), fields
    return fields, rest


def test_relayed_mail_lands_in_postfix_byte_for_byte(start_server, postfix_instance):
    pf = postfix_instance()
    relay = start_relay(start_server, f"127.0.0.1:{pf.port}")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo("client.example")
        refused = client.sendmail("sender@example.org", [pf.address_of("alice")], MESSAGE)
        assert refused == {}
    [stored] = pf.wait_messages("alice", timeout=20)
    _, rest = ours_then_postfix(stored)
    assert rest == crlf_to_lf(MESSAGE)


def test_postfix_logs_the_real_client_through_xforward(start_server, postfix_instance):
    """The client comes from 127.0.0.2, the relay from 127.0.0.1: Postfix must name 127.0.0.2."""
    pf = postfix_instance()
    relay = start_relay(start_server, f"127.0.0.1:{pf.port}")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20, source_address=("127.0.0.2", 0)) as client:
        client.ehlo("client.example")
        client.sendmail("sender@example.org", [pf.address_of("bob")], MESSAGE)
    match = pf.wait_log(r"client=(\S+), orig_client=(\S+)", timeout=20)
    assert match.group(1) == "localhost[127.0.0.1]", match.group(0)
    assert match.group(2) == "unknown[127.0.0.2]", match.group(0)
    [stored] = pf.wait_messages("bob", timeout=20)
    assert b"from client.example ([127.0.0.2])" in stored  # our Received line names the real client too


def test_xforward_off_sends_none(start_server, postfix_instance):
    pf = postfix_instance()
    relay = start_relay(start_server, f"127.0.0.1:{pf.port}", "xforward=false")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.sendmail("sender@example.org", [pf.address_of("bob")], MESSAGE)
    pf.wait_messages("bob", timeout=20)
    assert "orig_client=" not in pf.log()


def test_postfix_refusals_reach_the_client_per_recipient(start_server, postfix_instance):
    pf = postfix_instance()
    relay = start_relay(start_server, f"127.0.0.1:{pf.port}")
    c = Client(socket.create_connection(("127.0.0.1", relay.port), timeout=20))
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<nobody@{pf.domain}>")
    assert code == 550 and lines[0].startswith("5.1.1 ") and POSTFIX_UNKNOWN_USER in lines[0], lines
    code, lines = c.cmd("RCPT TO:<someone@elsewhere.example>")
    assert code == 554 and "Relay access denied" in lines[0], lines
    assert c.cmd(f"RCPT TO:<{pf.address_of('alice')}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    code, lines = c.reply(timeout=20)
    assert code == 250 and "queued as" in lines[0], lines  # Postfix's own words
    c.close()
    assert len(pf.wait_messages("alice", timeout=20)) == 1


def test_postfix_killed_mid_message_gives_4xx_and_no_delivery(start_server, postfix_instance):
    pf = postfix_instance()
    relay = start_relay(start_server, f"127.0.0.1:{pf.port}", "timeout=5", "data_timeout=5")
    c = Client(socket.create_connection(("127.0.0.1", relay.port), timeout=20))
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    assert c.cmd(f"RCPT TO:<{pf.address_of('alice')}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: doomed\r\n\r\n" + b"part one\r\n" * 100)
    wait_for(lambda: pf.smtpd_pids(), 10, message="Postfix's smtpd serving the relay")
    time.sleep(0.3)  # let the first part reach smtpd
    pf.crash()
    c.send(b"part two\r\n" * 2000 + b".\r\n")
    code, lines = c.reply(timeout=20)
    assert 400 <= code < 500 and lines[0].startswith("4.4.2 "), (code, lines)
    c.close()
    pf.start()
    pf.flush()
    time.sleep(1)  # nothing may arrive: give a delivery that should not happen the chance to show
    assert pf.messages("alice") == []


@pytest.mark.parametrize("canon", [(b"simple", b"simple"), (b"relaxed", b"relaxed")], ids=lambda c: c[0].decode())
def test_dkim_signature_survives_the_hop(start_server, postfix_instance, dkim_key, canon):
    private, record = dkim_key
    signature = dkim.sign(SIGNED_MESSAGE, SELECTOR, DOMAIN, private, canonicalize=canon,
                          include_headers=SIGNED_HEADERS)
    pf = postfix_instance()
    relay = start_relay(start_server, f"127.0.0.1:{pf.port}")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo("client.example")
        client.sendmail("alice@example.org", [pf.address_of("bob")], signature + SIGNED_MESSAGE)
    [stored] = pf.wait_messages("bob", timeout=20)
    _, rest = ours_then_postfix(stored)
    assert rest == crlf_to_lf(signature + SIGNED_MESSAGE)
    assert verify(stored.replace(b"\n", b"\r\n"), record)


# -- LMTP --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_lmtp_handler_delivers_to_dovecot(start_server, dovecot_lmtp, transport):
    dv = dovecot_lmtp()
    upstream = f"127.0.0.1:{dv.port}" if transport == "tcp" else f"unix:{dv.unix_path}"
    relay = start_relay(start_server, upstream, handler=LMTP)
    c = Client(socket.create_connection(("127.0.0.1", relay.port), timeout=20))
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<nobody@{dv.domain}>")
    assert code == 550 and DOVECOT_UNKNOWN_USER in lines[0], lines  # Dovecot's own refusal, at RCPT
    assert c.cmd(f"RCPT TO:<{dv.address_of('alice')}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{dv.address_of('bob')}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    code, lines = c.reply(timeout=20)
    assert code == 250 and "Saved" in lines[0], lines
    c.close()
    for user in ("alice", "bob"):
        [stored] = dv.wait_messages(user, timeout=20)
        assert stored.endswith(crlf_to_lf(MESSAGE))


def test_postfix_delivers_through_our_lmtp_server_mode(start_server, postfix_instance):
    """Postfix's lmtp client hands mail to a prefork-esmtp handler with per-recipient results."""
    ours = start_server("--protocol", "lmtp", handler="lmtp_handlers:PerRecipient")
    pf = postfix_instance(lmtp=f"127.0.0.1:{ours.port}")
    with smtplib.SMTP("127.0.0.1", pf.port, timeout=20) as client:
        refused = client.sendmail("sender@example.org",
                                  [pf.address_of("alice"), f"gone@{pf.domain}", f"full@{pf.domain}"], MESSAGE)
        assert refused == {}  # Postfix queued it for all three; the outcomes come from us
    pf.wait_log(rf"to=<alice@{pf.domain}>.*status=sent \(250 2\.0\.0 <alice@{pf.domain}> delivered\)", timeout=30)
    pf.wait_log(rf"to=<gone@{pf.domain}>.*status=bounced .*550 5\.2\.1", timeout=30)
    pf.wait_log(rf"to=<full@{pf.domain}>.*status=deferred .*452 4\.2\.2", timeout=30)
