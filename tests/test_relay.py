"""The relay handler: replies pass through, the message streams, nothing is 250 unless upstream said so.

The upstream here is a second real prefork-esmtp (the recording handler) or a
scripted loopback server for failures on demand; the tests against Postfix
are in test_relay_postfix.py.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import Client, messages_from, wait_for
from relay_support import ScriptedUpstream, start_relay

MESSAGE = (b"From: Alice <alice@example.org>\r\n"
           b"To: Bob <bob@example.org>\r\n"
           b"Subject: a folded\r\n  subject line\r\n"
           b"X-Spacing:   kept   as   sent\r\n"
           b"\r\n"
           b"first line\r\n.starts with a dot\r\n..two dots\r\nlast\r\n")


STUFFED = MESSAGE.replace(b"\r\n.", b"\r\n..")  # as a raw client must send it


def connect(srv) -> Client:
    c = Client(socket.create_connection(("127.0.0.1", srv.port), timeout=15))
    assert c.reply()[0] == 220
    return c


def transaction(c: Client, recipients=("bob@example.org",), sender="alice@example.org"):
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    for r in recipients:
        c.cmd(f"RCPT TO:<{r}>")


def test_a_message_passes_byte_for_byte_after_our_received_line(start_server):
    with ScriptedUpstream() as upstream:
        relay = start_relay(start_server, upstream.address)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
            client.ehlo("client.example")
            client.sendmail("alice@example.org", ["bob@example.org"], MESSAGE)
        [wire] = upstream.messages
        assert wire.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby mx.test.example")
        received_end = wire.index(b"\r\nFrom: ") + 2
        assert b"for <bob@example.org>;" in wire[:received_end]
        # what goes upstream is the message as sent, dot-stuffing and all
        assert wire[received_end:] == MESSAGE.replace(b"\r\n.", b"\r\n..")
        assert any(c.startswith("MAIL FROM:<alice@example.org>") for c in upstream.commands)


def test_upstream_replies_reach_the_client_unchanged(start_server):
    upstream = start_server()  # a real prefork-esmtp with the recording handler
    relay = start_relay(start_server, f"127.0.0.1:{upstream.port}")
    c = connect(relay)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME")[0] == 250
    code, lines = c.cmd("RCPT TO:<reject@example.org>")
    assert (code, lines) == (550, ["5.7.1 Rejected by the test handler"])
    code, lines = c.cmd("RCPT TO:<multi@example.org>")
    assert (code, lines) == (250, ["2.1.5 first line", "2.1.5 second line", "2.1.5 third line"])
    assert c.cmd("DATA")[0] == 354
    c.send(STUFFED + b".\r\n")
    code, lines = c.reply()
    assert code == 250 and lines == ["2.0.0 Message accepted for delivery"]
    # a second transaction on the same upstream session, refused at end of data by the upstream
    assert c.cmd("MAIL FROM:<eomreject@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: no\r\n\r\nbody\r\n.\r\n")
    assert c.reply() == (554, ["5.7.1 Message refused by the test handler"])
    assert c.cmd("QUIT")[0] == 221
    c.close()
    first, refused = upstream.accepted_messages()  # EOM ran for both; the upstream refused the second
    assert refused["sender"] == "eomreject@example.org"
    message = first
    assert message["recipients"] == ["multi@example.org"]
    assert message["mail_params"] == {"BODY": "8BITMIME"}
    assert message["body"] == b"first line\r\n.starts with a dot\r\n..two dots\r\nlast\r\n"
    sessions = [s for s in upstream.sessions().values() if any(r["hook"] == "MAIL" for r in s)]
    assert len(sessions) == 1, "one upstream session served both transactions"


@pytest.mark.parametrize("behaviour, stage, enhanced", [
    ("silent", "MAIL", "4.4.2"),
    ("garbage", "MAIL", "4.3.0"),
    ("close_after_354", "EOM", "4.4.2"),
    ("eom_451", "EOM", "4.3.0"),
])
def test_a_failing_upstream_gives_the_client_a_4xx_in_time(start_server, behaviour, stage, enhanced):
    with ScriptedUpstream(behaviour) as upstream:
        relay = start_relay(start_server, upstream.address, "timeout=2", "data_timeout=2")
        c = connect(relay)
        assert c.cmd("EHLO client.example")[0] == 250
        started = time.monotonic()
        code, lines = c.cmd("MAIL FROM:<alice@example.org>")
        if stage == "MAIL":
            assert code == 451 and lines[0].startswith(enhanced + " "), (code, lines)
            assert upstream.address in lines[0] or behaviour == "eom_451"
        else:
            assert code == 250
            assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(STUFFED + b".\r\n")
            code, lines = c.reply(timeout=15)
            assert code == 451 and lines[0].startswith(enhanced + " "), (code, lines)
        assert time.monotonic() - started < 8
        assert upstream.messages == [] or behaviour == "eom_451"
        # the worker goes on: the same session can still talk
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("QUIT")[0] == 221
        c.close()


def test_an_upstream_not_listening_is_451_4_4_1(start_server):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    relay = start_relay(start_server, f"127.0.0.1:{port}", "connect_timeout=2")
    c = connect(relay)
    assert c.cmd("EHLO client.example")[0] == 250
    code, lines = c.cmd("MAIL FROM:<alice@example.org>")
    assert code == 451 and lines[0].startswith("4.4.1 ") and f"127.0.0.1:{port}" in lines[0], lines
    assert c.cmd("NOOP")[0] == 250, "the session goes on"
    assert c.cmd("QUIT")[0] == 221
    c.close()


def test_several_upstreams_are_tried_in_order(start_server):
    probe = socket.create_server(("127.0.0.1", 0))
    dead = probe.getsockname()[1]
    probe.close()
    with ScriptedUpstream() as upstream:
        relay = start_relay(start_server, f"127.0.0.1:{dead},{upstream.address}", "connect_timeout=2")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
            client.sendmail("alice@example.org", ["bob@example.org"], MESSAGE)
        assert len(upstream.messages) == 1


def test_a_client_that_vanishes_mid_message_delivers_nothing(start_server):
    upstream = start_server()
    relay = start_relay(start_server, f"127.0.0.1:{upstream.port}")
    c = connect(relay)
    transaction(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: cut\r\n\r\n" + b"half a message\r\n" * 100)
    wait_for(lambda: "BODY" in [r["hook"] for r in upstream.records()], 10, message="the body upstream")
    c.sock.close()  # gone without the end-of-data line
    wait_for(lambda: "DISCONNECT" in [r["hook"] for r in upstream.records()], 10,
             message="the upstream session to end")
    assert upstream.accepted_messages() == []
    # the relay serves the next client
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
        client.sendmail("alice@example.org", ["bob@example.org"], MESSAGE)
    assert len(upstream.accepted_messages()) == 1


def test_an_upstream_killed_mid_message_gives_451_and_no_delivery(start_server):
    upstream = start_server()
    relay = start_relay(start_server, f"127.0.0.1:{upstream.port}", "timeout=3", "data_timeout=3")
    c = connect(relay)
    transaction(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: doomed\r\n\r\n" + b"x" * 1000 + b"\r\n")
    wait_for(lambda: "BODY" in [r["hook"] for r in upstream.records()], 10, message="the body upstream")
    upstream.proc.kill()
    upstream.proc.wait(10)
    c.send(b"more of the body\r\n" * 1000 + b".\r\n")
    code, lines = c.reply(timeout=15)
    assert code == 451 and lines[0].startswith("4.4.2 "), (code, lines)
    assert upstream.accepted_messages() == []
    assert c.cmd("QUIT")[0] == 221
    c.close()


def test_a_message_too_big_for_us_is_never_finished_upstream(start_server):
    upstream = start_server()
    relay = start_relay(start_server, f"127.0.0.1:{upstream.port}", args=("--max-message-size", "10K"))
    c = connect(relay)
    transaction(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: big\r\n\r\n" + (b"y" * 64 + b"\r\n") * 400 + b".\r\n")
    code, _ = c.reply()
    assert code == 552
    # the next transaction works, and the cut one was never delivered upstream
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()
    messages = upstream.accepted_messages()
    assert [[h for h in m["headers"] if h[0] == "Subject"] for m in messages] == [[("Subject", "small")]]


def test_connect_at_connect_passes_the_upstream_refusal(start_server):
    upstream = start_server(env={"PREFORK_TEST_CONNECT": "554"})
    relay = start_relay(start_server, f"127.0.0.1:{upstream.port}", "connect_at=connect")
    c = Client(socket.create_connection(("127.0.0.1", relay.port), timeout=15))
    code, lines = c.reply()
    assert code == 554 and "Go away" in lines[0]
    c.close()


def test_a_50_megabyte_message_streams_in_bounded_memory(start_server, tmp_path):
    """The relay's worker never holds the message: its RSS grows by far less than the message."""
    with ScriptedUpstream() as upstream:
        relay = start_relay(start_server, upstream.address, args=("--max-message-size", "60M"))
        worker = psutil.Process(relay.proc.pid)
        before = worker.memory_info().rss
        peak = before
        c = connect(relay)
        transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: big\r\n\r\n")
        line = b"z" * 998 + b"\r\n"
        block = line * 1024  # about 1 MB
        for _ in range(50):
            c.sock.sendall(block)
            peak = max(peak, worker.memory_info().rss)
        c.send(b".\r\n")
        assert c.reply(timeout=60)[0] == 250
        peak = max(peak, worker.memory_info().rss)
        c.close()
        assert len(upstream.messages) == 1 and len(upstream.messages[0]) > 50_000_000
        assert peak - before < 20 * 1024 * 1024, f"worker RSS grew by {(peak - before) >> 20} MiB"


@pytest.mark.parametrize("option, message", [
    ("", "upstream: missing"),
    ("upstream=nohost", "upstream: expected host:port"),
    ("upstream=127.0.0.1:25 tls=maybe", "tls: expected one of none, opportunistic, required"),
    ("upstream=127.0.0.1:25 timeout=0", "timeout: must be a number of seconds greater than 0"),
])
def test_bad_relay_options_are_one_line_at_configtest(option, message):
    args = [sys.executable, "-m", "prefork_esmtp", "configtest", "--handler",
            "prefork_esmtp.handlers.relay:Relay"]
    for item in option.split():
        args += ["--handler-option", item]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines


# -- TLS to the upstream -------------------------------------------------------------------

from tls_support import pki  # noqa: E402  (the module's certificates)


@pytest.fixture
def tls_upstream(start_server, pki):
    return start_server("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))


def _relay_one(relay) -> tuple[int, list[str]]:
    c = connect(relay)
    assert c.cmd("EHLO client.example")[0] == 250
    code, lines = c.cmd("MAIL FROM:<alice@example.org>")
    if code == 250:
        assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(STUFFED + b".\r\n")
        code, lines = c.reply()
    c.close()
    return code, lines


@pytest.mark.parametrize("mode, ca, expected", [
    ("required", True, "TLSv1.3"),   # verified against the test CA
    ("opportunistic", False, "TLSv1.3"),  # encrypted, identity not checked
    ("none", False, None),
])
def test_tls_to_the_upstream(start_server, tls_upstream, pki, mode, ca, expected):
    options = [f"tls={mode}"] + ([f"tls_ca={pki.ca}"] if ca else [])
    relay = start_relay(start_server, f"127.0.0.1:{tls_upstream.port}", *options)
    assert _relay_one(relay)[0] == 250
    [message] = tls_upstream.accepted_messages()
    tls = message["record"]["tls"]
    assert (tls or {}).get("version") == expected


def test_required_tls_refuses_an_unverified_upstream(start_server, tls_upstream):
    relay = start_relay(start_server, f"127.0.0.1:{tls_upstream.port}", "tls=required")  # system CAs only
    code, lines = _relay_one(relay)
    assert code == 451 and lines[0].startswith("4.7.5 "), (code, lines)
    assert tls_upstream.accepted_messages() == []


def test_required_tls_refuses_an_upstream_without_starttls(start_server, pki):
    upstream = start_server()
    relay = start_relay(start_server, f"127.0.0.1:{upstream.port}", "tls=required", f"tls_ca={pki.ca}")
    code, lines = _relay_one(relay)
    assert code == 451 and lines[0].startswith("4.7.5 ") and "STARTTLS" in lines[0], (code, lines)


def test_binarymime_goes_upstream_with_bdat(start_server):
    upstream = start_server()
    relay = start_relay(start_server, f"127.0.0.1:{upstream.port}")
    c = connect(relay)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org> BODY=BINARYMIME")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
    body = b"Subject: binary\r\n\r\n\x00\x01\xff bare\nlf and a lone .\r\n.\r\n"
    c.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
    assert c.reply()[0] == 250
    c.close()
    [message] = upstream.accepted_messages()
    assert message["mail_params"] == {"BODY": "BINARYMIME"}
    assert message["body"] == b"\x00\x01\xff bare\nlf and a lone .\r\n.\r\n"
